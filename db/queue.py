"""The analysis queue contract shared by the intake (producer) and the worker processes (consumers).

A worker *claims* one job atomically and holds it under a lease (``db.leases``); it then ends it with its results
(``db.results.finish_job``: done, not analysed or failed, in the transaction that records the result objects) or
*fails* an attempt (``fail``: retried until ``max_attempts``, then failed for good). Every write after the claim is
fenced by the lease owner, so a worker whose lease was taken back cannot overwrite the new owner's result. A job
whose lease expired (crashed or hung worker) is taken back by the next ``claim`` and is then processed alone
(``ClaimedJob.taken_back``), so that a poison input cannot take its batch-mates down with it. Nothing takes a job
back earlier: a worker does not renew its lease while it analyses, so an expired lease of a worker that is merely
slow is only lost to another worker that wants the job (there is no periodic sweep of job leases; ``serve``'s
``lease-reclaim`` job sweeps the export leases, which live exporters renew). A job whose lease expired after its
last attempt is handed out once more *for its report only*: the worker writes its "not analysed" SR without
touching the pixels again. Only if that attempt is lost as well does the job end failed with no result object, and
an audit event says so.

On SQLite the claim runs inside BEGIN IMMEDIATE (see ``db.engine``), which serialises writers; on PostgreSQL the same
statement renders ``FOR UPDATE SKIP LOCKED`` so that concurrent workers skip each other's rows instead of waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Engine, Select, func, or_, select
from sqlalchemy.orm import Session

from .engine import readonly
from .leases import JOBS, RELEASED
from .models import Event, Instance, Job, JobState, utcnow

ERROR_TEXT_LIMIT = 2000


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to process a claimed job, detached from any session."""

    job_id: int
    instance_id: int
    sop_instance_uid: str
    archive_path: str
    attempt: int
    lease_owner: str
    lease_expires_at: datetime
    taken_back: bool = False  # its previous lease expired: the worker that had it died or hung
    report_only: bool = False  # out of attempts after lost leases: write the "not analysed" SR, do not analyse


NO_RESULT_EVENT = "job_without_result"
"""Audit event of a job that ended with no result object at all (not even a "not analysed" SR)."""


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(Job.state == JobState.QUEUED, JOBS.expired(now))


def claim_statement(now: datetime) -> Select[Job]:
    """The oldest claimable job, row-locked; PostgreSQL skips rows another worker is claiming right now."""
    return select(Job).where(_claimable(now)).order_by(Job.id).limit(1).with_for_update(skip_locked=True)


def claim(engine: Engine, worker_id: str, lease_seconds: float, max_attempts: int) -> ClaimedJob | None:
    """Claim the oldest queued job (or one whose lease expired) for ``worker_id``; None when there is none.

    A job taken back from a crashed worker that has already used ``max_attempts`` is handed out for its report
    only (``report_only``); one whose reporting attempt was lost too ends as failed, so a poison input cannot crash
    workers forever.
    """
    while True:
        now = utcnow()
        with Session(engine) as session, session.begin():
            job = session.scalars(claim_statement(now)).first()
            if job is None:
                return None
            taken_back = job.state == JobState.RUNNING
            report_only = taken_back and job.attempts >= max_attempts
            if taken_back and job.attempts > max_attempts:
                job.state = JobState.FAILED
                job.reason = "lease_expired"
                job.last_error = f"the workers lost the job's lease {job.attempts} times, the last while reporting"
                job.lease_owner = None
                job.lease_expires_at = None
                session.add(Event(kind=NO_RESULT_EVENT, sop_instance_uid=job.instance.sop_instance_uid,
                                  detail=f"job {job.id}: lease expired after {job.attempts} attempts, the last one "
                                         f"writing its 'not analysed' SR; no result object"))
                continue
            if taken_back:
                session.add(Event(kind="job_taken_back", sop_instance_uid=job.instance.sop_instance_uid,
                                  detail=f"job {job.id}: lease of {job.lease_owner} expired"
                                         + ("; reporting only" if report_only else "")))
            job.attempts += 1
            lease_expires_at = JOBS.take(job, worker_id, lease_seconds, now)
            instance = job.instance
            return ClaimedJob(
                job_id=job.id,
                instance_id=instance.id,
                sop_instance_uid=instance.sop_instance_uid,
                archive_path=instance.archive_path,
                attempt=job.attempts,
                lease_owner=worker_id,
                lease_expires_at=lease_expires_at,
                taken_back=taken_back,
                report_only=report_only,
            )


def fail(engine: Engine, job: ClaimedJob, reason: str, error: str, max_attempts: int,
         retryable: bool = True) -> JobState | None:
    """Record a failed attempt: back to queued while attempts remain and the error is retryable, else failed.

    Returns the new state, or None if this worker no longer held the lease.
    """
    final = not retryable or job.attempt >= max_attempts
    state = JobState.FAILED if final else JobState.QUEUED
    with Session(engine) as session, session.begin():
        if not JOBS.fenced_update(session, [job.job_id], job.lease_owner, state=state, reason=reason,
                                  last_error=error[:ERROR_TEXT_LIMIT], updated_at=utcnow(), **RELEASED):
            return None
        session.add(Event(kind="job_failed" if final else "job_retry", sop_instance_uid=job.sop_instance_uid,
                          detail=f"job {job.job_id} attempt {job.attempt}: {reason}"))
    return state


def counts_by_state(engine: Engine) -> dict[str, int]:
    with Session(readonly(engine)) as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {state.value: 0 for state in JobState}
    counts.update({state.value if isinstance(state, JobState) else str(state): n for state, n in rows})
    return counts


@dataclass(frozen=True)
class JobRow:
    job_id: int
    state: str
    attempts: int
    reason: str | None
    sop_instance_uid: str
    modality: str | None
    calling_aet: str
    received_at: datetime
    updated_at: datetime


def list_jobs(engine: Engine, state: JobState | None = None, limit: int = 100) -> list[JobRow]:
    """Newest first, for the CLI's table."""
    with Session(readonly(engine)) as session:
        stmt = select(Job, Instance).join(Instance).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(Job.state == state)
        return [
            JobRow(job.id, job.state.value, job.attempts, job.reason, inst.sop_instance_uid, inst.modality,
                   inst.calling_aet, inst.received_at, job.updated_at)
            for job, inst in session.execute(stmt).all()
        ]
