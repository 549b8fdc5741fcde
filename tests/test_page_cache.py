"""``dicom_node.archive.drop_cached``: a durable file's pages leave the page cache, its bytes stay, and a path that
is gone or a platform without the call changes nothing. The worker and the exporter calling it are tested beside
their own steps (test_worker, test_export)."""

from __future__ import annotations

import os

from dicom_node import archive
from dicom_node.archive import drop_cached

from .support.page_cache import require_droppable_cache, resident_bytes, write_durably


def test_a_durable_file_leaves_the_page_cache_and_keeps_its_bytes(tmp_path):
    require_droppable_cache(tmp_path)
    data = os.urandom(4 << 20)
    path = tmp_path / "instance.dcm"
    write_durably(path, data)
    assert resident_bytes(path) == len(data)  # just written: all of it cached
    drop_cached(path)
    assert resident_bytes(path) == 0
    assert path.read_bytes() == data  # read back from the disk, whole


def test_a_missing_file_or_a_platform_without_fadvise_is_no_error(tmp_path, monkeypatch):
    drop_cached(tmp_path / "gone.dcm")
    path = tmp_path / "kept.dcm"
    write_durably(path, b"DICM" * 1024)
    monkeypatch.delattr(archive.os, "posix_fadvise")
    drop_cached(path)
    assert path.read_bytes() == b"DICM" * 1024
