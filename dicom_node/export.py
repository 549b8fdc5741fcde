"""Sending result objects to the configured destinations (PACS), with persisted retries.

The export rows live in the database (``db.exports``): an exporter claims the due ones under a lease, sends them
over one association per destination and round, and records every outcome, so a restart, a crash or a PACS that is
down for hours loses nothing. A failed attempt is retried after ``export.retry_initial_seconds``, doubling up to
``export.retry_max_seconds``; after ``export.max_attempts`` failed attempts the export is dead-lettered until
``dicom-node resend``. A destination that cannot be reached (connection refused, association rejected, aborted or
not completed in time) is replaced by its ``alternate``, when it has one, within the same attempt. A destination with
``tls = true`` (primary and alternate) is sent to over TLS with the ``[tls]`` section's files (``dicom_node.tls``,
``docs/tls.md``): a PACS certificate that does not verify fails the attempt like an unreachable peer, with the reason.

No head-of-line blocking: every destination is a *lane* of its own, with its own claim (``claim_due`` restricted to
its name, up to ``batch_size`` exports), its own round and its own thread, so a PACS that is down, slow or hung
delays only its own exports. A hung PACS costs one ``export.deadline_seconds`` per round, not one timeout per
object: each association setup and each C-STORE runs under a watchdog (``store_scu.Watchdog``) that aborts the
association past that deadline, however the peer keeps the connection alive; the object in flight is then retried
with backoff, and the batch's other exports, not tried, go back to pending without spending an attempt
(``db.exports.give_back``), due when the failed one is (the destination stalled) or at once (it dropped the
association: the next round opens a new one).

``Exporter.start(scheduler)`` registers the rounds on the process's one scheduler (``dicom_node.scheduler``, which
``serve`` owns): one interval job ``export:NAME`` per destination every ``export.poll_seconds``, on an executor with a
thread per destination; ``stop()`` removes them and waits for the rounds in progress. ``wake()`` brings every
destination's next round forward for a caller in the same process (workers run in their own processes, so their
results wait at most ``export.poll_seconds``); ``run_once()`` runs one round for every destination, concurrently,
and returns when all of them are done. Log lines
name exports by id and UIDs, never patients; peers' AE titles and hosts are escaped, exception texts withheld
(``ai.safe_text``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from ai.safe_text import escape
from db.exports import ClaimedExport, backoff_seconds, claim_due, extend_lease, give_back, mark_sent, schedule_retry
from db.models import ExportState

from .archive import drop_cached
from .config import Destination, NodeConfig, Peer, TlsSettings
from .scheduler import NodeScheduler
from .store_scu import ABORT_GRACE_SECONDS, PeerUnreachable, StoreClient, StoreItem, StoreOutcome
from .tls import RecordingContext, client_context

LOG = logging.getLogger("dicom_node.export")
JOB_ID = "export"  # the scheduler job of destination NAME is "export:NAME"
EXECUTOR = "export"  # the scheduler's executor of the export rounds: one thread per destination
DEFAULT_BATCH_SIZE = 16


def export_step_seconds(deadline: float) -> float:
    """The longest one step of a round takes: an association setup or one C-STORE (the watchdog's ``deadline``,
    then the abort), or decoding one object for an uncompressed syntax (covered by the margin)."""
    return deadline + 2 * ABORT_GRACE_SECONDS


def export_lease_seconds(deadline: float) -> float:
    """An exporter's lease on the exports it claimed: long enough for the association (primary, then alternate)
    and the first C-STORE; a round renews the lease of the exports it still holds whenever less than two steps'
    worth of it remains, so only a dead exporter's lease ever expires (``db.exports.reclaim_expired``)."""
    return 3 * export_step_seconds(deadline) + 30


@dataclass(eq=False)
class _Lane:
    """One destination: its peers, its round lock and its scheduling state."""

    name: str
    destination: Destination
    round_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    running: bool = False  # its scheduled job is in a round (or between two)
    rerun: bool = False  # run another round as soon as this one ends

    @property
    def job_id(self) -> str:
        return f"{JOB_ID}:{self.name}"

    @property
    def peers(self) -> list[Peer]:
        return list(self.destination.peers)


class Exporter:
    """Sends due exports, every destination independently of the others. Thread-safe: rounds of one destination
    never overlap within one exporter; several exporters (processes) share the work through the database leases."""

    def __init__(self, config: NodeConfig, engine: Engine, storage_root: Path | str, *, owner: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.engine = engine
        self.storage_root = Path(storage_root)
        settings = config.export
        self.destinations: dict[str, Destination] = {d.name: d for d in settings.destinations}
        self.initial = settings.retry_initial_seconds
        self.cap = settings.retry_max_seconds
        self.max_attempts = settings.max_attempts
        self.poll_seconds = settings.poll_seconds
        self.timeout = settings.timeout_seconds
        self.deadline = settings.deadline_seconds
        self.batch_size = batch_size
        self.owner = owner or f"exporter-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.client = StoreClient(config.network.ae_title, self.timeout, self.deadline)
        self.tls: TlsSettings = config.tls
        if any(d.tls for d in self.destinations.values()):
            client_context(self.tls)  # a ConfigError naming the key now, not at the first round
        self._lanes = {name: _Lane(name, dest) for name, dest in self.destinations.items()}
        self._stopping = threading.Event()
        self._scheduler: NodeScheduler | None = None
        self._rounds = threading.Condition()  # guards _running_jobs
        self._running_jobs = 0  # scheduled jobs (lanes) in a round right now

    # -- scheduling ------------------------------------------------------------------------------------------

    def start(self, scheduler: NodeScheduler) -> None:
        """Register the rounds on ``scheduler``: every destination every ``export.poll_seconds``, the first ones
        as soon as the scheduler runs."""
        if self._scheduler is not None:
            return
        self._stopping.clear()
        if not scheduler.has_executor(EXECUTOR):
            scheduler.add_executor(EXECUTOR, len(self._lanes))
        for lane in self._lanes.values():
            scheduler.every(lane.job_id, self.poll_seconds, self._job, args=(lane,), executor=EXECUTOR,
                            run_now=True)
        self._scheduler = scheduler
        LOG.info("exporter %s: %d destination(s) (%s), each in its own thread, polling every %g s, C-STORE deadline "
                 "%g s", escape(self.owner), len(self.destinations),
                 ", ".join(escape(name) for name in self.destinations) or "none: results stay under the storage root",
                 self.poll_seconds, self.deadline)

    def stop(self, wait: bool = True) -> None:
        """Stop polling; with ``wait``, let the rounds in progress finish the object each has in flight (at most
        about ``export.deadline_seconds``); their other claimed exports go back to pending, untried."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        self._stopping.set()
        for lane in self._lanes.values():
            scheduler.remove(lane.job_id)
        if wait:
            with self._rounds:
                self._rounds.wait_for(lambda: self._running_jobs == 0)

    def wake(self) -> None:
        """Start a round of every destination now instead of at the next poll (or right after its round in
        progress)."""
        scheduler = self._scheduler
        for lane in self._lanes.values():
            with lane.state_lock:
                if lane.running:
                    lane.rerun = True
                    continue
            if scheduler is None:
                continue
            if not scheduler.run_now(lane.job_id):
                return  # stopping

    def _job(self, lane: _Lane) -> None:
        with self._rounds:
            if self._stopping.is_set():  # a run the scheduler had already handed to a thread when stop() came
                return
            self._running_jobs += 1
        try:
            self._rounds_of(lane)
        finally:
            with self._rounds:
                self._running_jobs -= 1
                self._rounds.notify_all()

    def _rounds_of(self, lane: _Lane) -> None:
        """The scheduled job of ``lane``: rounds until no more are due (a round short of a full batch and no
        wake() meanwhile) or the exporter stops."""
        with lane.state_lock:
            lane.running, lane.rerun = True, False
        try:
            while not self._stopping.is_set():
                claimed, _ = self._round(lane, interruptible=True)
                with lane.state_lock:  # checked and cleared together with wake()'s flag: no wake is lost
                    if claimed < self.batch_size and not lane.rerun:
                        lane.running = False
                        return
                    lane.rerun = False  # a full batch (more may be due), a wake() or a drop during the round
        except Exception:  # noqa: BLE001 - e.g. the database locked beyond its timeout: try at the next poll
            LOG.exception("export round for %s failed; retrying at the next poll", escape(lane.name))
        with lane.state_lock:
            lane.running = False

    # -- one round -------------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One round for every destination, concurrently (a thread each when there are several): claim the
        exports due now (up to the batch size per destination), send them, record the outcomes. Returns, once
        every destination's round is done, how many were sent. Exports retried during this round are not tried
        again in it, however short their backoff. An error of one destination's round (the database) is raised
        after the others finished."""
        lanes = list(self._lanes.values())
        if len(lanes) <= 1:
            return sum(self._round(lane)[1] for lane in lanes)
        results: dict[str, int] = {}
        errors: list[BaseException] = []

        def run(lane: _Lane) -> None:
            try:
                results[lane.name] = self._round(lane)[1]
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(lane,), name=f"export-once-{lane.name}", daemon=True)
                   for lane in lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return sum(results.values())

    @property
    def step_seconds(self) -> float:
        return export_step_seconds(self.deadline)

    @property
    def lease_seconds(self) -> float:
        return export_lease_seconds(self.deadline)

    def _round(self, lane: _Lane, interruptible: bool = False) -> tuple[int, int]:
        """Claim and send one batch of ``lane``'s due exports; (claimed, sent). An ``interruptible`` round (the
        scheduler's) stops after the object in flight when ``stop()`` is called."""
        with lane.round_lock:
            leased_at = time.monotonic()
            claimed = claim_due(self.engine, self.owner, self.lease_seconds, self.batch_size,
                                destinations=[lane.name], max_attempts=self.max_attempts)
            if not claimed:
                return 0, 0
            return len(claimed), self._send_batch(lane, claimed, leased_at, interruptible)

    def _item(self, export: ClaimedExport) -> StoreItem:
        return StoreItem(self.storage_root / export.archive_path, export.sop_class_uid, export.transfer_syntax_uid)

    def _send_batch(self, lane: _Lane, exports: list[ClaimedExport], leased_at: float, interruptible: bool) -> int:
        """One association for the batch; returns how many were sent."""
        sent = 0
        remaining = []
        for export in exports:
            if self._item(export).path.is_file():
                remaining.append(export)
            else:
                self._record(export, StoreOutcome(False, error="result file missing under the storage root: "
                                                               f"{escape(export.archive_path)}", local=True), None)
        if not remaining:
            return 0
        lease_until = leased_at + self.lease_seconds

        def keep_lease() -> None:
            nonlocal lease_until
            if lease_until - time.monotonic() < 2 * self.step_seconds:
                lease_until = time.monotonic() + self.lease_seconds
                extend_lease(self.engine, [e.export_id for e in remaining], self.owner, self.lease_seconds)

        try:
            association = self.client.open(lane.peers, [self._item(e) for e in remaining],
                                           tls=self._tls_context if lane.destination.tls else None)
        except PeerUnreachable as exc:
            for export in remaining:
                self._record(export, StoreOutcome(False, error=str(exc)), None)
            return 0
        with association:
            while remaining:
                if interruptible and self._stopping.is_set():
                    self._give_back(lane, remaining, 0.0, None, "the exporter is stopping")
                    break
                keep_lease()
                export = remaining.pop(0)
                item = self._item(export)
                outcome = association.store(item)
                if outcome.stored:
                    drop_cached(item.path)  # sent: its pages need not stay cached (dicom_node.archive.drop_cached)
                sent += self._record(export, outcome, association.peer)
                if remaining and not association.is_established:
                    self._after_lost_association(lane, export, outcome, remaining, association.peer)
                    break
        return sent

    def _tls_context(self) -> RecordingContext:
        """A TLS destination's context for one association (``dicom_node.tls.client_context``)."""
        return client_context(self.tls)

    def _after_lost_association(self, lane: _Lane, failed: ClaimedExport, outcome: StoreOutcome,
                                untried: list[ClaimedExport], peer: Peer) -> None:
        """The association ended under ``failed``: no second one in this round. When the peer stalled, the
        untried exports wait as long as the failed one (the destination backs off as a whole); when it dropped the
        association, they are due at once and the destination runs another round right away."""
        if outcome.stalled:
            delay = backoff_seconds(failed.attempt, self.initial, self.cap)
            note = f"not tried: {peer.safe} stopped answering earlier in the batch; due with export {failed.export_id}"
            self._give_back(lane, untried, delay, note, f"{peer.safe} stalled")
        else:
            self._give_back(lane, untried, 0.0, None, f"the association with {peer.safe} ended")
            with lane.state_lock:
                lane.rerun = True

    def _give_back(self, lane: _Lane, exports: list[ClaimedExport], delay: float, note: str | None,
                   why: str) -> None:
        ids = [e.export_id for e in exports]
        returned = give_back(self.engine, ids, self.owner, delay, note)
        LOG.warning("%s: %d export(s) not tried (%s), pending again without spending an attempt, due in %g s: %s",
                    escape(lane.name), returned, why, delay, ", ".join(map(str, ids)))
        exports.clear()

    def _record(self, export: ClaimedExport, outcome: StoreOutcome, peer: Peer | None) -> bool:
        """Persist one outcome and log it; returns whether the export now counts as sent by this round."""
        what = (f"export {export.export_id} ({export.kind} {escape(export.sop_instance_uid)}) to "
                f"{escape(export.destination)}")
        status = f"0x{outcome.status:04X}" if outcome.status is not None else "-"
        error = escape(outcome.error or "failed", 1000)
        if outcome.stored and peer is not None:
            if mark_sent(self.engine, export.export_id, self.owner, str(peer), outcome.status):
                LOG.info("%s: sent to %s on attempt %d, status %s", what, peer.safe, export.attempt, status)
                return True
            LOG.warning("%s: sent to %s but the lease was lost meanwhile; the new owner records it", what, peer.safe)
            return False
        state = schedule_retry(self.engine, export.export_id, self.owner, outcome.status, error,
                               self.initial, self.cap, self.max_attempts, retryable=not outcome.local)
        if state is None:
            LOG.warning("%s: attempt %d failed (%s) but the lease was lost meanwhile", what, export.attempt, error)
        elif state == ExportState.DEAD:
            LOG.error("%s: dead after attempt %d, status %s: %s (dicom-node resend queues it again)", what,
                      export.attempt, status, error)
        else:
            LOG.warning("%s: attempt %d failed, status %s: %s; will retry", what, export.attempt, status, error)
        return False
