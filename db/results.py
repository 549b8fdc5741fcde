"""Recording what a worker produced: the job's final state, its result objects and their exports, in one commit.

A job ends (done, not analysed, failed) in the same transaction that records its result rows and queues their
export, fenced by the worker's lease: a worker that lost its lease records nothing, and the worker that took the job
over writes the same result UIDs (they are derived from the source and the model versions), so a result exists
once whatever happens to the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from .engine import readonly
from .models import Event, Export, Job, JobState, Result, utcnow
from .queue import ERROR_TEXT_LIMIT, ClaimedJob, still_held


@dataclass(frozen=True)
class ResultFile:
    """One result object already written durably under the storage root."""

    kind: str  # "sr", "seg", "sc"
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    archive_path: str  # relative to the storage root
    size_bytes: int
    analysed: bool
    reason: str


def finish_job(engine: Engine, job: ClaimedJob, state: JobState, reason: str | None, detail: str | None,
               results: Sequence[ResultFile], destinations: Sequence[dict[str, Any]]) -> bool:
    """End ``job`` in ``state`` and record ``results`` with one export per matching destination.

    Returns False (and records nothing) when this worker no longer holds the job's lease.
    """
    from .exports import queue_exports

    with Session(engine) as session, session.begin():
        updated = session.execute(
            update(Job)
            .where(still_held(job))
            .values(state=state, lease_owner=None, lease_expires_at=None, reason=reason,
                    last_error=(detail or "")[:ERROR_TEXT_LIMIT] or None, updated_at=utcnow())
        )
        if updated.rowcount != 1:
            return False
        for item in results:
            row = session.scalars(select(Result).where(Result.sop_instance_uid == item.sop_instance_uid)).first()
            if row is None:
                row = Result(job_id=job.job_id, instance_id=job.instance_id, kind=item.kind,
                             sop_instance_uid=item.sop_instance_uid, sop_class_uid=item.sop_class_uid,
                             series_instance_uid=item.series_instance_uid,
                             transfer_syntax_uid=item.transfer_syntax_uid, archive_path=item.archive_path,
                             size_bytes=item.size_bytes, analysed=item.analysed, reason=item.reason)
                session.add(row)
                session.flush()
            else:  # the same input analysed again with the same models: same object, same row
                row.job_id, row.size_bytes = job.job_id, item.size_bytes
            queue_exports(session, row, list(destinations))
        kinds = ",".join(r.kind for r in results) or "none"
        session.add(Event(kind=f"job_{state.value}", sop_instance_uid=job.sop_instance_uid,
                          detail=f"job {job.job_id} attempt {job.attempt}: {reason or 'analysed'}; results {kinds}"))
        return True


@dataclass(frozen=True)
class ResultRow:
    job_id: int
    kind: str
    sop_instance_uid: str
    archive_path: str
    analysed: bool
    reason: str
    exports: tuple[tuple[str, str], ...]  # (destination, state)


def results_of_jobs(engine: Engine, job_ids: Sequence[int]) -> dict[int, list[ResultRow]]:
    """Result objects (and their export states) of the given jobs, for the CLI."""
    if not job_ids:
        return {}
    out: dict[int, list[ResultRow]] = {}
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(Result).where(Result.job_id.in_(list(job_ids))).order_by(Result.id)).all()
        for r in rows:
            exports = tuple((e.destination, e.state.value) for e in session.scalars(
                select(Export).where(Export.result_id == r.id).order_by(Export.id)))
            out.setdefault(r.job_id, []).append(
                ResultRow(r.job_id, r.kind, r.sop_instance_uid, r.archive_path, r.analysed, r.reason, exports))
    return out
