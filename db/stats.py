"""Numbers behind the console's plots and its destinations page: arrivals and analyses per hour, the time from
reception to the SR, probability histograms per model version, exports per destination and state.

Read-only queries (``readonly``), portable between SQLite and PostgreSQL: only GROUP BY and plain column reads in
SQL; hours and histogram bins are counted in Python over the few rows of the window asked for. Every timestamp
is naive UTC (``db.models.utcnow``), so the hours are UTC hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .engine import readonly
from .models import Export, ExportState, Finding, Instance, Result, utcnow

DEFAULT_LATENCY_DAYS = 7
MAX_ROWS = 200_000  # a bound on what one plot reads, whatever the window


@dataclass(frozen=True)
class HourCount:
    hour: datetime  # start of the UTC hour
    received: int
    analysed: int


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def hourly_counts(engine: Engine, hours: int = 24, now: datetime | None = None) -> list[HourCount]:
    """Instances received and findings recorded (images analysed) per UTC hour, the last ``hours`` hours, oldest
    first, the current (partial) hour last; every hour present, zero or not."""
    hours = max(1, min(int(hours), 24 * 31))
    end = _hour(now or utcnow())
    start = end - timedelta(hours=hours - 1)
    slots = [start + timedelta(hours=i) for i in range(hours)]
    received = dict.fromkeys(slots, 0)
    analysed = dict.fromkeys(slots, 0)
    with Session(readonly(engine)) as session:
        for (at,) in session.execute(select(Instance.received_at).where(Instance.received_at >= start)
                                     .limit(MAX_ROWS)):
            if _hour(at) in received:
                received[_hour(at)] += 1
        for (at,) in session.execute(select(Finding.created_at).where(Finding.created_at >= start)
                                     .limit(MAX_ROWS)):
            if _hour(at) in analysed:
                analysed[_hour(at)] += 1
    return [HourCount(h, received[h], analysed[h]) for h in slots]


@dataclass(frozen=True)
class Latencies:
    """Seconds from an instance's reception to its SR: ``written`` (the SR object stored by the node) and ``sent``
    (the first destination that acknowledged it; only SRs that were exported)."""

    written: list[float]
    sent: list[float]
    since: datetime


def sr_latencies(engine: Engine, days: float = DEFAULT_LATENCY_DAYS, now: datetime | None = None) -> Latencies:
    """Latencies of the SRs written in the last ``days`` days (the node cannot see when the modality began to
    send, so the clock starts at the stored instance's ``received_at``)."""
    since = (now or utcnow()) - timedelta(days=days)
    written: list[float] = []
    sent: list[float] = []
    with Session(readonly(engine)) as session:
        rows = session.execute(
            select(Result.id, Instance.received_at, Result.created_at)
            .join(Instance, Instance.id == Result.instance_id)
            .where(Result.kind == "sr", Result.created_at >= since).limit(MAX_ROWS)).all()
        received_of = {}
        for result_id, received_at, created_at in rows:
            received_of[result_id] = received_at
            written.append(max(0.0, (created_at - received_at).total_seconds()))
        if received_of:
            first_sent = session.execute(
                select(Export.result_id, func.min(Export.sent_at))
                .join(Result, Result.id == Export.result_id)
                .where(Result.kind == "sr", Result.created_at >= since, Export.state == ExportState.SENT,
                       Export.sent_at.is_not(None))
                .group_by(Export.result_id)).all()
            for result_id, sent_at in first_sent:
                if result_id in received_of and sent_at is not None:
                    sent.append(max(0.0, (sent_at - received_of[result_id]).total_seconds()))
    return Latencies(written, sent, since)


@dataclass(frozen=True)
class ModelProbabilities:
    model: str  # "name version"
    thresholds: tuple[float, ...]  # the distinct thresholds its findings were decided with (normally one)
    probabilities: list[float]


def probabilities_by_model(engine: Engine, since: datetime | None = None) -> list[ModelProbabilities]:
    """Each model version's probabilities of pneumoconiosis, for a histogram per model; models by name, version."""
    query = select(Finding.model_name, Finding.model_version, Finding.probability, Finding.threshold) \
        .order_by(Finding.id.desc()).limit(MAX_ROWS)
    if since is not None:
        query = query.where(Finding.created_at >= since)
    grouped: dict[tuple[str, str], tuple[set[float], list[float]]] = {}
    with Session(readonly(engine)) as session:
        for name, version, probability, threshold in session.execute(query):
            thresholds, values = grouped.setdefault((name, version), (set(), []))
            thresholds.add(round(float(threshold), 6))
            values.append(float(probability))
    return [ModelProbabilities(f"{name} {version}", tuple(sorted(t)), v)
            for (name, version), (t, v) in sorted(grouped.items())]


def export_counts_by_destination(engine: Engine) -> dict[str, dict[str, int]]:
    """Exports per destination name and state (every state present for each destination that has exports)."""
    with Session(readonly(engine)) as session:
        rows = session.execute(select(Export.destination, Export.state, func.count())
                               .group_by(Export.destination, Export.state)).all()
    out: dict[str, dict[str, int]] = {}
    for destination, state, n in rows:
        counts = out.setdefault(destination, {s.value: 0 for s in ExportState})
        counts[state.value if isinstance(state, ExportState) else str(state)] = int(n)
    return out


def histogram(values: list[float], lo: float, hi: float, bins: int) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi]; values outside are clamped into the end bins."""
    counts = [0] * bins
    width = (hi - lo) / bins if hi > lo else 1.0
    for v in values:
        i = int((v - lo) / width)
        counts[min(max(i, 0), bins - 1)] += 1
    return counts


LATENCY_EDGES = (0.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Bin edges of the latency histogram in seconds (the last bin: an hour and more): a backlog and a normal day
both stay readable, which equal-width bins would not allow."""


def bucket(values: list[float], edges: tuple[float, ...]) -> list[int]:
    """Counts of ``values`` per bin [edges[i], edges[i+1]), the last bin open-ended; below edges[0]: first bin."""
    counts = [0] * len(edges)
    for v in values:
        i = 0
        while i + 1 < len(edges) and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    return counts
