"""Health endpoints for machines (load balancers, orchestrators, monitoring): no login, no patient data.

- ``GET /health/live``: 200 ``{"status": "live"}`` while the process answers at all.
- ``GET /health/ready``: 200 when the node can take and analyse images, else 503; both with
  ``{"status": "ready" | "not ready", "reasons": [...], "checks": {...}}``. Not ready when the database is
  unreachable (or its file was removed or replaced: ``db.integrity``), free disk is below
  ``storage.free_disk_reserve_mb`` (C-STOREs are refused), no analysis worker has a live heartbeat
  (``db.workers``; also with ``worker.processes = 0`` when no external worker beats), or a live worker's models
  failed to load (its jobs end with "not analysed" SRs).

The database check is bounded: it runs on a helper thread and counts as unreachable after
``DATABASE_TIMEOUT_S`` (PostgreSQL also gets a statement timeout); while one check is still stuck, the next ones
answer at once from that instead of piling up threads.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ai.safe_text import exception_summary
from db.engine import readonly
from db.integrity import guard_of
from db.workers import ALIVE_SECONDS, list_alive

from .context import ConsoleContext

DATABASE_TIMEOUT_S = 2.0


class _DatabaseProbe:
    """``SELECT 1`` on a helper thread, at most one in flight per engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Future[None], float]] = {}  # id(engine) -> the check in flight, its start

    def check(self, engine: Engine, timeout: float = DATABASE_TIMEOUT_S) -> str | None:
        """None when the database answered within ``timeout``, else a short log-safe reason."""
        guard = guard_of(engine)
        if guard is not None and guard.tripped:
            return f"database file {guard.reason}"
        with self._lock:
            pending = self._pending.get(id(engine))
            if pending is not None and not pending[0].done():
                return f"database did not answer for {time.monotonic() - pending[1]:.0f} s"
            future: Future[None] = Future()
            self._pending[id(engine)] = (future, time.monotonic())
        threading.Thread(target=self._run, args=(engine, future, timeout), name="health-db", daemon=True).start()
        try:
            future.result(timeout=timeout)
        except TimeoutError:
            return f"database did not answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "unreachable"; its text withheld
            return f"database unreachable ({exception_summary(exc, message='connection or query failed')})"
        return None

    @staticmethod
    def _run(engine: Engine, future: Future[None], timeout: float) -> None:
        try:
            with readonly(engine).connect() as connection:
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SET statement_timeout = {int(timeout * 1000)}")
                connection.execute(text("SELECT 1"))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            future.set_exception(exc)
        else:
            future.set_result(None)


_PROBE = _DatabaseProbe()


def readiness(ctx: ConsoleContext) -> tuple[bool, list[str], dict[str, Any]]:
    """Whether the node is ready, the reasons it is not (short, no patient data) and every check's details."""
    reasons: list[str] = []
    checks: dict[str, Any] = {}

    started = time.perf_counter()
    db_problem = _PROBE.check(ctx.engine)
    checks["database"] = {"ok": db_problem is None, "backend": ctx.engine.dialect.name,
                          "seconds": round(time.perf_counter() - started, 4)}
    if db_problem is not None:
        checks["database"]["problem"] = db_problem
        reasons.append(db_problem)

    reserve = ctx.archive.reserve_bytes
    try:
        free: int | None = ctx.archive.free_bytes()
    except OSError as exc:
        free = None
        reasons.append(f"storage root unreadable ({exception_summary(exc, message='disk usage failed')})")
    checks["disk"] = {"ok": free is not None and free >= reserve, "free_bytes": free, "reserve_bytes": reserve}
    if free is not None and free < reserve:
        reasons.append(f"free disk below the reserve ({free >> 20} MiB free, {reserve >> 20} MiB reserved): "
                       "C-STOREs are refused")

    configured = ctx.config.worker.processes
    if db_problem is not None:  # workers and models are only known from the database
        checks["workers"] = {"ok": False, "alive": None, "processes_configured": configured}
        checks["models"] = {"ok": False, "loaded": None}
    else:
        _check_workers(ctx, configured, reasons, checks)
    return not reasons, reasons, checks


def _check_workers(ctx: ConsoleContext, configured: int, reasons: list[str], checks: dict[str, Any]) -> None:
    try:
        alive = list_alive(ctx.engine)
    except Exception as exc:  # noqa: BLE001 - the database went away between the checks
        reason = f"workers unknown ({exception_summary(exc, message='query failed')})"
        reasons.append(reason)
        checks["workers"] = {"ok": False, "alive": None, "processes_configured": configured, "problem": reason}
        return
    checks["workers"] = {"ok": bool(alive), "alive": len(alive), "processes_configured": configured,
                         "alive_within_seconds": ALIVE_SECONDS,
                         "hosts": sorted({w.host for w in alive})}
    if not alive:
        reasons.append("no worker is alive" if configured else
                       "no worker is alive (worker.processes = 0 and no external worker has a live heartbeat)")
    failed = [w for w in alive if not w.models_ok]
    models = sorted({f"{m.get('role', '')}: {m.get('name', '')} {m.get('version', '')}".strip()
                     for w in alive for m in w.models()})
    checks["models"] = {"ok": bool(alive) and not failed, "loaded": models, "workers_failing": len(failed),
                        "problems": sorted({w.models_detail or "unknown" for w in failed})[:5]}
    if failed:
        reasons.append(f"the models failed to load on {len(failed)} of {len(alive)} live worker(s)")


def health_routes(ctx: ConsoleContext) -> list[Route]:
    """``GET /health/live`` and ``GET /health/ready``; mounted without login by the console app."""

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "live"}, headers={"Cache-Control": "no-store"})

    async def ready(request: Request) -> JSONResponse:
        ok, reasons, checks = await run_in_threadpool(readiness, ctx)
        return JSONResponse({"status": "ready" if ok else "not ready", "reasons": reasons, "checks": checks},
                            status_code=200 if ok else 503, headers={"Cache-Control": "no-store"})

    return [Route("/health/live", live, methods=["GET"], name="health_live"),
            Route("/health/ready", ready, methods=["GET"], name="health_ready")]
