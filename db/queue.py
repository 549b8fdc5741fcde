"""The analysis queue contract shared by the intake (producer) and the worker processes (consumers).

A worker *claims* one job atomically and holds it under a lease; it then *completes* it, *fails* it (retried until
``max_attempts``, then failed for good), or marks it *not analysed* with a reason. Every write after the claim is
fenced by the lease owner, so a worker whose lease was taken back cannot overwrite the new owner's result. A job
whose lease expired (crashed worker) is claimable again, and is then processed alone so that a poison input
cannot take its batch-mates down with it. A job whose lease expired after its last attempt is handed out once more
*for its report only*: the worker writes its "not analysed" SR without touching the pixels again. Only if that
attempt is lost as well does the job end failed with no result object, and an audit event says so.

On SQLite the claim runs inside BEGIN IMMEDIATE (see ``db.engine``), which serialises writers; on PostgreSQL the same
statement renders ``FOR UPDATE SKIP LOCKED`` so that concurrent workers skip each other's rows instead of waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from .engine import readonly
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


def _claimable(now: datetime):  # type: ignore[no-untyped-def]
    return or_(
        Job.state == JobState.QUEUED,
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
    )


def claim_statement(now: datetime) -> Select[tuple[Job]]:
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
            job.state = JobState.RUNNING
            job.attempts += 1
            job.lease_owner = worker_id
            job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            instance = job.instance
            return ClaimedJob(
                job_id=job.id,
                instance_id=instance.id,
                sop_instance_uid=instance.sop_instance_uid,
                archive_path=instance.archive_path,
                attempt=job.attempts,
                lease_owner=worker_id,
                lease_expires_at=job.lease_expires_at,
                taken_back=taken_back,
                report_only=report_only,
            )


def still_held(job: ClaimedJob):  # type: ignore[no-untyped-def]
    """The fence of every write after the claim: the job is still running under this worker's lease."""
    return and_(Job.id == job.job_id, Job.state == JobState.RUNNING, Job.lease_owner == job.lease_owner)


def _fenced_update(engine: Engine, job: ClaimedJob, event_kind: str, detail: str, **values: object) -> bool:
    """Apply ``values`` only if ``job`` is still running under this worker's lease; returns whether it was."""
    with Session(engine) as session, session.begin():
        result = session.execute(
            update(Job)
            .where(still_held(job))
            .values(updated_at=utcnow(), **values)
        )
        if result.rowcount != 1:
            return False
        session.add(Event(kind=event_kind, sop_instance_uid=job.sop_instance_uid, detail=detail))
        return True


def extend_lease(engine: Engine, job: ClaimedJob, lease_seconds: float) -> bool:
    """Keep a long-running job; False means the lease was lost and the worker must drop its result."""
    with Session(engine) as session, session.begin():
        result = session.execute(
            update(Job)
            .where(still_held(job))
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        )
        return result.rowcount == 1


def complete(engine: Engine, job: ClaimedJob) -> bool:
    return _fenced_update(
        engine, job, "job_done", f"job {job.job_id} done on attempt {job.attempt}",
        state=JobState.DONE, lease_owner=None, lease_expires_at=None, reason=None, last_error=None,
    )


def mark_not_analysed(engine: Engine, job: ClaimedJob, reason: str, detail: str = "") -> bool:
    """The image was looked at and refused (e.g. ``no_lung_fields``): a final state, not an error."""
    return _fenced_update(
        engine, job, "job_not_analysed", f"job {job.job_id}: {reason}",
        state=JobState.NOT_ANALYSED, lease_owner=None, lease_expires_at=None, reason=reason,
        last_error=detail[:ERROR_TEXT_LIMIT] or None,
    )


def fail(engine: Engine, job: ClaimedJob, reason: str, error: str, max_attempts: int,
         retryable: bool = True) -> JobState | None:
    """Record a failed attempt: back to queued while attempts remain and the error is retryable, else failed.

    Returns the new state, or None if this worker no longer held the lease.
    """
    final = not retryable or job.attempt >= max_attempts
    state = JobState.FAILED if final else JobState.QUEUED
    ok = _fenced_update(
        engine, job, "job_failed" if final else "job_retry",
        f"job {job.job_id} attempt {job.attempt}: {reason}",
        state=state, lease_owner=None, lease_expires_at=None, reason=reason,
        last_error=error[:ERROR_TEXT_LIMIT],
    )
    return state if ok else None


def reclaim_expired(engine: Engine, max_attempts: int) -> int:
    """Put every job whose lease expired and that has attempts left back in the queue; returns the count.

    Jobs out of attempts are left running-and-expired: ``claim`` hands them out for their report only.
    """
    now = utcnow()
    with Session(engine) as session, session.begin():
        expired = session.scalars(
            select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now,
                              Job.attempts < max_attempts)
            .with_for_update(skip_locked=True)
        ).all()
        for job in expired:
            session.add(Event(kind="job_taken_back", sop_instance_uid=job.instance.sop_instance_uid,
                              detail=f"job {job.id}: lease of {job.lease_owner} expired"))
            job.state = JobState.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
        return len(expired)


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
