"""Secrets the node makes once and keeps under its storage root (the patient-key secret, the console's session
secret): created atomically so that processes starting together end with one secret."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from .archive import fsync_path


def create_secret_file(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` random bytes as hex to ``path`` unless it exists: a complete file or none, mode 0600 in a
    0700 folder. Written to a temporary file, fsynced, then hard-linked into place (``os.link`` fails if the path
    exists, so the first process to link wins and the others read its secret). Raises OSError."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(nbytes) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process was first: its secret is the one
        fsync_path(path.parent)
    finally:
        os.unlink(tmp)
