"""What happens to one received C-STORE dataset, from a temporary file to an acknowledged, queued instance.

The order is the contract with the sender: header check -> durable placement in the archive -> instance row and
job committed in one transaction -> Success. Every failure before that answers a failure status and leaves no
file in the archive. No pixel data is decoded here: analysis belongs to the worker processes. The instance row is
built by ``dicom_node.received.received_instance``, the builder reconciliation and the tests use as well.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ai.limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, read_dataset_bounded
from ai.safe_text import escape, exception_summary
from db.instances import (
    ReceivedInstance,
    StoredInstance,
    find_instance,
    record_event,
    record_new,
    record_replacement,
)

from .archive import Archive, InvalidUID, fsync_path, sha256_of
from .received import checked_uids, pixel_data_shortfall, received_instance
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


class Intake:
    """Stores received datasets durably and queues them; one instance serves every association thread."""

    def __init__(self, archive: Archive, engine: Engine, duplicate_policy: str,
                 limits: ImageLimits = DEFAULT_LIMITS, patient_key_secret: bytes | None = None,
                 on_queued: Callable[[], None] | None = None) -> None:
        self.archive = archive
        # called after a new job is committed (serve: ring the workers' doorbell, dicom_node.doorbell)
        self.on_queued = on_queued
        self.engine = engine
        self.duplicate_policy = duplicate_policy
        self.limits = limits
        self.patient_key_secret = patient_key_secret  # dicom_node.patient_key; None: rows get no key
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
            return StoreOutcome(IMAGE_TOO_LARGE, "image exceeds the node's size limits", exception_summary(exc))
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError, zlib.error) as exc:
            return StoreOutcome(CANNOT_PARSE, f"dataset cannot be parsed ({type(exc).__name__})")
        try:
            uids = checked_uids(ds)
        except InvalidUID as exc:
            return StoreOutcome(INVALID_UIDS, str(exc))  # a fixed text naming the attribute
        except Exception as exc:  # a malformed element value surfaces only when read
            return StoreOutcome(CANNOT_PARSE, f"dataset cannot be parsed ({type(exc).__name__})")
        try:
            short = pixel_data_shortfall(ds, size)
        except Exception as exc:  # a malformed Rows/Columns/Bits Allocated value
            return StoreOutcome(CANNOT_PARSE, "image pixel attributes cannot be read", exception_summary(exc))
        if short is not None:
            return StoreOutcome(CANNOT_PARSE, "pixel data shorter than the image attributes say", short)
        if uids.sop_instance != request_sop_instance:
            return StoreOutcome(SOP_INSTANCE_MISMATCH, "dataset SOP Instance UID differs from the request's")
        if uids.sop_class != request_sop_class:
            return StoreOutcome(SOP_CLASS_MISMATCH, "dataset SOP Class UID differs from the request's")

        try:
            record = received_instance(ds, self.archive, uids=uids, calling_aet=calling_aet, size_bytes=size,
                                       sha256=sha256_of(tmp_file), transfer_syntax_uid=transfer_syntax,
                                       patient_key_secret=self.patient_key_secret)
        except OSError as exc:
            return StoreOutcome(OUT_OF_RESOURCES, "received file cannot be read", exception_summary(exc))
        except Exception as exc:
            return StoreOutcome(CANNOT_PARSE, f"header cannot be read ({type(exc).__name__})")
        del ds

        with self._lock_for(record.sop_instance_uid):
            try:
                existing = find_instance(self.engine, record.sop_instance_uid)
            except SQLAlchemyError as exc:
                return StoreOutcome(DATABASE_UNAVAILABLE, "database unavailable", exception_summary(exc))
            try:
                synced.result()  # every path below moves the received file: its data must be on disk first
            except OSError as exc:
                return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", exception_summary(exc))
            if existing is None:
                return self._store_new(tmp_file, record)
            return self._store_duplicate(tmp_file, record, existing)

    def _store_new(self, tmp_file: Path, record: ReceivedInstance) -> StoreOutcome:
        target = self.archive.absolute(record.archive_path)
        try:
            self.archive.place(tmp_file, target)
        except OSError as exc:
            return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", exception_summary(exc))
        try:
            job_id = record_new(self.engine, record)
        except SQLAlchemyError as exc:
            self.archive.remove(target)
            return StoreOutcome(DATABASE_UNAVAILABLE, "database commit failed",
                                f"file removed from the archive; {exception_summary(exc)}")
        self._queued()
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
                return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", exception_summary(exc))
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
            return StoreOutcome(OUT_OF_RESOURCES, "archive write failed", exception_summary(exc))
        try:
            job_id = record_replacement(self.engine, record, self.archive.relative(aside) if aside else "-")
        except SQLAlchemyError as exc:
            self.archive.remove(new_target)
            if aside is not None:
                self.archive.place(aside, old)
            return StoreOutcome(DATABASE_UNAVAILABLE, "database commit failed",
                                f"replacement undone; {exception_summary(exc)}")
        self._queued()
        return StoreOutcome(SUCCESS, f"replaced archived copy, job {job_id}")

    def _queued(self) -> None:
        if self.on_queued is not None:
            try:
                self.on_queued()
            except Exception as exc:  # noqa: BLE001 - only a wake-up: the workers' poll finds the job anyway
                LOG.warning("waking the workers failed (%s)", exception_summary(exc))

    def _audit(self, kind: str, record: ReceivedInstance, detail: str) -> bool:
        try:
            record_event(self.engine, kind, record.sop_instance_uid, record.calling_aet, detail)
            return True
        except SQLAlchemyError as exc:
            LOG.error("audit event not recorded: %s", exception_summary(exc))
            return False
