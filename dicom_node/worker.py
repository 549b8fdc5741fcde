"""The analysis worker: it orchestrates; what an analysis does and what the result objects hold belong to ``ai``
and ``dicom_node.results``.

Each batch goes through named steps: *claim* up to ``worker.batch_size`` jobs (``db.queue.claim``), *read* each
archived source (``_read``), *analyse* the readable ones in one call of the injected analysis function (``analyse``,
``ai.analyse_batch`` in production), *build* the result objects (``ResultBuilders``: ``dicom_node.results``),
*write* them under the storage root (``ResultStore``) and *record* them with their exports in fenced transactions:
an analysed job's report (SR and SEG) first (``db.results.record_report``), so that it is sent while the heat-map
SC is drawn and encoded, then the SC with the job's final state (``db.results.finish_job``); any other outcome in
one commit. Whether a source is one of the node's own results is
``dicom_node.results.identity.is_own_result``; the node's identity comes from ``NodeIdentity.from_config``.

One worker is one process (the models load once per process, with ``worker.threads`` CPU threads, and are warmed
with highdicom's tables before the first job). In ``run`` the build, write and record steps of a batch happen on a
second thread, the *results lane*, while the model thread claims, reads and analyses the next batch: the models
release the GIL, so on two cores encoding the result objects costs the next analysis almost nothing (measured in
docs/benchmarks.md). ``run_once`` alone (as the tests call it) stays synchronous. Before each claim it
looks up the registry's
champion (``dicom_node.champion``): a promotion or a rollback reaches its next batch without a restart.
``dicom-node serve`` supervises ``worker.processes`` of them; ``dicom-node worker`` runs one alone, e.g. on a GPU
host that shares the database and the storage root. Outcomes per job:

- analysed: SEG + SR + heat-map SC, job ``done``. The SR and SEG are recorded (and sent) before the SC is built;
  if the SC then cannot be encoded, or the attempts run out while writing it or drawing it kills the worker, the
  job still ends ``done`` with its report and a ``heat_map_missing`` audit event, never with a second, "not
  analysed" SR that would contradict the one in PACS;
- refused by header or pixels (not a frontal chest, ...): a "not analysed" SR with the reason, job ``not_analysed``;
- failed: transient errors (an archive file that cannot be read, a model error) are retried up to
  ``queue.max_attempts``; permanent ones (pixels that cannot be decoded, a decoder that crashed) are not. The job
  ends ``failed`` with its reason and a "not analysed" SR that says why;
- results that cannot be encoded (a header highdicom refuses even after coercion): a last-resort "not analysed:
  result encoding error" SR, job ``failed``;
- a job whose worker died or hung (lease expired) is retried alone, and after its last attempt gets its "not
  analysed" SR without being analysed again.

Each worker keeps a heartbeat row (``db.workers``): written at start with whether its models loaded (a worker
whose models fail to load keeps running, so its jobs still end with "not analysed" SRs, and the readiness check
reports it), refreshed at most every ``HEARTBEAT_SECONDS`` from the loop, stopped on a clean stop.

Only if even the last-resort SR cannot be written does a job end without an object; ``db.results`` then records an
audit event and ``dicom-node status`` counts it. Nothing here logs or stores an exception's own text: pydicom,
highdicom and the decoders quote dataset values in theirs (``ai.safe_text.exception_summary``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError

from ai.limits import ImageTooLarge, read_dataset_bounded
from ai.model_info import ModelInfo
from ai.safe_text import escape, exception_summary
from db.findings import FindingValues
from db.instances import instance_uids
from db.models import JobState
from db.queue import ClaimedJob, claim, fail
from db.results import ResultFile, finish_job, record_report, reported_results
from db.workers import HEARTBEAT_SECONDS, beat, models_json, upsert
from db.workers import stop as stop_heartbeat

from .archive import Archive, drop_cached
from .champion import ChampionWatch
from .config import NodeConfig
from .doorbell import WorkerBells
from .log_safety import format_exception_safely
from .result_store import ResultStore
from .results import NodeIdentity, ResultObject, build_last_resort_sr, build_picture, build_report, coerce_header
from .results.identity import is_own_result
from .results.uids import model_versions

LOG = logging.getLogger("dicom_node.worker")

AnalyseBatch = Callable[..., list[Any]]
"""``ai.analyse_batch``'s signature: (datasets, device=...) -> one AnalysisRecord per dataset, in order."""

BuildObjects = Callable[..., list[ResultObject]]

EXPORT_ORDER = {"sr": 0, "seg": 1, "sc": 2}
"""The order in which a job's result objects are recorded, hence exported: the report first (what the radiologist
reads, and what says "not analysed"), the lung fields next, the largest object (the 2k RGB picture) last."""

STOPPING_DATABASE_WAIT_S = 4.0
"""Once the worker is stopping, the results lane stops waiting for an unavailable database after this backoff step
(about 7.5 s in all); the jobs in hand then go back to the queue when their leases expire."""


@dataclass(frozen=True)
class ResultBuilders:
    """How the worker turns an outcome into result objects (``dicom_node.results``'s builders, by default)."""

    report: BuildObjects = build_report  # (coerced header, record, identity): SEG + SR, or the "not analysed" SR
    picture: BuildObjects = build_picture  # (coerced header, record, identity): the heat-map SC, or nothing
    last_resort: BuildObjects = build_last_resort_sr  # (header, reason, explanation, identity, models)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _log_traceback(job_id: int) -> None:
    """The traceback of the exception being handled, at DEBUG, frames only (no exception texts)."""
    if LOG.isEnabledFor(logging.DEBUG):
        LOG.debug("job %d traceback: %s", job_id, format_exception_safely(*sys.exc_info()))


class DatabaseBackoff:
    """Bounded exponential backoff for transient database errors: 0.5 s doubling up to 30 s."""

    def __init__(self, first: float = 0.5, longest: float = 30.0) -> None:
        self.first, self.longest = first, longest
        self.current = 0.0

    def next_delay(self) -> float:
        self.current = self.first if self.current == 0 else min(self.longest, self.current * 2)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class Heartbeat:
    """This worker's row in ``db.workers``. Every write is best effort and off the worker's thread: a locked or
    unreachable database (a write may wait out SQLite's 30 s busy timeout) never delays the queue, a database error
    is logged once per outage (type only), and while one write waits the next beats are dropped, not queued."""

    def __init__(self, engine: Engine, name: str, device: str) -> None:
        self.engine, self.name, self.device = engine, name, device
        self.jobs_done = 0
        self._due = 0.0
        self._failing = False
        self._writes: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._writer, name="heartbeat", daemon=True)
        self._thread.start()

    def _writer(self) -> None:
        while (action := self._writes.get()) is not None:
            try:
                action()
            except SQLAlchemyError as exc:
                if not self._failing:
                    LOG.warning("worker heartbeat not recorded (%s)", exception_summary(exc))
                self._failing = True
                continue
            self._failing = False

    def _write(self, action: Callable[[], None]) -> None:
        try:
            self._writes.put_nowait(action)
        except queue.Full:  # the previous write still waits for the database: this beat is dropped
            pass

    def start(self, models_ok: bool, models_detail: str) -> None:
        self._due = time.monotonic() + HEARTBEAT_SECONDS
        self._write(lambda: upsert(self.engine, self.name, host=socket.gethostname(), pid=os.getpid(),
                                   device=self.device, models_ok=models_ok, models_detail=models_detail))

    def tick(self) -> None:
        """Called from the loop: writes only when a heartbeat is due."""
        now = time.monotonic()
        if now >= self._due:
            self._due = now + HEARTBEAT_SECONDS
            self._write(lambda: beat(self.engine, self.name, self.jobs_done))

    def stop(self, timeout: float = 5.0) -> None:
        """Record the clean stop (waiting up to ``timeout`` for a write in hand) and end the writer thread."""
        done = self.jobs_done
        try:
            self._writes.put(lambda: stop_heartbeat(self.engine, self.name, done), timeout=timeout)
            self._writes.put(None, timeout=timeout)
        except queue.Full:  # the database has not answered for the whole timeout: the row will look dead
            LOG.warning("worker heartbeat: the clean stop could not be recorded (database busy)")
            return
        self._thread.join(timeout)


@dataclass
class _Task:
    job: ClaimedJob
    source: Dataset | None = None
    error: str | None = None  # log-safe: reading the archived file failed, or the analysis raised
    retryable: bool = True
    reason: str = "unreadable_file"  # why reading failed


class Worker:
    """``analyse`` is the analysis function (``ai.analyse_batch`` in production; the command line passes it in, so
    torch loads only where a worker runs); ``builders`` the result object builders."""

    def __init__(self, config: NodeConfig, engine: Engine, archive: Archive, owner: str | None = None, *,
                 analyse: AnalyseBatch, builders: ResultBuilders = ResultBuilders(),
                 bells: WorkerBells | None = None) -> None:
        self.config = config
        self.engine = engine
        self.archive = archive
        self.owner = owner or worker_id()
        self.store = ResultStore(archive)
        self.analyse = analyse
        self.builders = builders
        self.limits = config.limits
        self.identity = NodeIdentity.from_config(config)
        device = config.worker.device
        self.device = None if device == "auto" else device
        self.model_dir = config.models.directory
        # what the analysis needs besides the images: the site's models (models.directory), the image limits and
        # the registry champion's classifier file (None: the installed one), looked up between batches
        self.precision = config.worker.precision
        self.analysis_options: dict[str, Any] = {"model_dir": self.model_dir, "limits": self.limits,
                                                 "classifier_path": None, "precision": self.precision}
        self.champion = ChampionWatch(engine, archive.root, device=self.device, model_dir=self.model_dir,
                                      worker=self.owner, precision=self.precision)
        self.export_routes = config.export.routes  # destination -> result kinds
        self.bells = bells  # serve's doorbells (dicom_node.doorbell); None: poll only
        self._writers = ThreadPoolExecutor(max_workers=len(EXPORT_ORDER), thread_name_prefix="result-write")
        self._lane: queue.Queue[tuple[_Task, Any, float] | None] | None = None  # set while ``run`` runs

    # -- loop -------------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; finishes the batch in hand, and the results lane's, before returning."""
        heartbeat = Heartbeat(self.engine, self.owner, _device_name(self.device))
        try:
            models = self.warm_up()
        except Exception as exc:  # noqa: BLE001 - a broken model file: keep running, its jobs get "not analysed" SRs
            reason = exception_summary(exc, message="the models failed to load")
            LOG.error("worker %s: the models failed to load (%s); its jobs will end with 'not analysed' SRs",
                      escape(self.owner), reason)
            heartbeat.start(False, reason)
        else:
            heartbeat.start(True, models_json(models))
        LOG.info("worker %s ready (device %s, batch %d, %d model thread(s))", escape(self.owner),
                 self.device or "auto", self.config.worker.batch_size, _model_threads())
        lane: queue.Queue[tuple[_Task, Any, float] | None] = queue.Queue(maxsize=2 * self.config.worker.batch_size)
        results = threading.Thread(target=self._results_lane, args=(lane, stop), name="results-lane", daemon=True)
        results.start()
        self._lane = lane
        backoff = DatabaseBackoff()
        try:
            while not stop.is_set():
                heartbeat.tick()
                try:
                    claimed = self.run_once()
                except (OperationalError, InterfaceError, DisconnectionError) as exc:
                    # locked, busy, connection dropped: the queue is still there; wait and look again, never exit
                    delay = backoff.next_delay()
                    LOG.warning("database unavailable (%s); retrying in %.1f s", exception_summary(exc), delay)
                    stop.wait(delay)
                    continue
                backoff.reset()
                heartbeat.jobs_done += claimed
                if claimed == 0:
                    self._wait_for_jobs(stop)
                else:
                    self._results_recorded()  # jobs that ended on this thread (unreadable, lost): exports are due
        finally:
            self._lane = None
            lane.put(None)  # after the conclusions already queued: the lane finishes them, then ends
            results.join()
        heartbeat.stop()  # a clean stop only: a worker that raised out of here is left to look dead

    def _wait_for_jobs(self, stop: threading.Event) -> None:
        """The idle wait: until serve rings (a job was queued) or ``worker.poll_seconds`` pass."""
        if self.bells is None:
            stop.wait(self.config.worker.poll_seconds)
        else:
            self.bells.wait_for_jobs(self.config.worker.poll_seconds)

    def _results_recorded(self) -> None:
        if self.bells is not None:
            self.bells.results_recorded()

    def warm_up(self) -> list[dict[str, str]]:
        """Load the models (``worker.threads`` CPU threads), run each once and build one SR, so that neither the
        models' first call nor highdicom's lazily loaded standard tables (about 0.3 s) fall into the first job.
        Returns the loaded models as the heartbeat names them (role, name, version, sha256)."""
        import numpy as np

        from ai.models import lung_segmenter, pneumoconiosis_classifier

        if self.config.worker.threads:
            import torch

            torch.set_num_threads(self.config.worker.threads)  # ONNX Runtime sessions take the same number
        segmenter = lung_segmenter(self.device, self.model_dir)
        classifier = pneumoconiosis_classifier(self.device, self.model_dir, precision=self.precision)
        segmenter.probabilities(np.zeros((1, segmenter.input_size, segmenter.input_size), dtype=np.float32))
        if classifier is not None:
            classifier.warm_up()
        header = Dataset()
        header.SOPClassUID, header.Modality = "1.2.840.10008.5.1.4.1.1.1", "CR"
        header.StudyInstanceUID = header.SeriesInstanceUID = header.SOPInstanceUID = "2.25.1"
        try:
            self.builders.last_resort(header, "warm_up", "warm-up", self.identity, [segmenter.info])
        except Exception as exc:  # only a warm-up: the first job pays the tables' load instead
            LOG.debug("warm-up SR failed (%s)", exception_summary(exc))
        loaded = [("segmenter", segmenter.info)] + ([("classifier", classifier.info)] if classifier else [])
        return [{"role": role, "name": info.name, "version": info.version, "sha256": info.sha256}
                for role, info in loaded]

    def _results_lane(self, lane: queue.Queue[tuple[_Task, Any, float] | None], stop: threading.Event) -> None:
        """Build, write and record each analysed job's result objects, in order, off the model thread. A database
        that is briefly unavailable is waited for (the job keeps its lease meanwhile); any other error leaves the
        job to its lease, so it is retried, never lost."""
        while (item := lane.get()) is not None:
            task, record, seconds = item
            backoff = DatabaseBackoff()
            while True:
                try:
                    self._conclude(task, record, seconds)
                except (OperationalError, InterfaceError, DisconnectionError) as exc:
                    if stop.is_set() and backoff.current >= STOPPING_DATABASE_WAIT_S:
                        LOG.warning("job %d: database still unavailable while stopping; its lease expires and it "
                                    "is retried", task.job.job_id)
                        break
                    delay = backoff.next_delay()
                    LOG.warning("job %d: database unavailable while recording (%s); retrying in %.1f s",
                                task.job.job_id, exception_summary(exc), delay)
                    time.sleep(delay)
                    continue
                except Exception as exc:  # noqa: BLE001 - the lane must outlive any one job
                    LOG.error("job %d: concluding it failed (%s); its lease expires and it is retried",
                              task.job.job_id, exception_summary(exc))
                    _log_traceback(task.job.job_id)
                break
            self._results_recorded()

    def run_once(self) -> int:
        """Claim up to ``worker.batch_size`` waiting jobs and process them; returns how many were claimed.

        A job taken back from a worker that died (or hung) is processed alone, after the others: if it kills this
        worker too, it takes no batch-mate with it. The registry's champion is looked up first: a promotion or a
        rollback reaches the next batch (``dicom_node.champion``)."""
        self.analysis_options["classifier_path"] = self.champion.refresh()
        jobs = self._claim()
        fresh = [j for j in jobs if not j.taken_back]
        if fresh:
            self.process(fresh)
        for job in jobs:
            if job.taken_back:
                self.process([job])
        return len(jobs)

    def _claim(self) -> list[ClaimedJob]:
        """Claim step: up to ``worker.batch_size`` waiting jobs, each under this worker's lease."""
        jobs: list[ClaimedJob] = []
        for _ in range(self.config.worker.batch_size):
            job = claim(self.engine, self.owner, self.config.queue.lease_seconds, self.config.queue.max_attempts)
            if job is None:
                break
            jobs.append(job)
        return jobs

    # -- one batch ----------------------------------------------------------------------------------------------
    def process(self, jobs: list[ClaimedJob]) -> None:
        """Read each job's source, analyse the readable ones together, then build, write and record each job's
        result objects."""
        tasks = [task for task in map(self._source_of, jobs) if task is not None]
        if not tasks:
            return
        started = time.perf_counter()
        records = self._analyse(tasks)
        seconds = (time.perf_counter() - started) / len(tasks)
        lane = self._lane
        for task, record in zip(tasks, records, strict=True):
            if lane is not None:
                lane.put((task, record, seconds))  # blocks only when the lane is two batches behind
            else:
                self._conclude(task, record, seconds)

    def _source_of(self, job: ClaimedJob) -> _Task | None:
        """Read step: the task to analyse, or None when the job ended here (lost its worker on every attempt,
        its archived file cannot be read, or it is a result object of this node)."""
        if job.report_only:
            self._report_lost_job(job)
            return None
        task = self._read(job)
        if task.source is None:
            self._failed(task, task.reason, task.error or "the archived file cannot be read", task.retryable)
            return None
        if is_own_result(task.source, self.identity):  # our SC routed back by a PACS: never reported on
            finish_job(self.engine, task.job, JobState.NOT_ANALYSED, "own_result",
                       "a result object of this node (routed back by PACS?): never reported on", [], {})
            LOG.info("job %d not_analysed: own_result, no report", task.job.job_id)
            return None
        return task

    def _conclude(self, task: _Task, record: Any, seconds: float) -> None:
        """After the analysis: a failed attempt, or build, write and record the job's result objects."""
        if record is None:
            self._failed(task, "analysis_error", task.error or "the analysis raised an error", task.retryable)
        elif record.error is not None:
            self._failed(task, record.reason, record.error, getattr(record, "retryable", True))
        else:
            self._finish(task, record, seconds)

    def _analyse(self, tasks: list[_Task]) -> list[Any]:
        """One model call for the batch; if it raises, one call per job, so one bad input fails only itself."""
        try:
            return self.analyse([t.source for t in tasks], device=self.device, **self.analysis_options)
        except Exception as exc:
            LOG.warning("batch of %d failed (%s); analysing its jobs one by one", len(tasks), exception_summary(exc))
            _log_traceback(tasks[0].job.job_id)
        records: list[Any] = []
        for t in tasks:
            try:
                records.extend(self.analyse([t.source], device=self.device, **self.analysis_options))
            except Exception as exc:
                records.append(None)
                t.error = exception_summary(exc, message="the analysis raised an error")
                _log_traceback(t.job.job_id)
        return records

    def _read(self, job: ClaimedJob) -> _Task:
        path = self.archive.absolute(job.archive_path)
        try:
            source = read_dataset_bounded(path, self.limits)
            drop_cached(path)  # read whole into memory: the archived copy's pages are not needed again soon
            return _Task(job, source)
        except ImageTooLarge as exc:  # archived before the limits were lowered: refused, never decoded
            return _Task(job, None, exception_summary(exc), retryable=False, reason="image_too_large")
        except Exception as exc:  # missing or corrupt archive file: a job failure, never a crash
            return _Task(job, None, exception_summary(exc, message="the archived file cannot be read"))

    def _coerced(self, source: Dataset) -> tuple[Dataset, list[tuple[str, str]]]:
        """The source's header as it may enter a result object, and the repairs as audit notes (keywords only)."""
        header, repairs = coerce_header(source)
        if not repairs:
            return header, []
        listed = ", ".join(f"{r.keyword} {r.action}" for r in repairs)
        return header, [("header_coerced", f"{len(repairs)} header repair(s): {listed}"[:2000])]

    def _finish(self, task: _Task, record: Any, seconds: float) -> None:
        """Build, write and record the report first (the SR and the SEG it measures on) and ring the exporter, so
        that what the radiologist reads never waits for the heat-map SC (its drawing and JPEG encoding are the
        largest part of the result objects' time); then the SC, and the job's end."""
        built = self._build(task, record)
        if built is None:
            return
        header, objects, notes = built
        if self._earlier_report_stands(task, record, objects):
            return
        files = self._write(task, record, objects)
        if files is None:
            return
        if record.in_scope:
            if not record_report(self.engine, task.job, files, self.export_routes,
                                 _finding_values(record, seconds)):
                LOG.warning("job %d: lease lost before recording; the job's new owner records it", task.job.job_id)
                return
            self._results_recorded()  # the SR's export is due now
            picture = self._picture(task, header, record)
            if picture is None:
                return
            files, notes = files + picture[0], notes + picture[1]
        self._record(task, record, files, notes, seconds)

    def _build(self, task: _Task, record: Any
               ) -> tuple[Dataset, list[ResultObject], list[tuple[str, str]]] | None:
        """Build step of the report: the coerced header, the report's objects and the header repairs' audit notes;
        None when they could not be encoded (the job then got its last-resort report)."""
        assert task.source is not None
        try:
            header, notes = self._coerced(task.source)
            return header, self.builders.report(header, record, self.identity), notes
        except Exception as exc:  # the analysis is done; only its encoding failed: a last-resort report, no retry
            LOG.warning("job %d: result encoding failed (%s)", task.job.job_id, exception_summary(exc))
            _log_traceback(task.job.job_id)
            task.error = exception_summary(exc, message="the result objects could not be encoded")
            self._last_resort(task, "result_encoding_error",
                              "the analysis finished but its result objects could not be encoded")
            return None

    def _earlier_report_stands(self, task: _Task, record: Any, objects: list[ResultObject]) -> bool:
        """A retried job whose earlier attempt sent a report other than the one this attempt built (the champion
        changed between the attempts: other model versions, so other UIDs) ends done with the report already in
        PACS, without a picture: a second SR of the image that may say something else, or a heat map from another
        model than the report's, would leave the radiologist two answers. Returns True when it ended the job."""
        if task.job.attempt == 1:  # only a retry can find a report of its job (one read, on retries only)
            return False
        earlier = reported_results(self.engine, task.job.job_id)
        if not earlier or {str(o.dataset.SOPInstanceUID) for o in objects} <= {f.sop_instance_uid for f in earlier}:
            return False
        self._done_without_picture(
            task, earlier, f"models_changed: an earlier attempt sent the report; this attempt ran "
                           f"{model_versions(record.models)}, so its report and heat map were not kept")
        return True

    def _picture(self, task: _Task, header: Dataset, record: Any
                 ) -> tuple[list[ResultFile], list[tuple[str, str]]] | None:
        """The heat-map SC, built and written after the report went out: its files and audit notes. A picture that
        cannot be encoded leaves the job done with its report and an audit note (the report already says what the
        analysis found); None when writing it failed (a retried attempt, or the job's end without it)."""
        try:
            objects = self.builders.picture(header, record, self.identity)
        except Exception as exc:  # noqa: BLE001 - the report is out; only the picture is missing
            problem = exception_summary(exc)  # a ResultEncodingError's fixed text, else the type alone
            LOG.warning("job %d: the heat-map SC could not be encoded (%s); the job keeps its report",
                        task.job.job_id, problem)
            _log_traceback(task.job.job_id)
            return [], [("heat_map_missing", f"the heat-map SC could not be encoded ({problem})")]
        files = self._write(task, record, objects)
        return None if files is None else (files, [])

    def _write(self, task: _Task, record: Any, objects: list[ResultObject]) -> list[ResultFile] | None:
        """Write step: each object durably under the storage root; None when that failed (a retried attempt)."""
        try:
            # one thread per object: each file's write and fsync overlaps the others' (the SC is about 10 MB)
            written = list(self._writers.map(
                lambda o: self.store.write(o.kind, o.dataset, record.in_scope, record.reason), objects))
            return sorted(written, key=lambda f: EXPORT_ORDER.get(f.kind, len(EXPORT_ORDER)))
        except Exception as exc:  # disk full, I/O error: transient
            self._failed(task, "result_write_error", exception_summary(exc, message="writing a result failed"), True)
            return None

    def _record(self, task: _Task, record: Any, files: list[ResultFile], notes: list[tuple[str, str]],
                seconds: float) -> None:
        """Record step: the job's final state, its result objects and their exports, in one fenced commit (an
        analysed job's finding went in with its report)."""
        state = JobState.DONE if record.in_scope else JobState.NOT_ANALYSED
        reason = None if record.in_scope else record.reason
        if not finish_job(self.engine, task.job, state, reason, None if record.in_scope else record.explanation,
                          files, self.export_routes, notes):
            LOG.warning("job %d: lease lost before recording; the job's new owner records it", task.job.job_id)
            return
        c = record.classification
        verdict = (f"p={c.probability:.3f} present={c.present} category={c.most_likely_category} ({c.precision})"
                   if c is not None
                   else "no classifier installed") if record.in_scope else f"not analysed: {record.reason}"
        LOG.info("job %d %s: %s; %s%s (%.2f s)", task.job.job_id, state.value, verdict,
                 "+".join(f.kind.upper() for f in files), f"; {len(notes)} header note(s)" if notes else "", seconds)

    def _failed(self, task: _Task, reason: str, error: str, retryable: bool) -> None:
        """A failed attempt: retried while attempts remain and the error is transient; otherwise the job ends failed
        with a "not analysed" SR that says why."""
        max_attempts = self.config.queue.max_attempts
        if retryable and task.job.attempt < max_attempts:
            state = fail(self.engine, task.job, reason, error, max_attempts)
            LOG.warning("job %d attempt %d/%d failed (%s): %s; %s", task.job.job_id, task.job.attempt, max_attempts,
                        reason, error, "lease lost" if state is None else "will retry")
            return
        task.error = error
        self._last_resort(task, reason, f"analysis failed: {error}")

    def _done_without_picture(self, task: _Task, report: list[ResultFile], why: str) -> None:
        """End a job whose report an attempt already recorded and sent, without its heat-map SC: a second,
        "not analysed" SR would contradict the report in PACS."""
        if finish_job(self.engine, task.job, JobState.DONE, None, None, report, self.export_routes,
                      [("heat_map_missing", f"no heat-map SC ({why})"[:2000])]):
            LOG.error("job %d done without its heat-map SC after %d attempt(s): %s", task.job.job_id,
                      task.job.attempt, why)

    def _report_lost_job(self, job: ClaimedJob) -> None:
        """A job whose worker died or hung on every attempt: its report, without analysing it again."""
        attempts = job.attempt - 1
        task = _Task(job, None, f"the worker processing it stopped (died or hung) {attempts} time(s)", False)
        LOG.error("job %d: lost its worker %d time(s); ending it without analysing it again", job.job_id, attempts)
        self._last_resort(task, "lease_expired",
                          f"the analysis was interrupted {attempts} time(s): the worker process died or hung")

    def _last_resort(self, task: _Task, reason: str, explanation: str) -> None:
        """End the job failed with a "not analysed" SR (``build_last_resort_sr``: the normal one on the coerced
        header, else on a minimal one); only if that fails, with no object (``finish_job`` then records the audit
        event that ``dicom-node status`` counts). A job whose report this or an earlier attempt already recorded and
        sent ends done with it instead (``_done_without_picture``)."""
        report = reported_results(self.engine, task.job.job_id)
        if report:
            self._done_without_picture(task, report, f"{reason}: {explanation}")
            return
        source = task.source if task.source is not None else self._header_only(task.job)
        models = _model_descriptions(self.device, self.model_dir, self.analysis_options["classifier_path"],
                                     self.precision)
        files: list[ResultFile] = []
        notes: list[tuple[str, str]] = []
        if source is not None:
            header = source
            try:
                header, notes = self._coerced(source)
            except Exception as exc:  # the last-resort builder falls back to the source's UIDs by itself
                LOG.warning("job %d: its header cannot be coerced (%s)", task.job.job_id, exception_summary(exc))
            try:
                objects = self.builders.last_resort(header, reason, explanation[:1000], self.identity, models)
            except Exception as exc:
                LOG.error("job %d: even the last-resort SR failed (%s)", task.job.job_id, exception_summary(exc))
                _log_traceback(task.job.job_id)
                objects = []
            try:
                files = [self.store.write(o.kind, o.dataset, False, reason) for o in objects]
            except Exception as exc:
                LOG.error("job %d: writing its 'not analysed' SR failed (%s)", task.job.job_id, exception_summary(exc))
                files = []
        if finish_job(self.engine, task.job, JobState.FAILED, reason, task.error or explanation, files,
                      self.export_routes, notes):
            LOG.error("job %d failed after %d attempt(s): %s; %s", task.job.job_id, task.job.attempt, reason,
                      "not-analysed SR written" if files else "NO RESULT OBJECT (audit event recorded)")

    def _header_only(self, job: ClaimedJob) -> Dataset | None:
        """The archived header without pixels; if even that cannot be read, the UIDs the database recorded at
        intake, so that the job still gets its "not analysed" SR in the right study."""
        try:
            header = read_dataset_bounded(self.archive.absolute(job.archive_path), self.limits,
                                          stop_before_pixels=True, force=True)
        except Exception as exc:  # missing, unreadable, over the limits: the recorded UIDs below
            problem = exception_summary(exc, message="the archived file cannot be read")
        else:
            if "SOPInstanceUID" in header and "StudyInstanceUID" in header:
                return header
            problem = "its header lacks the Study or SOP Instance UID"
        LOG.warning("job %d: its archived file cannot be read even for its header (%s); reporting from the UIDs "
                    "recorded at intake", job.job_id, problem)
        uids = instance_uids(self.engine, job.instance_id)
        if uids is None:
            return None
        header = Dataset()
        header.SOPClassUID, header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID = uids
        header.Modality = modality_of(uids[0])
        return header


def _finding_values(record: Any, seconds: float) -> FindingValues | None:
    """The classification of an analysed record as the database keeps it; None when there is none."""
    c, info = record.classification, record.classifier
    if not record.in_scope or c is None or info is None:
        return None
    return FindingValues(info.name, info.version, info.sha256, c.probability, c.present, c.threshold,
                         c.most_likely_category, list(c.category_probabilities), seconds)


def _device_name(device: str | None) -> str:
    """The device the models run on ("cpu", "cuda", "cuda:1"), as the heartbeat shows it."""
    try:
        from ai.models import select_device

        return str(select_device(device))[:16]
    except Exception:  # noqa: BLE001 - only a label
        return (device or "auto")[:16]


def _model_threads() -> int:
    import torch

    return torch.get_num_threads()


def modality_of(sop_class_uid: str) -> str:
    """A Modality for a header rebuilt from UIDs alone (the SR's evidence needs none, highdicom's copy may)."""
    return {"1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.1.1": "DX",
            "1.2.840.10008.5.1.4.1.1.1.1.1": "DX"}.get(sop_class_uid, "OT")


def _model_descriptions(device: str | None = None, model_dir: Path | None = None,
                        classifier_path: Path | None = None, precision: str = "auto") -> list[ModelInfo]:
    """The models as an analysis would name them (for SRs of jobs that never reached the models): those of
    ``model_dir`` (``models.directory``) where it has them, else the bundled ones, and the champion's classifier
    file ``classifier_path`` when the registry names one, loaded on ``device``."""
    from ai.models import lung_segmenter, pneumoconiosis_classifier

    models = []
    try:
        models.append(lung_segmenter(device, model_dir).info)
        classifier = pneumoconiosis_classifier(device, model_dir, classifier_path, precision)
        if classifier is not None:
            models.append(classifier.info)
    except Exception as exc:  # a broken model file is one reason jobs fail; the SR is still written without it
        LOG.warning("the installed models cannot be described (%s); the SR names none", exception_summary(exc))
    return models
