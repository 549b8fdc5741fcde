"""The export queue: which result goes to which configured destination, and when it is tried next.

An export is *queued* (pending, due now) in the transaction that records its result, one row per destination whose
``types`` include the result's kind. An exporter *claims* due rows under a lease (state sending, attempts + 1), sends
them, then either marks them *sent* or *schedules a retry* with exponential backoff; after ``max_attempts`` failed
attempts an export is dead-lettered (state dead, its last error kept) until ``resend`` puts it back. A claimed export
that was never tried (its batch's association was lost before its turn) is *given back*: pending again, the claim's
attempt not counted. Every write after
the claim is fenced by the lease owner, as in ``db.queue``: an exporter whose lease was taken back cannot overwrite
the new owner's outcome. A row whose lease expired (crashed exporter) is claimable again.

On SQLite the claim runs inside BEGIN IMMEDIATE (see ``db.engine``); on PostgreSQL it renders
``FOR UPDATE SKIP LOCKED`` so that concurrent exporters skip each other's rows.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, and_, case, func, or_, select
from sqlalchemy.orm import Session

from .engine import readonly
from .leases import EXPORTS, RELEASED
from .models import Event, Export, ExportState, Result, utcnow
from .queue import ERROR_TEXT_LIMIT

MAX_BACKOFF_EXPONENT = 60  # 2**60 times any initial delay is far beyond every sensible cap


@dataclass(frozen=True)
class ClaimedExport:
    """What an exporter needs to send one claimed export, detached from any session."""

    export_id: int
    result_id: int
    destination: str
    kind: str
    archive_path: str  # relative to the storage root
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    attempt: int  # 1 for the first try
    lease_owner: str
    lease_expires_at: datetime


def queue_exports(session: Session, result: Result, routes: Mapping[str, Collection[str]]) -> list[Export]:
    """Add one pending export of ``result`` per destination whose result kinds (``routes``: destination name ->
    kinds it takes) include ``result.kind``, inside the caller's transaction; returns the rows added.

    Idempotent: a (result, destination) pair that already has an export, whatever its state, is left alone
    (``uq_exports_result_destination`` backs this up)."""
    wanted = [name for name, kinds in routes.items() if result.kind in kinds]
    if not wanted:
        return []
    if result.id is None:
        session.flush()
    existing = set(session.scalars(select(Export.destination).where(Export.result_id == result.id)).all())
    now = utcnow()
    added = []
    for name in wanted:
        if name in existing:
            continue
        export = Export(result_id=result.id, destination=name, state=ExportState.PENDING, attempts=0,
                        next_attempt_at=now, created_at=now, updated_at=now)
        session.add(export)
        added.append(export)
        existing.add(name)
    if added:
        session.flush()
    return added


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(and_(Export.state == ExportState.PENDING, Export.next_attempt_at <= now), EXPORTS.expired(now))


def claim_statement(now: datetime, limit: int, destinations: Collection[str] | None = None
                    ) -> Select[Export, Result]:
    """Due exports with their results, oldest due first, row-locked (PostgreSQL skips rows being claimed)."""
    stmt = (select(Export, Result).join(Result, Export.result_id == Result.id).where(_claimable(now))
            .order_by(Export.next_attempt_at, Export.id).limit(limit)
            .with_for_update(skip_locked=True, of=Export))
    if destinations is not None:
        stmt = stmt.where(Export.destination.in_(list(destinations)))
    return stmt


def claim_due(engine: Engine, owner: str, lease_seconds: float, limit: int,
              destinations: Collection[str] | None = None, max_attempts: int | None = None) -> list[ClaimedExport]:
    """Claim up to ``limit`` due exports for ``owner``: pending ones whose ``next_attempt_at`` has come, and
    sending ones whose lease expired (their exporter died). Each claim counts as an attempt.

    ``destinations`` restricts the claim to those names (exports for a destination no longer configured then stay
    pending, untouched). With ``max_attempts``, a row taken back from a dead exporter that has already used all its
    attempts is dead-lettered instead of being handed out again.
    """
    if limit <= 0 or (destinations is not None and not destinations):
        return []
    now = utcnow()
    claimed: list[ClaimedExport] = []
    with Session(engine) as session, session.begin():
        for export, result in session.execute(claim_statement(now, limit, destinations)).all():
            if export.state == ExportState.SENDING and not _take_back(session, export, result, max_attempts):
                continue
            lease_expires_at = EXPORTS.take(export, owner, lease_seconds, now)
            _set(export, attempts=export.attempts + 1)
            claimed.append(ClaimedExport(
                export_id=export.id, result_id=result.id, destination=export.destination, kind=result.kind,
                archive_path=result.archive_path, sop_class_uid=result.sop_class_uid,
                sop_instance_uid=result.sop_instance_uid, transfer_syntax_uid=result.transfer_syntax_uid,
                attempt=export.attempts, lease_owner=owner, lease_expires_at=lease_expires_at,
            ))
    return claimed


def _take_back(session: Session, export: Export, result: Result, max_attempts: int | None) -> bool:
    """An export whose lease expired while it was being sent (its exporter died): recorded as taken back, or
    dead-lettered when that was its last attempt (``max_attempts``; None: never). Returns whether it may be sent
    again."""
    taken_from = export.lease_owner
    if max_attempts is not None and export.attempts >= max_attempts:
        _set(export, state=ExportState.DEAD, **RELEASED,
             last_error=f"exporter {taken_from} lost its lease on attempt {export.attempts}")
        session.add(Event(kind="export_dead", sop_instance_uid=result.sop_instance_uid,
                          detail=f"export {export.id} to {export.destination}: lease expired after "
                                 f"{export.attempts} attempts"))
        return False
    session.add(Event(kind="export_taken_back", sop_instance_uid=result.sop_instance_uid,
                      detail=f"export {export.id} to {export.destination}: lease of {taken_from} expired"))
    return True


def reclaim_expired(engine: Engine, max_attempts: int) -> int:
    """Exports whose exporter died while sending them (their lease expired: a live exporter renews its lease before
    every step of a round, ``dicom_node.export``) back to pending, the lost attempt counted, due as they were; dead
    when it was their last attempt. Returns how many were taken back.

    ``claim_due`` takes such rows back by itself, but only for the destinations a running exporter serves; this sweep
    (``serve``'s ``lease-reclaim`` job) covers every row and keeps ``dicom-node status`` from counting them as being
    sent."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        rows = session.execute(
            select(Export, Result).join(Result, Export.result_id == Result.id).where(EXPORTS.expired(now))
            .with_for_update(skip_locked=True, of=Export)
        ).all()
        for export, result in rows:
            if _take_back(session, export, result, max_attempts):
                _set(export, state=ExportState.PENDING, **RELEASED)
        return len(rows)


def _set(export: Export, **values: Any) -> None:
    for key, value in values.items():
        setattr(export, key, value)
    export.updated_at = utcnow()


def _fenced_row(session: Session, export_id: int, owner: str) -> tuple[Export, Result] | None:
    """The export and its result, row-locked, if ``owner`` still holds its lease."""
    row = session.execute(
        select(Export, Result).join(Result, Export.result_id == Result.id)
        .where(EXPORTS.held_by(owner, [export_id]))
        .with_for_update(of=Export)
    ).first()
    return (row[0], row[1]) if row is not None else None


def mark_sent(engine: Engine, export_id: int, owner: str, sent_to: str, status: int | None) -> bool:
    """The peer acknowledged the object (``status`` 0x0000 or a warning); False when ``owner`` lost the lease."""
    with Session(engine) as session, session.begin():
        row = _fenced_row(session, export_id, owner)
        if row is None:
            return False
        export, result = row
        _set(export, state=ExportState.SENT, **RELEASED, last_status=status, last_error=None,
             sent_to=sent_to[:128], sent_at=utcnow())
        status_text = f"0x{status:04X}" if status is not None else "-"
        session.add(Event(kind="export_sent", sop_instance_uid=result.sop_instance_uid,
                          detail=f"export {export.id} to {export.destination} ({sent_to}) on attempt "
                                 f"{export.attempts}, status {status_text}"))
        return True


def backoff_seconds(attempts: int, initial: float, cap: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: initial, 2 x initial, 4 x initial ... up to cap."""
    return min(cap, initial * 2 ** min(max(attempts - 1, 0), MAX_BACKOFF_EXPONENT))


def schedule_retry(engine: Engine, export_id: int, owner: str, status: int | None, error: str, initial: float,
                   cap: float, max_attempts: int, retryable: bool = True) -> ExportState | None:
    """Record a failed attempt: pending again after ``backoff_seconds`` while attempts remain, else dead (also at
    once when not ``retryable``). Returns the new state, or None when ``owner`` no longer held the lease."""
    with Session(engine) as session, session.begin():
        row = _fenced_row(session, export_id, owner)
        if row is None:
            return None
        export, result = row
        final = not retryable or export.attempts >= max_attempts
        now = utcnow()
        if final:
            _set(export, state=ExportState.DEAD, **RELEASED, last_status=status,
                 last_error=error[:ERROR_TEXT_LIMIT])
            detail = f"dead after {export.attempts} attempt(s): {error}"
        else:
            delay = backoff_seconds(export.attempts, initial, cap)
            _set(export, state=ExportState.PENDING, **RELEASED, last_status=status,
                 last_error=error[:ERROR_TEXT_LIMIT], next_attempt_at=now + timedelta(seconds=delay))
            detail = f"attempt {export.attempts} failed, next in {delay:g} s: {error}"
        session.add(Event(kind="export_dead" if final else "export_retry", sop_instance_uid=result.sop_instance_uid,
                          detail=f"export {export.id} to {export.destination}: {detail}"[:ERROR_TEXT_LIMIT]))
        return export.state


def give_back(engine: Engine, export_ids: Iterable[int], owner: str, delay_seconds: float = 0.0,
              note: str | None = None) -> int:
    """Return claimed exports that were never tried (the association was lost earlier in their batch, or the
    exporter is stopping) to pending without spending an attempt: the claim's attempt is taken back, the lease
    released, due after ``delay_seconds``; ``note``, when given, becomes the last error (the reason they are still
    pending). Fenced like every write after the claim; returns how many this owner still held."""
    ids = list(export_ids)
    if not ids:
        return 0
    now = utcnow()
    values: dict[str, Any] = {
        "state": ExportState.PENDING, "attempts": case((Export.attempts > 0, Export.attempts - 1), else_=0),
        **RELEASED, "next_attempt_at": now + timedelta(seconds=max(delay_seconds, 0.0)), "updated_at": now,
    }
    if note is not None:
        values["last_error"] = note[:ERROR_TEXT_LIMIT]
    with Session(engine) as session, session.begin():
        return EXPORTS.fenced_update(session, ids, owner, **values)


def extend_lease(engine: Engine, export_ids: Iterable[int], owner: str, lease_seconds: float) -> int:
    """Keep a long batch; returns how many of ``export_ids`` this owner still holds."""
    return EXPORTS.extend(engine, export_ids, owner, lease_seconds)


def resend(engine: Engine, export_ids: Iterable[int] | None = None,
           states: Collection[ExportState] = (ExportState.DEAD,)) -> int:
    """Put exports in ``states`` (all of them, or only ``export_ids``) back to pending, attempts 0, due now;
    returns how many. Rows being sent are never touched: SENDING in ``states`` is refused."""
    states = [ExportState(s) for s in states]
    if ExportState.SENDING in states:
        raise ValueError("exports being sent cannot be re-queued")
    if not states:
        return 0
    ids = None if export_ids is None else list(export_ids)
    if ids is not None and not ids:
        return 0
    now = utcnow()
    with Session(engine) as session, session.begin():
        stmt = select(Export, Result.sop_instance_uid).join(Result, Export.result_id == Result.id) \
            .where(Export.state.in_(states)).with_for_update(skip_locked=True, of=Export)
        if ids is not None:
            stmt = stmt.where(Export.id.in_(ids))
        rows = session.execute(stmt).all()
        for export, sop_instance_uid in rows:
            session.add(Event(kind="export_resend", sop_instance_uid=sop_instance_uid,
                              detail=f"export {export.id} to {export.destination}: {export.state.value} -> "
                                     f"pending after {export.attempts} attempt(s)"))
            _set(export, state=ExportState.PENDING, attempts=0, next_attempt_at=now, lease_owner=None,
                 lease_expires_at=None, sent_to=None, sent_at=None)
        return len(rows)


def export_counts(engine: Engine) -> dict[str, int]:
    """Exports per state (every state present, zero or not)."""
    with Session(readonly(engine)) as session:
        rows = session.execute(select(Export.state, func.count()).group_by(Export.state)).all()
    counts = {state.value: 0 for state in ExportState}
    counts.update({state.value if isinstance(state, ExportState) else str(state): n for state, n in rows})
    return counts


@dataclass(frozen=True)
class ExportRow:
    export_id: int
    result_id: int
    job_id: int
    kind: str
    sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    sent_to: str | None
    sent_at: datetime | None
    updated_at: datetime


def list_exports(engine: Engine, state: ExportState | str | None = None, limit: int = 100) -> list[ExportRow]:
    """Newest first, for the CLI and the tests."""
    with Session(readonly(engine)) as session:
        stmt = select(Export, Result).join(Result, Export.result_id == Result.id) \
            .order_by(Export.id.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(Export.state == ExportState(state))
        return [export_row(e, r) for e, r in session.execute(stmt).all()]


def export_row(e: Export, r: Result) -> ExportRow:
    """The row of an export and its result, as the CLI and the console list it."""
    return ExportRow(e.id, r.id, r.job_id, r.kind, r.sop_instance_uid, e.destination, e.state.value, e.attempts,
                     e.next_attempt_at, e.last_status, e.last_error, e.sent_to, e.sent_at, e.updated_at)
