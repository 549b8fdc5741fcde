"""What happens to one received C-STORE dataset, from a temporary file to an acknowledged, queued instance.

The order is the contract with the sender: header check -> durable placement in the archive -> instance row and
job committed in one transaction -> Success. Every failure before that answers a failure status and leaves no
file in the archive. No pixel data is decoded here: analysis belongs to the worker processes.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from db.instances import (
    ReceivedInstance,
    StoredInstance,
    find_instance,
    record_event,
    record_new,
    record_replacement,
)

from ai.header_scope import header_scope
from ai.limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, read_dataset_bounded
from ai.safe_text import escape, exception_summary

from .archive import Archive, InvalidUID, check_uid, fsync_path, sha256_of
from .reception import ReceptionGuard

LOG = logging.getLogger("dicom_node.intake")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # free-disk reserve reached, or the disk write failed
DATABASE_UNAVAILABLE = 0xA701  # the queue row could not be committed
SOP_CLASS_MISMATCH = 0xA900  # dataset's SOP Class UID differs from the request's
CANNOT_PARSE = 0xC001  # not a decodable DICOM dataset
INVALID_UIDS = 0xC002  # missing or malformed Study/Series/SOP Instance UID
SOP_INSTANCE_MISMATCH = 0xC003  # dataset's SOP Instance UID differs from the request's
DUPLICATE_CONFLICT = 0xC010  # same SOP Instance UID, different content, policy says reject
IMAGE_TOO_LARGE = 0xC004  # the header declares (or a deflated dataset inflates to) more than limits.* allow

LOCK_STRIPES = 64


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""  # sent to the peer as Error Comment (64 characters at most)
    detail: str = ""  # for the log only: the cause, never dataset values


def _short_error(exc: BaseException) -> str:
    """Exception type and a fixed text: exception texts must not carry dataset values into the logs."""
    return exception_summary(exc)


NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}


def pixel_data_shortfall(ds: Dataset, file_size: int) -> str | None:
    """For a native (uncompressed) transfer syntax: a log-safe description if the Pixel Data holds fewer bytes than
    Rows x Columns x Samples per Pixel x Bits Allocated x frames require (a truncated transfer or file), else None.

    ``ds`` is read with deferred values, so the element's declared length and its offset in the file are known
    without loading it; for a deflated dataset the inflated value is measured. Longer Pixel Data (trailing padding)
    is accepted, as every decoder ignores the excess."""
    syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if syntax not in NATIVE_SYNTAXES or "PixelData" not in ds:
        return None
    raw = ds.get_item("PixelData")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    if min(rows, columns, bits) <= 0:
        return "Rows, Columns or Bits Allocated missing or zero for native Pixel Data"
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if syntax == "1.2.840.10008.1.2.1.99" or getattr(raw, "value_tell", None) is None:
        value = ds.PixelData
        available = len(value) if value is not None else 0
    else:
        declared = 0 if raw.length == 0xFFFFFFFF else int(raw.length)
        available = min(declared, max(0, file_size - int(raw.value_tell)))
    if available < expected:
        return f"Pixel Data holds {available} of the {expected} bytes its image attributes require"
    return None


class Intake:
    """Stores received datasets durably and queues them; one instance serves every association thread."""

    def __init__(self, archive: Archive, engine: Engine, duplicate_policy: str,
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.archive = archive
        self.engine = engine
        self.duplicate_policy = duplicate_policy
        self.limits = limits
        self.reception = ReceptionGuard(archive)  # its pynetdicom hooks are bound by the Storage SCP
        # Two associations storing the same SOP Instance UID at once are serialised by these locks.
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        # fsync of the received file runs here while the handler parses, hashes and looks up the instance.
        self._fsync_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")

    def _lock_for(self, sop_uid: str) -> threading.Lock:
        return self._locks[zlib.crc32(sop_uid.encode()) % LOCK_STRIPES]

    def store(self, tmp_file: Path, calling_aet: str, request_sop_class: str, request_sop_instance: str,
              transfer_syntax: str) -> StoreOutcome:
        started = time.perf_counter()
        outcome = self._store(tmp_file, calling_aet, request_sop_class, request_sop_instance, transfer_syntax)
        elapsed_ms = (time.perf_counter() - started) * 1000
        level = logging.INFO if outcome.status == SUCCESS else logging.WARNING
        detail = f" [{outcome.detail}]" if outcome.detail else ""
        LOG.log(level, "C-STORE from %s sop=%s status=0x%04X %s%s (%.0f ms)", escape(calling_aet),
                escape(request_sop_instance), outcome.status, outcome.comment, detail, elapsed_ms)
        return outcome

    def _store(self, tmp_file: Path, calling_aet: str, request_sop_class: str, request_sop_instance: str,
               transfer_syntax: str) -> StoreOutcome:
        if self.reception.was_discarded(tmp_file):
            return StoreOutcome(OUT_OF_RESOURCES, "free disk space fell below the reserve during the transfer")
        size = tmp_file.stat().st_size
        if not self.archive.above_reserve():
            return StoreOutcome(OUT_OF_RESOURCES, "free disk space below the configured reserve")
        synced = self._fsync_pool.submit(fsync_path, tmp_file)
        try:
            return self._check_and_store(tmp_file, size, synced, calling_aet, request_sop_class,
                                         request_sop_instance, transfer_syntax)
        finally:
            synced.exception()  # never leave the fsync running on a file pynetdicom is about to delete

    def _check_and_store(self, tmp_file: Path, size: int, synced: Future, calling_aet: str, request_sop_class: str,
                         request_sop_instance: str, transfer_syntax: str) -> StoreOutcome:
        try:
            ds = read_dataset_bounded(tmp_file, self.limits, defer_size=1024)
        except ImageTooLarge as exc:  # never inflated or decoded; a resend would be refused again
            return StoreOutcome(IMAGE_TOO_LARGE, "image exceeds the node's size limits", str(exc))
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError, zlib.error) as exc:
            return StoreOutcome(CANNOT_PARSE, f"dataset cannot be parsed ({type(exc).__name__})")
        try:
            study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            sop_class = check_uid(ds.get("SOPClassUID"), "SOP Class UID")
        except InvalidUID as exc:
            return StoreOutcome(INVALID_UIDS, str(exc))
        except Exception as exc:  # a malformed element value surfaces only when read
            return StoreOutcome(CANNOT_PARSE, f"dataset cannot be parsed ({type(exc).__name__})")
        try:
            short = pixel_data_shortfall(ds, size)
        except Exception as exc:  # a malformed Rows/Columns/Bits Allocated value
            return StoreOutcome(CANNOT_PARSE, "image pixel attributes cannot be read", exception_summary(exc))
        if short is not None:
            return StoreOutcome(CANNOT_PARSE, "pixel data shorter than the image attributes say", short)
        if sop_uid != request_sop_instance:
            return StoreOutcome(SOP_INSTANCE_MISMATCH, "dataset SOP Instance UID differs from the request's")
        if sop_class != request_sop_class:
            return StoreOutcome(SOP_CLASS_MISMATCH, "dataset SOP Class UID differs from the request's")

        try:
            verdict = header_scope(ds)
        except Exception as exc:
            return StoreOutcome(CANNOT_PARSE, f"header cannot be read ({type(exc).__name__})")
        record = ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            accession_number=str(ds.get("AccessionNumber", "") or "")[:16] or None,
            modality=str(ds.get("Modality", "") or "")[:16] or None,
            calling_aet=calling_aet,
            archive_path=self.archive.relative(self.archive.path_for(study_uid, series_uid, sop_uid)),
            size_bytes=size,
            sha256=sha256_of(tmp_file),
            transfer_syntax_uid=transfer_syntax,
            in_scope=verdict.in_scope,
            scope_reason=verdict.reason,
        )
        del ds

        with self._lock_for(sop_uid):
            try:
                existing = find_instance(self.engine, sop_uid)
            except SQLAlchemyError as exc:
                return StoreOutcome(DATABASE_UNAVAILABLE, "database unavailable", _short_error(exc))
            try:
                synced.result()  # every path below moves the received file: its data must be on disk first
            except OSError as exc:
                return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", _short_error(exc))
            if existing is None:
                return self._store_new(tmp_file, record)
            return self._store_duplicate(tmp_file, record, existing)

    def _store_new(self, tmp_file: Path, record: ReceivedInstance) -> StoreOutcome:
        target = self.archive.absolute(record.archive_path)
        try:
            self.archive.place(tmp_file, target)
        except OSError as exc:
            return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", _short_error(exc))
        try:
            job_id = record_new(self.engine, record)
        except SQLAlchemyError as exc:
            self.archive.remove(target)
            return StoreOutcome(DATABASE_UNAVAILABLE, "database commit failed",
                                f"file removed from the archive; {_short_error(exc)}")
        return StoreOutcome(SUCCESS, f"stored, job {job_id}, {record.scope_reason}")

    def _store_duplicate(self, tmp_file: Path, record: ReceivedInstance, existing: StoredInstance) -> StoreOutcome:
        target = self.archive.absolute(existing.archive_path)
        if existing.sha256 == record.sha256 and target.exists():
            self._audit("duplicate_identical", record, "identical content already archived; no new job")
            return StoreOutcome(SUCCESS, "identical duplicate, already stored")

        policy = self.duplicate_policy
        if policy == "same_source":
            policy = "always" if record.calling_aet == existing.calling_aet else "reject"
        if existing.sha256 == record.sha256:  # row present but file lost: restore it from this copy
            policy = "always"

        if policy == "reject":
            self._audit("duplicate_rejected", record, f"differs from archived sha256 {existing.sha256}")
            return StoreOutcome(DUPLICATE_CONFLICT, "SOP Instance UID already stored with different content")
        if policy == "never":
            try:
                aside = self.archive.set_aside(tmp_file, record.sop_instance_uid, record.sha256)
            except OSError as exc:
                return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", _short_error(exc))
            if not self._audit("duplicate_kept_aside", record, f"new content kept at {self.archive.relative(aside)}"):
                aside.unlink(missing_ok=True)
                return StoreOutcome(DATABASE_UNAVAILABLE, "database commit failed")
            return StoreOutcome(SUCCESS, "differing duplicate kept aside; archived copy unchanged")
        return self._replace(tmp_file, record, existing)

    def _replace(self, tmp_file: Path, record: ReceivedInstance, existing: StoredInstance) -> StoreOutcome:
        """Policy 'always': the new content takes the archive path; the old content is kept under conflicts/."""
        old = self.archive.absolute(existing.archive_path)
        new_target = self.archive.absolute(record.archive_path)
        aside: Path | None = None
        try:
            if old.exists() and existing.sha256 != record.sha256:
                aside = self.archive.set_aside(old, record.sop_instance_uid, existing.sha256)
            self.archive.place(tmp_file, new_target)
        except OSError as exc:
            if aside is not None:
                self.archive.place(aside, old)
            return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", _short_error(exc))
        try:
            job_id = record_replacement(self.engine, record, self.archive.relative(aside) if aside else "-")
        except SQLAlchemyError as exc:
            self.archive.remove(new_target)
            if aside is not None:
                self.archive.place(aside, old)
            return StoreOutcome(DATABASE_UNAVAILABLE, "database commit failed",
                                f"replacement undone; {_short_error(exc)}")
        return StoreOutcome(SUCCESS, f"replaced archived copy, job {job_id}")

    def _audit(self, kind: str, record: ReceivedInstance, detail: str) -> bool:
        try:
            record_event(self.engine, kind, record.sop_instance_uid, record.calling_aet, detail)
            return True
        except SQLAlchemyError as exc:
            LOG.error("audit event not recorded: %s", _short_error(exc))
            return False
