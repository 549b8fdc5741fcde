"""The database side of archive/database reconciliation (``dicom_node.reconcile`` walks the archive).

Archived files the database does not know are registered with the same rows the intake writes (instance, job,
audit event), in batches of one transaction each; rows whose file is missing are only reported, never deleted.
Each run's counts are kept as an ``events`` row of kind ``reconciled`` (a JSON detail), which ``dicom-node
status`` shows: no schema change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, select

from .engine import readonly
from .instances import ReceivedInstance, _initial_job
from .models import Event, Instance, Job, JobState, utcnow

RECONCILED_EVENT = "reconciled"
REREGISTERED_EVENT = "reregistered"
REGISTERED_MEANWHILE = "registered meanwhile"
UID_CHUNK = 500  # bound parameters per IN (SQLite allows 32766; keep statements small)


@dataclass(frozen=True)
class Registered:
    sop_instance_uid: str
    archive_path: str
    job_id: int
    job_state: JobState
    scope_reason: str


def known_archive_paths(engine: Engine) -> dict[str, str]:
    """archive_path -> SOP Instance UID of every instance row."""
    with readonly(engine).connect() as conn:
        return {path: uid for path, uid in conn.execute(select(Instance.archive_path, Instance.sop_instance_uid))}


def register_found(engine: Engine, found: Iterable[tuple[ReceivedInstance, datetime]]
                   ) -> tuple[list[Registered], list[tuple[ReceivedInstance, str]]]:
    """Insert instance, job and a 'reregistered' event for each record, in one transaction.

    A record whose SOP Instance UID or archive path got a row meanwhile (the intake, another reconciliation) is
    skipped and returned with the reason, as is one whose SOP Instance UID is registered at another path.
    Returns (registered, skipped)."""
    records = list(found)
    registered: list[Registered] = []
    skipped: list[tuple[ReceivedInstance, str]] = []
    if not records:
        return registered, skipped
    with engine.begin() as conn:  # BEGIN IMMEDIATE: no other writer between the lookup and the inserts
        taken: dict[str, str] = {}
        uids = [rec.sop_instance_uid for rec, _ in records]
        for start in range(0, len(uids), UID_CHUNK):
            chunk = uids[start:start + UID_CHUNK]
            taken.update(conn.execute(select(Instance.sop_instance_uid, Instance.archive_path)
                                      .where(Instance.sop_instance_uid.in_(chunk))).all())
        now = utcnow()
        new: list[tuple[ReceivedInstance, datetime]] = []
        for rec, received_at in records:
            if rec.sop_instance_uid in taken:
                same_path = taken[rec.sop_instance_uid] == rec.archive_path
                skipped.append((rec, REGISTERED_MEANWHILE if same_path else
                                "its SOP Instance UID is registered with another archive path"))
            else:
                taken[rec.sop_instance_uid] = rec.archive_path
                new.append((rec, received_at))
        if not new:
            return registered, skipped
        # One executemany per table (the rows the intake's record_new writes, for many instances at once).
        ids = conn.execute(
            insert(Instance).returning(Instance.id, sort_by_parameter_order=True),
            [{**{f.name: getattr(rec, f.name) for f in fields(rec)}, "received_at": received_at}
             for rec, received_at in new],
        ).scalars().all()
        jobs = [_initial_job(rec) for rec, _ in new]
        job_ids = conn.execute(
            insert(Job).returning(Job.id, sort_by_parameter_order=True),
            [{"instance_id": instance_id, "state": job.state, "attempts": 0, "reason": job.reason,
              "created_at": now, "updated_at": now} for instance_id, job in zip(ids, jobs, strict=True)],
        ).scalars().all()
        conn.execute(insert(Event), [
            {"at": now, "kind": REREGISTERED_EVENT, "sop_instance_uid": rec.sop_instance_uid, "calling_aet": None,
             "detail": f"found in the archive but not in the database; {rec.size_bytes} bytes, "
                       f"scope={rec.scope_reason}"} for rec, _ in new])
        registered = [Registered(rec.sop_instance_uid, rec.archive_path, int(job_id), job.state, rec.scope_reason)
                      for (rec, _), job_id, job in zip(new, job_ids, jobs, strict=True)]
    return registered, skipped


def record_reconciliation(engine: Engine, counts: dict[str, Any]) -> None:
    """Keep one run's counts (JSON) as the latest 'reconciled' event."""
    with engine.begin() as conn:
        conn.execute(insert(Event).values(at=utcnow(), kind=RECONCILED_EVENT, detail=json.dumps(counts)))


def last_reconciliation(engine: Engine) -> tuple[datetime, dict[str, Any]] | None:
    """(time, counts) of the latest reconciliation, None if there was none in this database."""
    with readonly(engine).connect() as conn:
        row = conn.execute(select(Event.at, Event.detail).where(Event.kind == RECONCILED_EVENT)
                           .order_by(Event.id.desc()).limit(1)).first()
    if row is None:
        return None
    try:
        counts = json.loads(row.detail or "{}")
    except ValueError:
        counts = {}
    return row.at, counts if isinstance(counts, dict) else {}
