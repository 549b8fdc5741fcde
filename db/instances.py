"""Recording received instances: the instance row and its analysis job are committed in one transaction."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from .engine import readonly
from .models import Event, Instance, Job, JobState, utcnow


@dataclass(frozen=True)
class ReceivedInstance:
    """Technical facts about one archived file; no patient name or ID by design, only the pseudonymous
    ``patient_key`` (``dicom_node.patient_key``; None when the builder was given no secret)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None
    modality: str | None
    calling_aet: str
    archive_path: str
    size_bytes: int
    sha256: str
    transfer_syntax_uid: str
    in_scope: bool
    scope_reason: str
    patient_key: str | None = None


@dataclass(frozen=True)
class StoredInstance:
    instance_id: int
    archive_path: str
    sha256: str
    calling_aet: str


NO_REPORT_REASONS = frozenset({"sop_class_not_radiograph"})
"""Scope verdicts that end at intake, without a "not analysed" SR: objects that are not images at all (SR, SEG,
presentation states, ... including our own results if a PACS routes them back) must never cause reports about
themselves. Every other refusal (e.g. a knee CR) is queued so that the worker answers it with a "not analysed" SR."""


def needs_worker(rec: ReceivedInstance) -> bool:
    return rec.in_scope or rec.scope_reason not in NO_REPORT_REASONS


def _initial_job(rec: ReceivedInstance) -> Job:
    if needs_worker(rec):
        return Job(state=JobState.QUEUED, attempts=0)
    return Job(state=JobState.NOT_ANALYSED, attempts=0, reason=rec.scope_reason)


def find_instance(engine: Engine, sop_instance_uid: str) -> StoredInstance | None:
    with readonly(engine).connect() as conn:
        row = conn.execute(
            select(Instance.id, Instance.archive_path, Instance.sha256, Instance.calling_aet)
            .where(Instance.sop_instance_uid == sop_instance_uid)
        ).first()
    return StoredInstance(*row) if row is not None else None


def record_new(engine: Engine, rec: ReceivedInstance) -> int:
    """Insert the instance, its job and a 'received' event atomically; returns the job id.

    Raises sqlalchemy.exc.IntegrityError when another association recorded the same SOP Instance UID first.
    """
    # Core statements, not the ORM: this runs once per received instance, inside the C-STORE's latency.
    now = utcnow()
    job = _initial_job(rec)
    with engine.begin() as conn:
        instance_id = conn.execute(
            insert(Instance).values(**{f.name: getattr(rec, f.name) for f in fields(rec)}, received_at=now)
            .returning(Instance.id)
        ).scalar_one()
        job_id = conn.execute(
            insert(Job).values(instance_id=instance_id, state=job.state, attempts=0, reason=job.reason,
                               created_at=now, updated_at=now).returning(Job.id)
        ).scalar_one()
        conn.execute(insert(Event).values(at=now, kind="received", sop_instance_uid=rec.sop_instance_uid,
                                          calling_aet=rec.calling_aet,
                                          detail=f"{rec.size_bytes} bytes, scope={rec.scope_reason}"))
    return int(job_id)


def record_replacement(engine: Engine, rec: ReceivedInstance, set_aside_path: str) -> int | None:
    """The archived file was replaced by new content: update the row and make sure the new content is analysed.

    A job still queued will read the new file anyway, so no second job is added for it; otherwise a new job is
    queued. Returns the id of the job that will analyse the new content (None when out of scope).
    """
    with Session(engine) as session, session.begin():
        inst = session.scalars(select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid)).one()
        for f in fields(rec):
            setattr(inst, f.name, getattr(rec, f.name))
        inst.received_at = utcnow()
        session.add(Event(kind="replaced", sop_instance_uid=rec.sop_instance_uid, calling_aet=rec.calling_aet,
                          detail=f"new sha256 {rec.sha256}; previous copy kept at {set_aside_path}"))
        queued = [j for j in inst.jobs if j.state == JobState.QUEUED]
        if queued and needs_worker(rec):
            return queued[0].id
        for job in queued:  # not an image now: the queued job must not look at it
            job.state = JobState.NOT_ANALYSED
            job.reason = rec.scope_reason
        job = _initial_job(rec)
        inst.jobs.append(job)
        session.flush()
        return job.id if needs_worker(rec) else None


def record_event(engine: Engine, kind: str, sop_instance_uid: str | None, calling_aet: str | None,
                 detail: str) -> None:
    with Session(engine) as session, session.begin():
        session.add(Event(kind=kind, sop_instance_uid=sop_instance_uid, calling_aet=calling_aet, detail=detail))


def instance_uids(engine: Engine, instance_id: int) -> tuple[str, str, str, str] | None:
    """(SOP Class, Study, Series, SOP Instance UID) as recorded at intake; None for an unknown id."""
    with Session(readonly(engine)) as session:
        inst = session.get(Instance, instance_id)
        if inst is None:
            return None
        return inst.sop_class_uid, inst.study_instance_uid, inst.series_instance_uid, inst.sop_instance_uid
