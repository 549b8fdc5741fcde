"""``GET /metrics`` in the Prometheus text format (0.0.4), for machines: no login, no patient data.

The database-backed metrics are read at scrape time by a custom collector (a few COUNT/GROUP BY queries), so the
standalone ``dicom-node console`` process has them as well as ``serve``. The C-STORE metrics are the Storage SCP's
in-process ones (``dicom_node.store_metrics``) inside ``serve``; a standalone console has only the association
history's counts (status ``ok`` / ``failed``, no latency histogram), as their HELP text says.

A database that cannot be read makes ``pneumo_database_up`` 0 and leaves its metrics out; the scrape still works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ai.safe_text import exception_summary
from db.engine import readonly
from db.exports import export_counts
from db.models import AssociationRecord, Event, Finding
from db.queue import counts_by_state
from db.registry import champion
from db.workers import count_alive, latest_models

from .. import __version__, store_metrics
from .context import ConsoleContext

LOG = logging.getLogger("dicom_node.console.metrics")

ANALYSIS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
EXPORT_FAILURE_EVENTS = ("export_retry", "export_dead")  # one event per failed export attempt (db.exports)

Metric = Any  # a prometheus_client metric family


class NodeCollector(Collector):
    """Reads the database, the disk and the registry at each scrape."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("pneumo_build", "The node's software version", value={"version": __version__})
        yield from self._disk()
        families: list[Metric] = []
        up = 1
        parts = [self._jobs, self._exports, self._export_failures, self._workers, self._models,
                 self._analysis_seconds]
        if not self.ctx.in_serve:  # inside serve the Storage SCP's own C-STORE metrics are there instead
            parts.append(self._cstore_from_history)
        for part in parts:
            try:
                families.extend(part())
            except SQLAlchemyError as exc:
                up = 0
                LOG.warning("metrics: the database could not be read (%s)", exception_summary(exc))
                break
        yield GaugeMetricFamily("pneumo_database_up", "1 when the database answered this scrape's queries", value=up)
        yield from families

    def _disk(self) -> Iterable[Metric]:
        try:
            free = self.ctx.archive.free_bytes()
        except OSError:
            free = None
        if free is not None:
            yield GaugeMetricFamily("pneumo_disk_free_bytes", "Free bytes on the storage root's file system",
                                    value=free)
        yield GaugeMetricFamily("pneumo_disk_reserve_bytes",
                                "storage.free_disk_reserve_mb in bytes: below it C-STOREs are refused (0xA700)",
                                value=self.ctx.archive.reserve_bytes)

    def _jobs(self) -> list[Metric]:
        jobs = GaugeMetricFamily("pneumo_jobs", "Analysis jobs per state", labels=["state"])
        for state, n in sorted(counts_by_state(self.ctx.engine).items()):
            jobs.add_metric([state], n)
        return [jobs]

    def _exports(self) -> list[Metric]:
        exports = GaugeMetricFamily("pneumo_exports", "Result exports to PACS per state", labels=["state"])
        for state, n in sorted(export_counts(self.ctx.engine).items()):
            exports.add_metric([state], n)
        return [exports]

    def _export_failures(self) -> list[Metric]:
        with Session(readonly(self.ctx.engine)) as session:
            n = session.scalar(select(func.count()).select_from(Event)
                               .where(Event.kind.in_(EXPORT_FAILURE_EVENTS))) or 0
        return [CounterMetricFamily("pneumo_export_failures",
                                    "Failed export attempts (each one's export_retry or export_dead event)",
                                    value=int(n))]

    def _workers(self) -> list[Metric]:
        return [GaugeMetricFamily("pneumo_workers_alive", "Analysis workers with a live heartbeat (any host)",
                                  value=count_alive(self.ctx.engine))]

    def _models(self) -> list[Metric]:
        """The registry's champion classifier, and the models the latest live worker loaded (the segmenter, and
        the installed classifier while the registry names no champion): reading a model file here would cost a
        torch import and a hash of 85 MB per scrape."""
        info = InfoMetricFamily("pneumo_model", "The models in use (champion classifier, lung segmenter)",
                                labels=["role"])
        best = champion(self.ctx.engine)
        seen: set[str] = set()
        if best is not None:
            info.add_metric(["classifier"], {"name": best.name, "version": best.version, "sha256": best.sha256})
            seen.add("classifier")
        for model in latest_models(self.ctx.engine):
            role = model.get("role", "")
            if role and role not in seen:
                seen.add(role)
                info.add_metric([role], {k: model.get(k, "") for k in ("name", "version", "sha256")})
        return [info]

    def _analysis_seconds(self) -> list[Metric]:
        """Cumulative buckets counted in one GROUP BY query, never the rows themselves."""
        f = Finding
        columns = [func.sum(case((f.analysis_seconds <= b, 1), else_=0)) for b in ANALYSIS_BUCKETS]
        hist = HistogramMetricFamily("pneumo_analysis_seconds", "Analysis seconds per analysed image, by model",
                                     labels=["model", "version"])
        with Session(readonly(self.ctx.engine)) as session:
            rows = session.execute(select(f.model_name, f.model_version, func.count(), func.sum(f.analysis_seconds),
                                          *columns).group_by(f.model_name, f.model_version)).all()
        for name, version, count, total, *cumulative in rows:
            buckets = [(_le(b), int(c or 0)) for b, c in zip(ANALYSIS_BUCKETS, cumulative, strict=True)]
            hist.add_metric([name, version], buckets + [("+Inf", int(count))], float(total or 0.0))
        return [hist]

    def _cstore_from_history(self) -> list[Metric]:
        a = AssociationRecord
        with Session(readonly(self.ctx.engine)) as session:
            ok, failed = session.execute(select(func.sum(a.stores_ok), func.sum(a.stores_failed))).one()
        total = CounterMetricFamily("pneumo_cstore",
                                    "C-STOREs answered, from the association history (this console runs outside "
                                    "dicom-node serve: status is only ok or failed, and pneumo_cstore_seconds is "
                                    "served only by the console inside serve)", labels=["status"])
        total.add_metric(["ok"], int(ok or 0))
        total.add_metric(["failed"], int(failed or 0))
        return [total]


def _le(bound: float) -> str:
    return repr(float(bound))


class _StoreMetrics(Collector):
    """The Storage SCP's in-process metrics (``dicom_node.store_metrics``), inside ``serve`` only."""

    def collect(self) -> Iterator[Metric]:
        yield from store_metrics.REGISTRY.collect()


def metrics_registry(ctx: ConsoleContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(ctx))
    if ctx.in_serve:
        registry.register(_StoreMetrics())
    return registry


def metrics_routes(ctx: ConsoleContext) -> list[Route]:
    """``GET /metrics``; mounted without login by the console app."""
    registry = metrics_registry(ctx)
    render: Callable[[], bytes] = lambda: generate_latest(registry)  # noqa: E731

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(render)
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4, headers={"Cache-Control": "no-store"})

    return [Route("/metrics", metrics, methods=["GET"], name="metrics")]
