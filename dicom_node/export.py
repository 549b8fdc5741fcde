"""Sending result objects to the configured destinations (PACS), with persisted retries.

The export rows live in the database (``db.exports``): an exporter claims the due ones under a lease, sends them
grouped by destination over one association each, and records every outcome, so a restart, a crash or a PACS that is
down for hours loses nothing. A failed attempt is retried after ``export.retry_initial_seconds``, doubling up to
``export.retry_max_seconds``; after ``export.max_attempts`` failed attempts the export is dead-lettered until
``dicom-node resend``. A destination that cannot be reached (connection refused, association rejected or aborted)
is replaced by its ``alternate``, when it has one, within the same attempt.

``Exporter.start()`` runs the rounds on an APScheduler background job every ``export.poll_seconds``; ``wake()``
brings the next round forward for a caller in the same process (workers run in their own processes, so their
results wait at most ``export.poll_seconds``); ``run_once()`` runs one round in the caller's thread. Log lines
name exports by id and UIDs, never patients.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from db.exports import ClaimedExport, claim_due, extend_lease, mark_sent, schedule_retry
from db.models import ExportState

from .config import NodeConfig
from .store_scu import Peer, PeerUnreachable, StoreClient, StoreItem, StoreOutcome

LOG = logging.getLogger("dicom_node.export")
JOB_ID = "export"
DEFAULT_BATCH_SIZE = 16


class _DropSkippedRuns(logging.Filter):
    """A round longer than the poll interval makes APScheduler skip the next tick with a warning: expected here
    (``max_instances=1``), so not worth a log line every ``poll_seconds``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


EXECUTOR = "dicom_node_export"
_SCHEDULER_LOG = logging.getLogger("dicom_node.export.scheduler")
_SCHEDULER_LOG.addFilter(_DropSkippedRuns())
# APScheduler says "Running job ..." and "... executed successfully" at INFO on every poll: only its warnings here,
# unless the operator set these (our own) loggers' levels.
for _name in (_SCHEDULER_LOG.name, f"apscheduler.executors.{EXECUTOR}"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


def _utcnow_aware() -> datetime:
    return datetime.now(timezone.utc)


class Exporter:
    """Sends due exports. Thread-safe: rounds never overlap within one exporter; several exporters (processes)
    share the work through the database leases."""

    def __init__(self, config: NodeConfig, engine: Engine, storage_root: Path | str, *, owner: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.engine = engine
        self.storage_root = Path(storage_root)
        self.destinations: dict[str, dict[str, Any]] = {d["name"]: d for d in config["export.destinations"]}
        self.initial = float(config["export.retry_initial_seconds"])
        self.cap = float(config["export.retry_max_seconds"])
        self.max_attempts = int(config["export.max_attempts"])
        self.poll_seconds = float(config["export.poll_seconds"])
        self.timeout = float(config["export.timeout_seconds"])
        self.batch_size = batch_size
        self.owner = owner or f"exporter-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.client = StoreClient(config["network.ae_title"], self.timeout)
        self._round_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._job_running = False
        self._rerun = False
        self._scheduler: Any = None

    # -- scheduling ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run rounds in the background every ``export.poll_seconds``, the first one now."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        if self._scheduler is not None:
            return
        scheduler = BackgroundScheduler(timezone=timezone.utc, logger=_SCHEDULER_LOG,
                                        executors={EXECUTOR: ThreadPoolExecutor(1)})
        scheduler.add_job(self._job, "interval", seconds=self.poll_seconds, id=JOB_ID, name="export",
                          executor=EXECUTOR, max_instances=1, coalesce=True, misfire_grace_time=None,
                          next_run_time=_utcnow_aware())
        scheduler.start()
        self._scheduler = scheduler
        LOG.info("exporter %s: %d destination(s) (%s), polling every %g s", self.owner, len(self.destinations),
                 ", ".join(self.destinations) or "none: results stay under the storage root", self.poll_seconds)

    def stop(self, wait: bool = True) -> None:
        """Stop polling; with ``wait``, let a round in progress finish (its objects are recorded)."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=wait)

    def wake(self) -> None:
        """Start a round now instead of at the next poll (or right after the round in progress)."""
        with self._state_lock:
            if self._job_running:
                self._rerun = True
                return
        scheduler = self._scheduler
        if scheduler is None:
            return
        from apscheduler.jobstores.base import JobLookupError
        from apscheduler.schedulers import SchedulerNotRunningError

        try:
            scheduler.modify_job(JOB_ID, next_run_time=_utcnow_aware())  # wakes the scheduler up
        except (JobLookupError, SchedulerNotRunningError):
            pass  # stopping

    def _job(self) -> None:
        with self._state_lock:
            self._job_running, self._rerun = True, False
        try:
            while True:
                claimed, _ = self._round()
                with self._state_lock:  # checked and cleared together with wake()'s flag: no wake is lost
                    if claimed < self.batch_size and not self._rerun:
                        self._job_running = False
                        return
                    self._rerun = False  # a full batch (more may be due) or a wake() during the round
        except Exception:  # noqa: BLE001 - e.g. the database locked beyond its timeout: try again at the next poll
            with self._state_lock:
                self._job_running = False
            LOG.exception("export round failed; retrying at the next poll")

    # -- one round -------------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim the exports due now (up to the batch size), send them, record the outcomes; returns how many
        were sent. Exports retried during this round are not tried again in it, however short their backoff."""
        return self._round()[1]

    @property
    def lease_seconds(self) -> float:
        # Worst case of one destination's share of a batch: two association attempts (primary, alternate), then
        # one DIMSE exchange per object; the lease is extended whenever an association is re-opened.
        return self.timeout * (self.batch_size + 4)

    def _round(self) -> tuple[int, int]:
        if not self.destinations:
            return 0, 0
        with self._round_lock:
            claimed = claim_due(self.engine, self.owner, self.lease_seconds, self.batch_size,
                                destinations=list(self.destinations), max_attempts=self.max_attempts)
            groups: OrderedDict[str, list[ClaimedExport]] = OrderedDict()
            for export in claimed:
                groups.setdefault(export.destination, []).append(export)
            sent = sum(self._send_group(self.destinations[name], exports) for name, exports in groups.items())
            return len(claimed), sent

    def _item(self, export: ClaimedExport) -> StoreItem:
        return StoreItem(self.storage_root / export.archive_path, export.sop_class_uid, export.transfer_syntax_uid)

    def _send_group(self, destination: dict[str, Any], exports: list[ClaimedExport]) -> int:
        peers = [Peer.from_config(destination)]
        if destination.get("alternate"):
            peers.append(Peer.from_config(destination["alternate"]))
        sent = 0
        remaining = []
        for export in exports:
            if self._item(export).path.is_file():
                remaining.append(export)
            else:
                self._record(export, StoreOutcome(False, error="result file missing under the storage root: "
                                                               f"{export.archive_path}", local=True), None)
        first = True
        while remaining:
            if not first:
                extend_lease(self.engine, [e.export_id for e in remaining], self.owner, self.lease_seconds)
            first = False
            try:
                association = self.client.open(peers, [self._item(e) for e in remaining])
            except PeerUnreachable as exc:
                for export in remaining:
                    self._record(export, StoreOutcome(False, error=str(exc)), None)
                break
            with association:
                # The association may drop mid-batch: the object in flight fails, the rest go over a new one.
                while remaining and association.is_established:
                    export = remaining.pop(0)
                    outcome = association.store(self._item(export))
                    sent += self._record(export, outcome, association.peer)
        return sent

    def _record(self, export: ClaimedExport, outcome: StoreOutcome, peer: Peer | None) -> bool:
        """Persist one outcome and log it; returns whether the export now counts as sent by this round."""
        what = f"export {export.export_id} ({export.kind} {export.sop_instance_uid}) to {export.destination}"
        status = f"0x{outcome.status:04X}" if outcome.status is not None else "-"
        if outcome.stored and peer is not None:
            if mark_sent(self.engine, export.export_id, self.owner, str(peer), outcome.status):
                LOG.info("%s: sent to %s on attempt %d, status %s", what, peer, export.attempt, status)
                return True
            LOG.warning("%s: sent to %s but the lease was lost meanwhile; the new owner records it", what, peer)
            return False
        state = schedule_retry(self.engine, export.export_id, self.owner, outcome.status, outcome.error or "failed",
                               self.initial, self.cap, self.max_attempts, retryable=not outcome.local)
        if state is None:
            LOG.warning("%s: attempt %d failed (%s) but the lease was lost meanwhile", what, export.attempt,
                        outcome.error)
        elif state == ExportState.DEAD:
            LOG.error("%s: dead after attempt %d, status %s: %s (dicom-node resend queues it again)", what,
                      export.attempt, status, outcome.error)
        else:
            LOG.warning("%s: attempt %d failed, status %s: %s; will retry", what, export.attempt, status,
                        outcome.error)
        return False
