"""How much of a file the kernel's page cache holds (util-linux's ``fincore``), for the tests of
``dicom_node.archive.drop_cached``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dicom_node.archive import fsync_path


def resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def write_durably(path: Path, data: bytes) -> None:
    """Write and fsync, as the node writes every file it later reads: only clean pages can be dropped."""
    path.write_bytes(data)
    fsync_path(path)


def require_droppable_cache(directory: Path) -> None:
    """Skip where a file's pages cannot be dropped at all: no ``fincore``, no ``posix_fadvise``, or a file system
    whose pages are the file (tmpfs). Probed with the system call itself, not with the code under test."""
    if shutil.which("fincore") is None or not hasattr(os, "posix_fadvise"):
        pytest.skip("needs util-linux's fincore and posix_fadvise")
    probe = directory / ".page-cache-probe"
    write_durably(probe, os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    kept = resident_bytes(probe)
    probe.unlink()
    if kept:
        pytest.skip(f"this file system keeps dropped pages ({kept} bytes stayed resident): tmpfs?")
