"""Association history of the Storage SCP: one row per association requested (accepted or rejected), with its
C-STORE counts, so the console can show counts, failures and last-seen per calling AE."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, case, func, select, update
from sqlalchemy.orm import Session

from .engine import readonly
from .models import AssociationRecord, utcnow


def open_association(engine: Engine, calling_aet: str, called_aet: str, peer_address: str, *, tls: bool,
                     accepted: bool, outcome: str = "open") -> int:
    """Record a new association (``accepted`` False: rejected, ``outcome`` says why); returns its id."""
    with Session(engine) as session, session.begin():
        row = AssociationRecord(calling_aet=calling_aet[:16], called_aet=called_aet[:16],
                                peer_address=peer_address[:64], tls=tls, accepted=accepted, outcome=outcome[:32],
                                ended_at=None if accepted else utcnow())
        session.add(row)
        session.flush()
        return int(row.id)


def count_store(engine: Engine, association_id: int, ok: bool) -> None:
    """One C-STORE answered on the association: success (or warning) or failure."""
    column = AssociationRecord.stores_ok if ok else AssociationRecord.stores_failed
    with Session(engine) as session, session.begin():
        session.execute(update(AssociationRecord).where(AssociationRecord.id == association_id)
                        .values({column: column + 1}))


def close_association(engine: Engine, association_id: int, outcome: str) -> None:
    """The association ended: ``released`` or ``aborted``."""
    with Session(engine) as session, session.begin():
        session.execute(update(AssociationRecord).where(AssociationRecord.id == association_id)
                        .values(outcome=outcome[:32], ended_at=utcnow()))


@dataclass(frozen=True)
class CallerSummary:
    calling_aet: str
    associations: int
    rejected: int
    aborted: int
    stores_ok: int
    stores_failed: int
    last_seen: datetime
    last_address: str
    tls: int  # associations over TLS


def callers(engine: Engine) -> list[CallerSummary]:
    """Per calling AE title: counts, failures and when it was last seen, most recent first."""
    a = AssociationRecord
    with Session(readonly(engine)) as session:
        rows = session.execute(
            select(a.calling_aet, func.count(), func.sum(case((a.accepted.is_(False), 1), else_=0)),
                   func.sum(case((a.outcome == "aborted", 1), else_=0)), func.sum(a.stores_ok),
                   func.sum(a.stores_failed), func.max(a.started_at), func.sum(case((a.tls.is_(True), 1), else_=0)))
            .group_by(a.calling_aet).order_by(func.max(a.started_at).desc())).all()
        out = []
        for aet, n, rejected, aborted, ok, failed, last, tls in rows:
            address = session.scalar(select(a.peer_address).where(a.calling_aet == aet)
                                     .order_by(a.id.desc()).limit(1)) or ""
            out.append(CallerSummary(aet, int(n), int(rejected or 0), int(aborted or 0), int(ok or 0),
                                     int(failed or 0), last, address, int(tls or 0)))
        return out


def recent_associations(engine: Engine, limit: int = 100, calling_aet: str | None = None) -> list[AssociationRecord]:
    """The newest associations (detached rows), optionally of one calling AE."""
    query = select(AssociationRecord).order_by(AssociationRecord.id.desc()).limit(limit)
    if calling_aet is not None:
        query = query.where(AssociationRecord.calling_aet == calling_aet)
    with Session(readonly(engine), expire_on_commit=False) as session:
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows
