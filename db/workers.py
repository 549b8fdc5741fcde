"""Analysis workers' heartbeats (table ``workers``): each worker process writes its row at start (with whether its
models loaded), refreshes ``last_seen`` every ``HEARTBEAT_SECONDS`` from its loop and sets ``stopped_at`` on a
clean stop. The console's "workers alive" and the readiness check read them; workers may run on other hosts
sharing the database, so the database, not the process table, is where they are seen.

A worker is *alive* when it has not stopped and was seen within ``ALIVE_SECONDS`` (three heartbeats): one missed
beat (a long batch, a busy database) is not yet death.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from .engine import readonly
from .models import WorkerHeartbeat, utcnow

HEARTBEAT_SECONDS = 5.0
ALIVE_SECONDS = 3 * HEARTBEAT_SECONDS


@dataclass(frozen=True)
class WorkerRow:
    name: str
    host: str
    pid: int
    device: str
    models_ok: bool
    models_detail: str | None
    jobs_done: int
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None

    def models(self) -> list[dict[str, str]]:
        """The loaded models (``models_detail`` as ``models_json`` wrote it); [] when they failed to load."""
        return parse_models(self.models_detail) if self.models_ok else []


def models_json(models: list[dict[str, str]]) -> str:
    """The loaded models as ``models_detail`` keeps them: a JSON list of {role, name, version, sha256}."""
    return json.dumps([{k: str(m.get(k, "")) for k in ("role", "name", "version", "sha256")} for m in models])


def parse_models(detail: str | None) -> list[dict[str, str]]:
    """``models_json``'s list back; [] for anything else (a failure reason, an older row)."""
    try:
        value: Any = json.loads(detail or "")
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    return [{str(k): str(v) for k, v in m.items()} for m in value if isinstance(m, dict)]


def _row(w: WorkerHeartbeat) -> WorkerRow:
    return WorkerRow(w.name, w.host, w.pid, w.device, w.models_ok, w.models_detail, w.jobs_done, w.started_at,
                     w.last_seen, w.stopped_at)


def upsert(engine: Engine, name: str, *, host: str, pid: int, device: str, models_ok: bool,
           models_detail: str | None) -> None:
    """A worker starts (or starts again under the same name): its row, fresh."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        row = session.get(WorkerHeartbeat, name)
        if row is None:
            row = WorkerHeartbeat(name=name[:128])
            session.add(row)
        row.host, row.pid, row.device = host[:128], pid, device[:16]
        row.models_ok, row.models_detail = models_ok, models_detail
        row.jobs_done, row.started_at, row.last_seen, row.stopped_at = 0, now, now, None


def beat(engine: Engine, name: str, jobs_done: int) -> None:
    """The worker is still there: ``last_seen`` now, and how many jobs it has processed since it started."""
    with Session(engine) as session, session.begin():
        session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.name == name)
                        .values(last_seen=utcnow(), jobs_done=jobs_done))


def stop(engine: Engine, name: str, jobs_done: int) -> None:
    """A clean stop: the worker is no longer expected to beat."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.name == name)
                        .values(last_seen=now, stopped_at=now, jobs_done=jobs_done))


def _alive_clause(now: datetime, within_seconds: float) -> Any:
    since = now - timedelta(seconds=within_seconds)
    return WorkerHeartbeat.stopped_at.is_(None) & (WorkerHeartbeat.last_seen >= since)


def list_alive(engine: Engine, within_seconds: float = ALIVE_SECONDS, now: datetime | None = None) -> list[WorkerRow]:
    """Workers not stopped and seen within ``within_seconds``, most recently started first."""
    now = now or utcnow()
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(WorkerHeartbeat).where(_alive_clause(now, within_seconds))
                               .order_by(WorkerHeartbeat.started_at.desc()))
        return [_row(w) for w in rows]


def count_alive(engine: Engine, within_seconds: float = ALIVE_SECONDS, now: datetime | None = None) -> int:
    now = now or utcnow()
    with Session(readonly(engine)) as session:
        return int(session.scalar(select(func.count()).select_from(WorkerHeartbeat)
                                  .where(_alive_clause(now, within_seconds))) or 0)


def list_workers(engine: Engine, limit: int = 100) -> list[WorkerRow]:
    """Every worker row, alive or not, most recently seen first (the console's workers page)."""
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.last_seen.desc()).limit(limit))
        return [_row(w) for w in rows]


def latest_models(engine: Engine) -> list[dict[str, str]]:
    """The models named by the most recently seen worker whose models loaded ([] when none did)."""
    with Session(readonly(engine)) as session:
        detail = session.scalar(select(WorkerHeartbeat.models_detail).where(WorkerHeartbeat.models_ok.is_(True))
                                .order_by(WorkerHeartbeat.last_seen.desc()).limit(1))
    return parse_models(detail)
