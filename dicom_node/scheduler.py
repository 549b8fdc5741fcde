"""The one scheduler of a ``dicom-node serve`` process: every periodic task of that process is a job on it.

``serve`` creates one ``NodeScheduler`` (APScheduler's ``BackgroundScheduler``), registers these jobs, starts it
after the Storage SCP listens and shuts it down last, waiting for the jobs in progress:

================================  ==========================================  ====================================
job id                            every                                       what
================================  ==========================================  ====================================
``database-identity``             ``database.identity_check_seconds`` (2 s)   ``DatabaseGuard.poll``: an idle node
                                                                              notices a database file removed or
                                                                              replaced (SQLite only)
``lease-reclaim``                 the exporter's lease / 4 (98 s at the       ``db.exports.reclaim_expired``:
                                  default ``export.deadline_seconds``)        exports whose exporter died while
                                                                              sending them go back to pending (or
                                                                              dead after their last attempt)
``workers``                       0.5 s, when ``worker.processes`` > 0        ``WorkerSupervisor.check``: restart
                                                                              a worker process that exited
``export:NAME``, one per          ``export.poll_seconds`` (0.5 s), the        that destination's export round
destination                       first at start-up                           (``dicom_node.export``)
================================  ==========================================  ====================================

``labels-sr``, every ``labels.sr_import_seconds`` (60 s; 0 = off), the first at start-up:
``dicom_node.labels_sr.import_new_sr_labels`` imports the reads of DICOM SRs received since as labels (an SR it
cannot understand is read once per process).

``training``, at the cron expression ``training.schedule`` (off by default; local time): ``dicom_node.retraining
.scheduled_retrain`` starts ``dicom-node retrain`` as a process of its own when no run is running and at least
``training.min_new_labels`` labels came since the last successful run.

Analysis jobs have no sweep: a worker does not renew its lease while it analyses, so a job whose lease expired
is taken back only by the next worker that claims it (``db.queue``), and a
slow worker alone keeps its job; a live exporter renews its lease before every step, so only a dead exporter's lease
expires. When the database guard trips (``DatabaseGuard.on_trip``), ``serve`` removes the database jobs (identity
check, lease reclaim) and stops the exporter: every one of their runs would fail until the restart.

Every job runs with ``max_instances=1`` and ``coalesce``: a run longer than its period skips the ticks it overlaps
(silently: APScheduler's warning about it is dropped). The short jobs share the ``default`` executor (four threads);
the export rounds have an executor of their own with one thread per destination, so a hung PACS delays only its own
lane and never the identity check. An exception that escapes a job is logged by its type only
(``ai.safe_text.exception_summary``) and the job runs again at its next tick. APScheduler's own INFO lines (one
per run) are not logged unless the operator sets the level of the ``dicom_node.scheduler.apscheduler`` and
``apscheduler.executors`` loggers (importing this module makes them WARNING if nobody set them: the only
process-wide effect here; a ``NodeScheduler`` itself changes nothing outside itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from ai.safe_text import escape, exception_summary

LOG = logging.getLogger("dicom_node.scheduler")
DEFAULT_EXECUTOR = "default"
DEFAULT_THREADS = 4

DATABASE_IDENTITY_JOB = "database-identity"
LEASE_RECLAIM_JOB = "lease-reclaim"
WORKERS_JOB = "workers"
TRAINING_JOB = "training"
LABELS_SR_JOB = "labels-sr"


class _DropSkippedRuns(logging.Filter):
    """A run longer than its period makes APScheduler skip the next tick with a warning: expected here
    (``max_instances=1``, e.g. an export round to a slow PACS), so not worth a log line every period."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


_APSCHEDULER_LOG = logging.getLogger("dicom_node.scheduler.apscheduler")
_APSCHEDULER_LOG.addFilter(_DropSkippedRuns())


def _quiet(logger_name: str) -> None:
    """APScheduler says "Running job ..." and "... executed successfully" at INFO on every run: only its warnings,
    unless the operator set that logger's level."""
    logger = logging.getLogger(logger_name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


_quiet(_APSCHEDULER_LOG.name)
_quiet("apscheduler.executors")  # the parent of every executor's logger ("apscheduler.executors.<name>")


def utcnow_aware() -> datetime:
    return datetime.now(UTC)


class NodeScheduler:
    """One APScheduler ``BackgroundScheduler`` for the process; see the module docstring for the jobs."""

    def __init__(self) -> None:
        self._scheduler = BackgroundScheduler(
            timezone=UTC, logger=_APSCHEDULER_LOG,
            executors={DEFAULT_EXECUTOR: ThreadPoolExecutor(DEFAULT_THREADS)},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None})
        self._periods: dict[str, float] = {}
        self._crons: dict[str, str] = {}
        self._executors = {DEFAULT_EXECUTOR}

    # -- life cycle ------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        self._scheduler.start()
        LOG.info("scheduler: %s", self.describe() or "no jobs")

    def shutdown(self, wait: bool = True) -> None:
        """Stop running jobs; with ``wait``, return once the runs in progress have finished."""
        try:
            self._scheduler.shutdown(wait=wait)
        except SchedulerNotRunningError:
            pass  # never started, or already shut down: nothing runs

    # -- jobs ------------------------------------------------------------------------------------------------

    def add_executor(self, name: str, threads: int) -> None:
        """A pool of ``threads`` threads for the jobs registered with ``executor=name`` (once per name)."""
        self._scheduler.add_executor(ThreadPoolExecutor(max(1, threads)), name)
        self._executors.add(name)

    def has_executor(self, name: str) -> bool:
        return name in self._executors

    def every(self, job_id: str, seconds: float, func: Callable[..., Any], *, args: tuple[Any, ...] = (),
              executor: str = DEFAULT_EXECUTOR, run_now: bool = False) -> None:
        """Run ``func(*args)`` every ``seconds`` (the first run after one period, or at once with ``run_now``)."""
        first: dict[str, Any] = {"next_run_time": utcnow_aware()} if run_now else {}  # None would add it paused
        self._scheduler.add_job(_logged(job_id, func), "interval", args=list(args), seconds=seconds, id=job_id,
                                name=job_id, executor=executor, replace_existing=True, **first)
        self._periods[job_id] = seconds

    def cron(self, job_id: str, expression: str, func: Callable[..., Any], *, args: tuple[Any, ...] = (),
             executor: str = DEFAULT_EXECUTOR) -> None:
        """Run ``func(*args)`` at the times of a crontab ``expression`` (minute hour day month day-of-week), in
        the machine's local time zone (what an admin means by "02:00")."""
        from apscheduler.triggers.cron import CronTrigger
        from tzlocal import get_localzone

        trigger = CronTrigger.from_crontab(expression, timezone=get_localzone())
        self._scheduler.add_job(_logged(job_id, func), trigger, args=list(args), id=job_id, name=job_id,
                                executor=executor, replace_existing=True)
        self._crons[job_id] = expression

    def run_now(self, job_id: str) -> bool:
        """Bring the next run of ``job_id`` forward to now; False when there is no such job (any more) or the
        scheduler is not running."""
        try:
            self._scheduler.modify_job(job_id, next_run_time=utcnow_aware())  # wakes the scheduler up
        except (JobLookupError, SchedulerNotRunningError):
            return False
        return True

    def remove(self, job_id: str) -> None:
        """No further runs of ``job_id`` (a run in progress finishes); nothing happens if there is no such job."""
        self._periods.pop(job_id, None)
        self._crons.pop(job_id, None)
        try:
            self._scheduler.remove_job(job_id)
        except JobLookupError:
            pass  # removed already (e.g. the database guard tripped before serve stopped)

    def job_ids(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    def describe(self) -> str:
        """"id every N s" (or "id at CRON") for each job, for the start-up log line."""
        periodic = [f"{escape(job_id)} every {seconds:g} s" for job_id, seconds in self._periods.items()]
        return ", ".join(periodic + [f"{escape(job_id)} at '{escape(expr)}'" for job_id, expr in self._crons.items()])


def _logged(job_id: str, func: Callable[..., Any]) -> Callable[..., None]:
    """``func`` as a job: an exception is logged by its type and fixed text (never a traceback with library texts
    by APScheduler) and the job runs again at its next tick."""

    def run(*args: Any) -> None:
        try:
            func(*args)
        except Exception as exc:  # noqa: BLE001 - e.g. the database locked beyond its timeout: next tick
            LOG.warning("scheduled job %s failed (%s); it runs again at its next tick", escape(job_id),
                        exception_summary(exc))

    return run
