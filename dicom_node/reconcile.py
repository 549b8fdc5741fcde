"""Archive/database reconciliation: run by ``dicom-node serve`` before it listens, and by ``dicom-node check``.

- Files under ``archive/`` that no instance row names (the database was deleted, replaced or restored from an
  older copy; the node was killed between the rename and the commit) are **re-registered**: their header and
  sha256 are read again (``dicom_node.received``), and they get the rows a C-STORE would have given them (instance,
  job queued or not analysed by the same scope verdict, a ``reregistered`` audit event). The calling AE title is
  not known any more: it is recorded as ``(reconciled)``.
- Rows whose archived file is missing are **reported**, never deleted (a modality sending the instance again
  restores the file, see the intake's duplicate handling).
- Files that cannot be registered (not DICOM, truncated Pixel Data, a path other than the one its UIDs give, a
  SOP Instance UID already registered with another path) are reported and left where they are.

Only ``archive/`` holds received instances: ``tmp/``, ``conflicts/`` and ``results/`` are never looked at. Known
files cost one directory entry each (no ``stat``, no read); only unknown files are opened.

Ordering, for a run while a node is serving (``dicom-node check``): the rows are read before the archive is
walked, so a row read has its file in place already (the intake renames before it commits) and a missing file is
really missing (each is looked up once more, in case a replacement was renaming it). A file the walk sees without a
row may be one the intake has just renamed and is about to commit: files modified less than ``settle_seconds``
ago are left alone (counted as ``recent``). At start-up nothing else writes the archive, so nothing is left.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine

from ai.limits import DEFAULT_LIMITS, ImageLimits
from ai.safe_text import exception_summary
from db.instances import ReceivedInstance
from db.reconciliation import (
    REGISTERED_MEANWHILE,
    Registered,
    known_archive_paths,
    record_reconciliation,
    register_found,
)

from .archive import Archive
from .received import NotRegistrable, received_instance_from_file

LOG = logging.getLogger("dicom_node.reconcile")

RECONCILED_AET = "(reconciled)"
"""The calling AE title recorded for a re-registered instance: the real one was lost with its row (parentheses
make it one no modality uses, so ``same_source`` never matches it)."""

SETTLE_SECONDS_WHILE_SERVING = 120.0
"""``dicom-node check`` leaves unknown files younger than this to the intake: between its rename and its commit a
C-STORE can wait up to the SQLite busy timeout (30 s) for the write lock."""

BATCH = 200  # unknown files registered per transaction


@dataclass(frozen=True)
class MissingFile:
    sop_instance_uid: str
    archive_path: str


@dataclass(frozen=True)
class UnregisteredFile:
    archive_path: str
    reason: str  # log-safe: fixed texts and exception types, never dataset values


@dataclass
class ReconcileReport:
    files: int = 0  # .dcm files under archive/
    known: int = 0  # of those, named by a row
    reregistered: list[Registered] = field(default_factory=list)
    missing: list[MissingFile] = field(default_factory=list)
    unregistered: list[UnregisteredFile] = field(default_factory=list)
    recent: int = 0  # unknown but younger than settle_seconds: left for the intake
    rows: int = 0  # instance rows in the database
    seconds: float = 0.0

    @property
    def consistent(self) -> bool:
        """Archive and database agreed before this run: nothing re-registered, missing or unregistrable."""
        return not (self.reregistered or self.missing or self.unregistered)

    def counts(self, trigger: str) -> dict[str, object]:
        return {"trigger": trigger, "files": self.files, "known": self.known, "rows": self.rows,
                "reregistered": len(self.reregistered), "missing": len(self.missing),
                "unregistered": len(self.unregistered), "recent": self.recent, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        queued = sum(1 for r in self.reregistered if r.job_state.value == "queued")
        text = (f"{self.files} archived file(s), {self.rows} instance row(s): {len(self.reregistered)} re-registered "
                f"({queued} queued for analysis), {len(self.missing)} row(s) whose file is missing, "
                f"{len(self.unregistered)} file(s) not registrable")
        if self.recent:
            text += f", {self.recent} recent file(s) left to the intake"
        return text + f" ({self.seconds:.2f} s)"


def archive_files(archive: Archive) -> set[str]:
    """Paths (relative to the storage root, as the rows store them) of every .dcm file under archive/."""
    found: set[str] = set()
    root = str(archive.root)
    for dirpath, _dirnames, filenames in os.walk(archive.archive_dir):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in filenames:
            if name.endswith(".dcm"):
                found.add(f"{rel_dir}/{name}")
    return found


def reconcile(archive: Archive, engine: Engine, *, settle_seconds: float = 0.0, trigger: str = "serve",
              limits: ImageLimits = DEFAULT_LIMITS, patient_key_secret: bytes | None = None) -> ReconcileReport:
    """Re-register unknown archive files, report rows without a file, record the counts; see the module docstring.
    Re-registered rows get their patient key when ``patient_key_secret`` is given (``dicom_node.patient_key``)."""
    started = time.perf_counter()
    report = ReconcileReport()
    known = known_archive_paths(engine)  # before the walk: see the module docstring
    on_disk = archive_files(archive)
    report.rows, report.files = len(known), len(on_disk)
    report.known = sum(1 for path in on_disk if path in known)
    report.missing = sorted(
        (MissingFile(uid, path) for path, uid in known.items()
         if path not in on_disk and not archive.absolute(path).exists()),
        key=lambda m: m.archive_path)

    unknown = sorted(path for path in on_disk if path not in known)
    now = time.time()
    pending: list[tuple[ReceivedInstance, datetime]] = []

    def register_pending() -> None:
        registered, skipped = register_found(engine, pending)
        report.reregistered += registered
        for rec, reason in skipped:
            if reason == REGISTERED_MEANWHILE:  # by the intake, between our read of the rows and now
                report.known += 1
            else:
                report.unregistered.append(UnregisteredFile(rec.archive_path, reason))
        pending.clear()

    for path in unknown:
        absolute = archive.absolute(path)
        try:
            if settle_seconds and now - absolute.stat().st_mtime < settle_seconds:
                report.recent += 1
                continue
            pending.append(received_instance_from_file(absolute, archive, RECONCILED_AET, limits,
                                                       patient_key_secret))
        except FileNotFoundError:
            report.files -= 1  # moved away meanwhile (a duplicate set aside): not an archived instance any more
        except NotRegistrable as exc:
            report.unregistered.append(UnregisteredFile(path, str(exc)))
        except OSError as exc:
            report.unregistered.append(UnregisteredFile(path, exception_summary(exc, message="cannot be read")))
        if len(pending) >= BATCH:
            register_pending()
    if pending:
        register_pending()
    report.unregistered.sort(key=lambda u: u.archive_path)
    report.seconds = time.perf_counter() - started
    record_reconciliation(engine, report.counts(trigger))
    return report
