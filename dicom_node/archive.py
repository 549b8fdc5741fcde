"""The on-disk archive: durable placement of received files, the free-disk reserve, and conflict copies.

Durability order (a C-STORE is acknowledged only after all of it): the received bytes are already in a temporary
file under ``tmp/`` on the same file system; the intake fsyncs it (``fsync_path``), then ``place`` renames it to
``archive/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` and fsync the directories we touched. A crash at any moment
leaves either no archive file or a whole one: the rename is atomic and partial data only ever lives in ``tmp/``,
which is emptied at start-up.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID that is not a DICOM UID: it must never become part of a path."""


def check_uid(uid: str | None, name: str) -> str:
    uid = (uid or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not UID_PATTERN.match(uid):
        raise InvalidUID(f"{name} is missing or not a valid UID")
    return uid


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (Linux allows fsync on any descriptor of the inode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(path: Path) -> None:
    """Let the kernel drop a durable file's pages from the page cache (``POSIX_FADV_DONTNEED``), once the node has
    read what it needed of them.

    The node writes each received instance and each result object once and reads it once soon after (the worker
    reads the received file, the exporter sends the result); kept in the cache, those pages only grow it into
    memory the node never reads again, at the expense of the database's. On a VM whose memory the host backs
    lazily, that growth is also paid in first-touch faults: 11 MB written into never-used pages took 38-45 ms of
    CPU on a 2-core AMD EPYC VM against 5 ms into pages dropped this way (docs/benchmarks.md). Only clean pages go
    (the file is fsynced before anyone reads it), so nothing is lost: a later read comes from the disk. A hint
    only: any error, a missing file or a platform without the call changes nothing."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Archive:
    """Everything the node keeps on disk lives under ``root``."""

    def __init__(self, root: Path, reserve_bytes: int) -> None:
        self.root = root
        self.archive_dir = root / "archive"
        self.tmp_dir = root / "tmp"
        self.conflicts_dir = root / "conflicts"
        self.reserve_bytes = reserve_bytes

    def prepare(self) -> int:
        """Create the directories and delete leftovers of interrupted receptions; returns how many were removed."""
        for directory in (self.root, self.archive_dir, self.tmp_dir, self.conflicts_dir):
            directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_file():
                leftover.unlink()
                removed += 1
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def above_reserve(self) -> bool:
        """False once free space has dropped below the configured reserve (checked per C-STORE, so the node
        recovers by itself when space returns)."""
        return self.free_bytes() >= self.reserve_bytes

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.archive_dir / study_uid / series_uid / f"{sop_uid}.dcm"

    def _make_dirs_durable(self, directory: Path) -> None:
        """Create ``directory`` and fsync each parent whose entry list changed."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_path(created.parent)

    def place(self, synced_file: Path, target: Path) -> None:
        """Durably move a file whose data are already fsynced to its archive path (replacing any file there).

        The intake fsyncs each received file itself, overlapped with its checks; every other file this is called
        with (a copy set aside) was placed durably before.
        """
        self._make_dirs_durable(target.parent)
        os.replace(synced_file, target)
        fsync_path(target.parent)

    def remove(self, target: Path) -> None:
        """Undo ``place`` when the database commit failed: nothing may stay in the archive without a row."""
        try:
            target.unlink()
        except FileNotFoundError:
            return
        fsync_path(target.parent)

    def set_aside(self, source: Path, sop_uid: str, sha256: str) -> Path:
        """Keep a copy that must not be analysed (a conflicting duplicate, a superseded version) under conflicts/.

        ``source`` is an fsynced received file or an archived one, so only the directory entries need syncing."""
        target = self.conflicts_dir / f"{sop_uid}.{sha256[:16]}.dcm"
        os.replace(source, target)
        fsync_path(self.conflicts_dir)
        if source.parent != self.tmp_dir:
            fsync_path(source.parent)
        return target
