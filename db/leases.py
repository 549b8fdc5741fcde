"""Leases and their fence: the one implementation behind the job queue (``db.queue``) and the export queue
(``db.exports``).

A claim *leases* a row: it puts the row in its table's held state (jobs: running, exports: sending), names the
claimant in ``lease_owner`` and sets ``lease_expires_at`` to now plus the lease. Every write after the claim is
*fenced* (``Leased.held_by``): it applies only while the row is still held by that owner, so a worker or exporter
whose lease was taken back cannot overwrite the new owner's outcome; the write's row count tells the caller whether
it still held the lease. A row whose lease has expired (``Leased.expired``: its holder died or hung) is claimable
again; what a claim does with such a row (count the attempt, hand it out for its report only, dead-letter it) is
the queue's own policy, not this module's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Engine, and_, update
from sqlalchemy.orm import Session

from .models import Export, ExportState, Job, JobState, utcnow

RELEASED: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
"""The lease columns of a row that nobody holds (merge into the values of a fenced write that ends the lease)."""


@dataclass(frozen=True)
class Leased:
    """A table whose rows are leased: its ORM class and the state a leased row is in."""

    model: Any  # Job or Export: both have id, state, lease_owner and lease_expires_at
    held_state: Any

    def held_by(self, owner: str, ids: Iterable[int]) -> ColumnElement[bool]:
        """The fence: the rows ``ids`` are still in the held state under ``owner``'s lease."""
        ids = list(ids)
        which = self.model.id == ids[0] if len(ids) == 1 else self.model.id.in_(ids)
        return and_(which, self.model.state == self.held_state, self.model.lease_owner == owner)

    def expired(self, now: datetime) -> ColumnElement[bool]:
        """Rows still held whose lease ran out before ``now``: their holder died or hung."""
        return and_(self.model.state == self.held_state, self.model.lease_expires_at < now)

    def take(self, row: Any, owner: str, lease_seconds: float, now: datetime) -> datetime:
        """Lease ``row`` (an ORM object the caller's claim has locked) to ``owner``; returns the expiry."""
        row.state = self.held_state
        row.lease_owner = owner
        row.lease_expires_at = now + timedelta(seconds=lease_seconds)
        return row.lease_expires_at

    def fenced_update(self, session: Session, ids: Iterable[int], owner: str, **values: Any) -> int:
        """Apply ``values`` to those of ``ids`` that ``owner`` still holds, in the caller's transaction; returns how
        many it still held (0: every lease was lost, nothing written)."""
        ids = list(ids)
        if not ids:
            return 0
        result = cast(CursorResult[Any], session.execute(update(self.model).where(self.held_by(owner, ids))
                                                         .values(**values)))
        return int(result.rowcount)

    def extend(self, engine: Engine, ids: Iterable[int], owner: str, lease_seconds: float) -> int:
        """Keep the leases of ``ids`` for another ``lease_seconds``; returns how many ``owner`` still held."""
        with Session(engine) as session, session.begin():
            return self.fenced_update(session, ids, owner,
                                      lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))


JOBS = Leased(Job, JobState.RUNNING)
EXPORTS = Leased(Export, ExportState.SENDING)
