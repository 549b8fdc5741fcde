"""The console's read queries: jobs, exports and audit events, filtered and paged, each page one query (joins, no
per-row lookups) plus one count for the pager; all on the read-only engine so that browsing never takes SQLite's
write lock from the intake or the workers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from .engine import readonly
from .exports import ExportRow, export_row
from .models import Event, Export, ExportState, Finding, Instance, Job, JobState, Result

T = TypeVar("T")
MAX_LIMIT = 1000
CSV_BATCH = 1000
ERROR_EVENT_KINDS = ("job_failed", "export_dead", "job_without_result", "champion_unusable", "training_failed",
                     "console_login_failed", "replaced")


@dataclass(frozen=True)
class JobFilter:
    """Every field optional; dates are whole days of ``Instance.received_at`` (UTC), both ends included."""

    state: JobState | None = None
    reason: str | None = None
    calling_aet: str | None = None
    received_from: date | None = None
    received_to: date | None = None


@dataclass(frozen=True)
class JobListRow:
    job_id: int
    instance_id: int
    sop_instance_uid: str
    state: str
    reason: str | None
    attempts: int
    modality: str | None
    calling_aet: str
    received_at: datetime
    updated_at: datetime
    probability: float | None  # the finding, when the job was analysed
    present: bool | None
    category: int | None
    model: str | None
    last_error: str | None


@dataclass(frozen=True)
class JobDetail:
    """One job with its instance row (no patient data: the database keeps none)."""

    job_id: int
    state: str
    reason: str | None
    attempts: int
    last_error: str | None
    lease_owner: str | None
    created_at: datetime
    updated_at: datetime
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    calling_aet: str
    received_at: datetime
    archive_path: str
    size_bytes: int
    transfer_syntax_uid: str
    in_scope: bool
    scope_reason: str


@dataclass(frozen=True)
class ResultWithExports:
    result_id: int
    kind: str
    sop_instance_uid: str
    archive_path: str
    analysed: bool
    reason: str
    created_at: datetime
    exports: tuple[ExportRow, ...]


@dataclass(frozen=True)
class EventRow:
    event_id: int
    at: datetime
    kind: str
    sop_instance_uid: str | None
    calling_aet: str | None
    detail: str | None
    actor: str | None


@dataclass(frozen=True)
class Page(Generic[T]):
    rows: list[T]
    total: int


def _bounded(limit: int) -> int:
    return max(1, min(int(limit), MAX_LIMIT))


def _job_conditions(f: JobFilter) -> list[Any]:
    conditions: list[Any] = []
    if f.state is not None:
        conditions.append(Job.state == f.state)
    if f.reason:
        conditions.append(Job.reason == f.reason)
    if f.calling_aet:
        conditions.append(Instance.calling_aet == f.calling_aet)
    if f.received_from is not None:
        conditions.append(Instance.received_at >= datetime.combine(f.received_from, time.min))
    if f.received_to is not None:
        conditions.append(Instance.received_at < datetime.combine(f.received_to + timedelta(days=1), time.min))
    return conditions


def _job_select(f: JobFilter) -> Select[Job, Instance, Finding]:
    return select(Job, Instance, Finding).join(Instance, Job.instance_id == Instance.id) \
        .outerjoin(Finding, Finding.job_id == Job.id).where(*_job_conditions(f))


def _job_row(job: Job, inst: Instance, finding: Finding | None) -> JobListRow:
    return JobListRow(
        job.id, inst.id, inst.sop_instance_uid, job.state.value, job.reason, job.attempts, inst.modality,
        inst.calling_aet, inst.received_at, job.updated_at,
        finding.probability if finding else None, finding.present if finding else None,
        finding.category if finding else None,
        f"{finding.model_name} {finding.model_version}" if finding else None, job.last_error)


def jobs(engine: Engine, f: JobFilter = JobFilter(), limit: int = 50, offset: int = 0) -> Page[JobListRow]:
    """Newest first."""
    with Session(readonly(engine)) as session:
        total = session.scalar(select(func.count()).select_from(Job).join(Instance, Job.instance_id == Instance.id)
                               .where(*_job_conditions(f))) or 0
        rows = session.execute(_job_select(f).order_by(Job.id.desc()).limit(_bounded(limit))
                               .offset(max(0, offset))).all()
        return Page([_job_row(*row) for row in rows], total)


def iter_jobs(engine: Engine, f: JobFilter = JobFilter(), batch: int = CSV_BATCH) -> Iterator[JobListRow]:
    """Every matching job, newest first, read in batches by id (keyset: no growing OFFSET) for the CSV download."""
    before: int | None = None
    while True:
        stmt = _job_select(f).order_by(Job.id.desc()).limit(batch)
        if before is not None:
            stmt = stmt.where(Job.id < before)
        with Session(readonly(engine)) as session:
            rows = [_job_row(*row) for row in session.execute(stmt).all()]
        yield from rows
        if len(rows) < batch:
            return
        before = rows[-1].job_id


def job_choices(engine: Engine) -> tuple[list[str], list[str]]:
    """The reasons and the calling AE titles that occur, for the filter menus."""
    with Session(readonly(engine)) as session:
        reasons = session.scalars(select(Job.reason).where(Job.reason.is_not(None)).distinct()
                                  .order_by(Job.reason).limit(500)).all()
        callers = session.scalars(select(Instance.calling_aet).distinct().order_by(Instance.calling_aet)
                                  .limit(500)).all()
    return [r for r in reasons if r], list(callers)


def job_detail(engine: Engine, job_id: int) -> JobDetail | None:
    with Session(readonly(engine)) as session:
        row = session.execute(select(Job, Instance).join(Instance, Job.instance_id == Instance.id)
                              .where(Job.id == job_id)).first()
        if row is None:
            return None
        job, i = row
        return JobDetail(job.id, job.state.value, job.reason, job.attempts, job.last_error, job.lease_owner,
                         job.created_at, job.updated_at, i.id, i.sop_instance_uid, i.sop_class_uid,
                         i.study_instance_uid, i.series_instance_uid, i.modality, i.calling_aet, i.received_at,
                         i.archive_path, i.size_bytes, i.transfer_syntax_uid, i.in_scope, i.scope_reason)


def results_of_job(engine: Engine, job_id: int) -> list[ResultWithExports]:
    """The job's result objects, each with its exports (two queries)."""
    with Session(readonly(engine)) as session:
        results = session.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.id)).all()
        exports: dict[int, list[ExportRow]] = {}
        if results:
            by_id = {r.id: r for r in results}
            for e in session.scalars(select(Export).where(Export.result_id.in_(list(by_id))).order_by(Export.id)):
                exports.setdefault(e.result_id, []).append(export_row(e, by_id[e.result_id]))
        return [ResultWithExports(r.id, r.kind, r.sop_instance_uid, r.archive_path, r.analysed, r.reason,
                                  r.created_at, tuple(exports.get(r.id, ()))) for r in results]


def result_path(engine: Engine, job_id: int, kind: str) -> str | None:
    """The archive path (relative to the storage root) of the job's newest result of ``kind``."""
    with Session(readonly(engine)) as session:
        return session.scalar(select(Result.archive_path).where(Result.job_id == job_id, Result.kind == kind)
                              .order_by(Result.id.desc()).limit(1))


RESENDABLE = (ExportState.DEAD, ExportState.PENDING)


def _export_conditions(state: ExportState | None, destination: str | None) -> list[Any]:
    conditions: list[Any] = []
    if state is not None:
        conditions.append(Export.state == state)
    if destination:
        conditions.append(Export.destination == destination)
    return conditions


def exports(engine: Engine, state: ExportState | None = None, destination: str | None = None, limit: int = 50,
            offset: int = 0) -> Page[ExportRow]:
    """Newest first."""
    conditions = _export_conditions(state, destination)
    with Session(readonly(engine)) as session:
        total = session.scalar(select(func.count()).select_from(Export).where(*conditions)) or 0
        rows = session.execute(select(Export, Result).join(Result, Export.result_id == Result.id).where(*conditions)
                               .order_by(Export.id.desc()).limit(_bounded(limit)).offset(max(0, offset))).all()
        return Page([export_row(e, r) for e, r in rows], total)


def _resendable(state: ExportState | None, destination: str | None, export_ids: Sequence[int] | None) -> list[Any]:
    conditions = _export_conditions(state, destination)
    conditions.append(or_(Export.state == ExportState.DEAD,
                          and_(Export.state == ExportState.PENDING, Export.attempts > 0)))
    if export_ids is not None:
        conditions.append(Export.id.in_(list(export_ids)))
    return conditions


def resendable_export_ids(engine: Engine, state: ExportState | None = None, destination: str | None = None,
                          export_ids: Sequence[int] | None = None, limit: int = 100_000) -> list[int]:
    """The exports matching the filter that a resend makes sense for: dead ones, and pending ones that already
    failed at least once (waiting for their backoff)."""
    with Session(readonly(engine)) as session:
        return list(session.scalars(select(Export.id).where(*_resendable(state, destination, export_ids))
                                    .order_by(Export.id).limit(limit)))


def count_resendable(engine: Engine, state: ExportState | None = None, destination: str | None = None) -> int:
    with Session(readonly(engine)) as session:
        return session.scalar(select(func.count()).select_from(Export)
                              .where(*_resendable(state, destination, None))) or 0


def export_destinations(engine: Engine) -> list[str]:
    with Session(readonly(engine)) as session:
        return list(session.scalars(select(Export.destination).distinct().order_by(Export.destination).limit(500)))


def _event_row(e: Event) -> EventRow:
    return EventRow(e.id, e.at, e.kind, e.sop_instance_uid, e.calling_aet, e.detail, e.actor)


def events(engine: Engine, kind: str | None = None, actor: str | None = None, limit: int = 50,
           offset: int = 0) -> Page[EventRow]:
    """The audit log, newest first."""
    conditions: list[Any] = []
    if kind:
        conditions.append(Event.kind == kind)
    if actor:
        conditions.append(Event.actor == actor)
    with Session(readonly(engine)) as session:
        total = session.scalar(select(func.count()).select_from(Event).where(*conditions)) or 0
        rows = session.scalars(select(Event).where(*conditions).order_by(Event.id.desc())
                               .limit(_bounded(limit)).offset(max(0, offset))).all()
        return Page([_event_row(e) for e in rows], total)


def event_choices(engine: Engine) -> tuple[list[str], list[str]]:
    """The event kinds and actors that occur, for the filter menus."""
    with Session(readonly(engine)) as session:
        kinds = session.scalars(select(Event.kind).distinct().order_by(Event.kind).limit(500)).all()
        actors = session.scalars(select(Event.actor).where(Event.actor.is_not(None)).distinct()
                                 .order_by(Event.actor).limit(500)).all()
    return list(kinds), [a for a in actors if a]


def events_of_instance(engine: Engine, sop_instance_uid: str, limit: int = 500) -> list[EventRow]:
    """Every event of one SOP instance, oldest first (its story)."""
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(Event).where(Event.sop_instance_uid == sop_instance_uid)
                               .order_by(Event.id).limit(limit)).all()
        return [_event_row(e) for e in rows]


def error_events(engine: Engine, limit: int = 10, kinds: Sequence[str] = ERROR_EVENT_KINDS) -> list[EventRow]:
    """The latest events that report something that went wrong, newest first."""
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(Event).where(Event.kind.in_(list(kinds))).order_by(Event.id.desc())
                               .limit(_bounded(limit))).all()
        return [_event_row(e) for e in rows]


