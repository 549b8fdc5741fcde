"""The analysis worker: claim jobs, analyse, write SR/SEG/SC under the storage root, record them, queue export.

One worker is one process (the models load once per process). ``dicom-node serve`` supervises
``worker.processes`` of them; ``dicom-node worker`` runs one alone, e.g. on a GPU host that shares the database
and the storage root. Outcomes per job:

- analysed: SEG + SR + heat-map SC, job ``done``;
- refused by header or pixels (not a frontal chest, ...): a "not analysed" SR with the reason, job ``not_analysed``;
- failed (unreadable file, undecodable pixels, model or encoding error): retried up to ``queue.max_attempts``,
  then job ``failed`` with its reason and a "not analysed" SR that says why.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import Engine

from db.models import JobState
from db.queue import ClaimedJob, claim, fail
from db.results import ResultFile, finish_job

from .archive import Archive
from .config import NodeConfig
from .result_store import ResultStore

LOG = logging.getLogger("dicom_node.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Task:
    job: ClaimedJob
    source: Dataset | None = None
    error: str | None = None  # reading the archived file failed


class Worker:
    def __init__(self, config: NodeConfig, engine: Engine, archive: Archive, owner: str | None = None) -> None:
        from .results import NodeIdentity, derive_device_uid

        self.config = config
        self.engine = engine
        self.archive = archive
        self.owner = owner or worker_id()
        self.store = ResultStore(archive)
        ae = config["network.ae_title"]
        self.identity = NodeIdentity(ae_title=ae, device_uid=config["results.device_uid"] or derive_device_uid(ae),
                                     institution_name=config["results.institution_name"])
        device = config["worker.device"]
        self.device = None if device == "auto" else device
        self.destinations = config["export.destinations"]

    # -- loop -------------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; finishes the batch in hand before returning."""
        from ai.models import lung_segmenter, pneumoconiosis_classifier

        lung_segmenter(self.device)  # load the models before the first job, not inside its time
        pneumoconiosis_classifier(self.device)
        LOG.info("worker %s ready (device %s, batch %d)", self.owner, self.device or "auto",
                 self.config["worker.batch_size"])
        while not stop.is_set():
            if self.run_once() == 0:
                stop.wait(self.config["worker.poll_seconds"])

    def run_once(self) -> int:
        """Claim up to ``worker.batch_size`` waiting jobs and process them; returns how many were claimed."""
        jobs: list[ClaimedJob] = []
        for _ in range(self.config["worker.batch_size"]):
            job = claim(self.engine, self.owner, self.config["queue.lease_seconds"], self.config["queue.max_attempts"])
            if job is None:
                break
            jobs.append(job)
        if jobs:
            self.process(jobs)
        return len(jobs)

    # -- one batch ----------------------------------------------------------------------------------------------
    def process(self, jobs: list[ClaimedJob]) -> None:
        from ai import analyse_batch

        tasks = [self._read(job) for job in jobs]
        own = [t for t in tasks if t.source is not None and self._is_own_result(t.source)]
        for task in own:
            finish_job(self.engine, task.job, JobState.NOT_ANALYSED, "own_result",
                       "a result object of this node (routed back by PACS?): never reported on", [], [])
            LOG.info("job %d not_analysed: own_result, no report", task.job.job_id)
        tasks = [t for t in tasks if all(t is not o for o in own)]
        readable = [t for t in tasks if t.source is not None]
        for task in tasks:
            if task.source is None:
                self._failed(task, "unreadable_file", task.error or "the archived file cannot be read")
        if not readable:
            return
        started = time.perf_counter()
        try:
            records = analyse_batch([t.source for t in readable], device=self.device)  # type: ignore[misc]
        except Exception:  # one bad input must not fail its batch-mates: analyse them one by one
            LOG.warning("batch of %d failed; analysing its jobs one by one", len(readable), exc_info=True)
            records = []
            for t in readable:
                try:
                    records.extend(analyse_batch([t.source], device=self.device))  # type: ignore[list-item]
                except Exception as exc:
                    records.append(None)  # type: ignore[arg-type]
                    t.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        elapsed = time.perf_counter() - started
        for task, record in zip(readable, records):
            if record is None:
                self._failed(task, "analysis_error", task.error or "the analysis raised an error")
            elif record.error is not None:
                self._failed(task, record.reason, record.error)
            else:
                self._finish(task, record, elapsed / len(readable))

    def _is_own_result(self, source: Dataset) -> bool:
        """Our heat-map SC sent back to us (a PACS routing rule) must not get a "not analysed" SR, and so on."""
        for item in source.get("ContributingEquipmentSequence", []):
            if item.get("DeviceUID") == self.identity.device_uid or (
                    item.get("Manufacturer") == self.identity.manufacturer
                    and item.get("ManufacturerModelName") == self.identity.model_name):
                return True
        return False

    def _read(self, job: ClaimedJob) -> _Task:
        path = self.archive.absolute(job.archive_path)
        try:
            return _Task(job, dcmread(path))
        except Exception as exc:  # missing or corrupt archive file: a job failure, never a crash
            return _Task(job, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")

    def _finish(self, task: _Task, record, seconds: float) -> None:  # type: ignore[no-untyped-def]
        from .results import build_results

        try:
            objects = build_results(task.source, record, self.identity)  # type: ignore[arg-type]
            files = [self.store.write(o.kind, o.dataset, record.in_scope, record.reason) for o in objects]
        except Exception as exc:
            LOG.warning("job %d: result encoding failed", task.job.job_id, exc_info=True)
            self._failed(task, "result_encoding_error", f"{type(exc).__name__}: {exc}"[:500])
            return
        state = JobState.DONE if record.in_scope else JobState.NOT_ANALYSED
        reason = None if record.in_scope else record.reason
        if not finish_job(self.engine, task.job, state, reason, None if record.in_scope else record.explanation,
                          files, self.destinations):
            LOG.warning("job %d: lease lost before recording; the job's new owner records it", task.job.job_id)
            return
        c = record.classification
        verdict = (f"p={c.probability:.3f} present={c.present} category={c.most_likely_category}" if c is not None
                   else "no classifier installed") if record.in_scope else f"not analysed: {record.reason}"
        LOG.info("job %d %s: %s; %s (%.2f s)", task.job.job_id, state.value, verdict,
                 "+".join(f.kind.upper() for f in files), seconds)

    def _failed(self, task: _Task, reason: str, error: str) -> None:
        """A failed attempt: retried while attempts remain; the last one ends failed with a "not analysed" SR."""
        from .results import build_not_analysed

        max_attempts = self.config["queue.max_attempts"]
        if task.job.attempt < max_attempts:
            state = fail(self.engine, task.job, reason, error, max_attempts)
            LOG.warning("job %d attempt %d/%d failed (%s): %s", task.job.job_id, task.job.attempt, max_attempts,
                        reason, "lease lost" if state is None else "will retry")
            return
        files: list[ResultFile] = []
        source = task.source if task.source is not None else self._header_only(task.job)
        if source is not None:
            try:
                objects = build_not_analysed(source, reason, f"analysis failed: {error}"[:1000], self.identity,
                                             models=_model_descriptions())
                files = [self.store.write(o.kind, o.dataset, False, reason) for o in objects]
            except Exception:
                LOG.error("job %d: cannot even write its 'not analysed' SR", task.job.job_id, exc_info=True)
        if finish_job(self.engine, task.job, JobState.FAILED, reason, error, files, self.destinations):
            LOG.error("job %d failed after %d attempt(s): %s; %s", task.job.job_id, task.job.attempt, reason,
                      "not-analysed SR written" if files else "no SR possible")

    def _header_only(self, job: ClaimedJob) -> Dataset | None:
        try:
            return dcmread(self.archive.absolute(job.archive_path), stop_before_pixels=True, force=True)
        except Exception:
            return None


def _model_descriptions() -> list[dict[str, str]]:
    """The installed models as an analysis would list them (for SRs of jobs that never reached the models)."""
    from ai.models import lung_segmenter, pneumoconiosis_classifier

    models = []
    try:
        segmenter = lung_segmenter()
        models.append(segmenter.describe())
        classifier = pneumoconiosis_classifier()
        if classifier is not None:
            models.append(classifier.describe())
    except Exception:  # a broken model file is one reason jobs fail; the SR is still written without it
        pass
    return models

