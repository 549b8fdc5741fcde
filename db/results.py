"""Recording what a worker produced: the job's final state, its result objects and their exports, in one commit;
for an analysed job, its report (SR and SEG) in a commit of its own just before (``record_report``), so that it goes
to PACS while the heat-map SC is still being built.

A job ends (done, not analysed, failed) in the same transaction that records its result rows and queues their
export, fenced by the worker's lease: a worker that lost its lease records nothing, and the worker that took the job
over writes the same result UIDs (they are derived from the source and the model versions), so a result exists
once whatever happens to the workers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.orm import Session

from .engine import readonly
from .findings import FindingValues, add_finding
from .instances import NO_REPORT_REASONS
from .leases import JOBS, RELEASED
from .models import Event, Export, Job, JobState, Result, utcnow
from .queue import ERROR_TEXT_LIMIT, NO_RESULT_EVENT, ClaimedJob

DELIBERATELY_SILENT = NO_REPORT_REASONS | {"own_result"}
"""Reasons for which a job ends with no result object by design: not an image, or the node's own result."""


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
               results: Sequence[ResultFile], routes: Mapping[str, Collection[str]],
               notes: Sequence[tuple[str, str]] = (), finding: FindingValues | None = None) -> bool:
    """End ``job`` in ``state`` and record ``results`` with one export per destination of ``routes`` (name ->
    result kinds) that takes its kind, and ``notes``
    (event kind, detail: e.g. the header repairs, by attribute keyword) as audit events of the job, and the
    classifier's ``finding`` (analysed jobs).

    Returns False (and records nothing) when this worker no longer holds the job's lease.
    """
    with Session(engine) as session, session.begin():
        if not JOBS.fenced_update(session, [job.job_id], job.lease_owner, state=state, reason=reason,
                                  last_error=(detail or "")[:ERROR_TEXT_LIMIT] or None, updated_at=utcnow(),
                                  **RELEASED):
            return False
        _record_results(session, job, results, routes)
        for kind, note in notes:
            session.add(Event(kind=kind, sop_instance_uid=job.sop_instance_uid, detail=f"job {job.job_id}: {note}"))
        if finding is not None:
            add_finding(session, job.job_id, job.instance_id, finding)
        kinds = ",".join(r.kind for r in results) or "none"
        session.add(Event(kind=f"job_{state.value}", sop_instance_uid=job.sop_instance_uid,
                          detail=f"job {job.job_id} attempt {job.attempt}: {reason or 'analysed'}; results {kinds}"))
        if not results and reason not in DELIBERATELY_SILENT:
            session.add(Event(kind=NO_RESULT_EVENT, sop_instance_uid=job.sop_instance_uid,
                              detail=f"job {job.job_id} ended {state.value} ({reason}) with no result object"))
        return True


def record_report(engine: Engine, job: ClaimedJob, results: Sequence[ResultFile],
                  routes: Mapping[str, Collection[str]], finding: FindingValues | None = None) -> bool:
    """Record the report of a job still in progress (its SR and the SEG it measures on) with their exports and the
    classifier's ``finding``, in one commit fenced by the lease, so that the report goes to PACS before the job's
    last object (the heat-map SC) is built; the job stays running until ``finish_job`` ends it.

    Recording the same objects again (a retried job, the same models: the same UIDs) changes nothing and queues no
    second export. Returns False (and records nothing) when this worker no longer holds the job's lease."""
    with Session(engine) as session, session.begin():
        if not JOBS.fenced_update(session, [job.job_id], job.lease_owner, updated_at=utcnow()):
            return False
        _record_results(session, job, results, routes)
        if finding is not None:
            add_finding(session, job.job_id, job.instance_id, finding)
    return True


def _record_results(session: Session, job: ClaimedJob, results: Sequence[ResultFile],
                    routes: Mapping[str, Collection[str]]) -> None:
    """One row per result object (the row of the same UID again when it exists) and its pending exports."""
    from .exports import queue_exports

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
        queue_exports(session, row, routes)


def reported_results(engine: Engine, job_id: int) -> list[ResultFile]:
    """The result objects already recorded for ``job_id`` when they include an analysed SR (``record_report`` of an
    earlier attempt), else none: a job whose worker died after its report was sent must not get a second,
    contradicting "not analysed" SR."""
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.id)).all()
        if not any(r.kind == "sr" and r.analysed for r in rows):
            return []
        return [ResultFile(kind=r.kind, sop_instance_uid=r.sop_instance_uid, sop_class_uid=r.sop_class_uid,
                           series_instance_uid=r.series_instance_uid, transfer_syntax_uid=r.transfer_syntax_uid,
                           archive_path=r.archive_path, size_bytes=r.size_bytes, analysed=r.analysed,
                           reason=r.reason) for r in rows]


def count_without_result(engine: Engine) -> int:
    """Jobs that ended (done, failed, not analysed) with no result object, not counting the deliberately silent
    ones: each is an image a radiologist would get no answer for."""
    ended = (JobState.DONE, JobState.FAILED, JobState.NOT_ANALYSED)
    with Session(readonly(engine)) as session:
        has_result = select(Result.id).where(Result.job_id == Job.id).exists()
        return int(session.scalar(
            select(func.count()).select_from(Job).where(
                Job.state.in_(ended), ~has_result,
                or_(Job.reason.is_(None), Job.reason.not_in(sorted(DELIBERATELY_SILENT))))) or 0)


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
