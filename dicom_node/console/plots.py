"""The console's plots as inline SVG, built here on the server: no JavaScript, no charting library, nothing fetched.

Each plot is one ``<svg>`` element (valid XML) that scales to the width of its column (``viewBox``, width 100%),
names itself for screen readers (``role="img"``, ``<title>``, ``<desc>``), labels both axes with tick values and
gives each bar a ``<title>`` with its exact count. Colours are the Okabe-Ito blue and orange (told apart with a
colour vision deficiency too). Every text taken from the database is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from xml.sax.saxutils import escape

from sqlalchemy import Engine

from db import stats

WIDTH = 640
PANEL_HEIGHT = 170
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 52, 12, 30, 44
COLOURS = ("#0072B2", "#E69F00")
FONT = 'font-family="sans-serif" font-size="11"'
PROBABILITY_BINS = 20
MAX_MODEL_PANELS = 8


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[int]


@dataclass(frozen=True)
class Panel:
    """One set of axes: bars per category (one bar per series side by side), x ticks as (position 0-1 along the
    axis, label), an optional vertical marker (position 0-1, label)."""

    heading: str
    series: Sequence[Series]
    x_ticks: Sequence[tuple[float, str]]
    x_label: str
    y_label: str
    marker: tuple[float, str] | None = None
    bar_titles: Sequence[str] | None = None  # per category: what its bars stand for ("09:00 UTC")


def _nice_ticks(top: int) -> list[int]:
    """0 and a few round steps (1, 2 or 5 times a power of ten) up to at least ``top``."""
    if top <= 0:
        return [0, 1]
    raw = top / 4
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(1, int(step))
    return list(range(0, top + step, step)) if top % step == 0 else list(range(0, (top // step + 2) * step, step))


def _text(x: float, y: float, content: str, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT}{" " + extra if extra else ""}>'
            f"{escape(content)}</text>")


def _panel(panel: Panel, top: float) -> list[str]:
    out: list[str] = []
    x0, x1 = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    y0, y1 = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM  # plot area, y1 is the baseline
    out.append(_text(x0, top + 16, panel.heading, "start", 'font-weight="bold"'))
    categories = max((len(s.values) for s in panel.series), default=0)
    highest = max((max(s.values, default=0) for s in panel.series), default=0)
    ticks = _nice_ticks(highest)
    scale = (y1 - y0) / ticks[-1]
    for value in ticks:  # grid lines and y tick values
        y = y1 - value * scale
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd" stroke-width="1"/>')
        out.append(_text(x0 - 6, y + 4, str(value), "end"))
    out.append(f'<line x1="{x0}" y1="{y1:.1f}" x2="{x1}" y2="{y1:.1f}" stroke="#333" stroke-width="1"/>')
    out.append(f'<line x1="{x0}" y1="{y0:.1f}" x2="{x0}" y2="{y1:.1f}" stroke="#333" stroke-width="1"/>')
    if categories:
        slot = (x1 - x0) / categories
        n = max(1, len(panel.series))
        bar = max(1.0, slot * 0.8 / n)
        for i in range(categories):
            for j, series in enumerate(panel.series):
                value = series.values[i] if i < len(series.values) else 0
                height = value * scale
                x = x0 + i * slot + slot * 0.1 + j * bar
                what = panel.bar_titles[i] if panel.bar_titles and i < len(panel.bar_titles) else str(i + 1)
                label = f"{series.name}, {what}: {value}"
                out.append(f'<rect x="{x:.1f}" y="{y1 - height:.1f}" width="{bar:.1f}" height="{height:.1f}" '
                           f'fill="{COLOURS[j % len(COLOURS)]}"><title>{escape(label)}</title></rect>')
    for position, label in panel.x_ticks:
        x = x0 + position * (x1 - x0)
        out.append(f'<line x1="{x:.1f}" y1="{y1:.1f}" x2="{x:.1f}" y2="{y1 + 4:.1f}" stroke="#333"/>')
        out.append(_text(x, y1 + 15, label))
    out.append(_text((x0 + x1) / 2, y1 + 32, panel.x_label))
    out.append(_text(14, (y0 + y1) / 2, panel.y_label, "middle",
                     f'transform="rotate(-90 14 {(y0 + y1) / 2:.1f})"'))
    if panel.marker is not None:
        position, label = panel.marker
        x = x0 + min(max(position, 0.0), 1.0) * (x1 - x0)
        out.append(f'<line x1="{x:.1f}" y1="{y0 - 4:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="#c00" '
                   'stroke-width="1.5" stroke-dasharray="4 3"/>')
        out.append(_text(x + 4, y0 + 6, label, "start", 'fill="#c00"'))
    legend_x = float(x1)
    for j, series in reversed(list(enumerate(panel.series))):
        if len(panel.series) < 2:
            break
        legend_x -= 8 + 6.2 * len(series.name) + 14
        out.append(f'<rect x="{legend_x:.1f}" y="{top + 7:.1f}" width="10" height="10" '
                   f'fill="{COLOURS[j % len(COLOURS)]}"/>')
        out.append(_text(legend_x + 14, top + 16, series.name, "start"))
    return out


def svg_document(panels: Sequence[Panel], title: str, description: str, caption: Sequence[str] = (),
                 ident: str = "plot", empty_text: str | None = None) -> str:
    """Panels stacked in one SVG, then the caption lines; ``empty_text`` (when given) replaces the panels."""
    body: list[str] = []
    top = 0.0
    if empty_text is not None:
        body.append(_text(WIDTH / 2, 40, empty_text))
        top = 60.0
    else:
        for panel in panels:
            body.extend(_panel(panel, top))
            top += PANEL_HEIGHT
    for line in caption:
        top += 14
        body.append(_text(MARGIN_LEFT, top, line, "start", 'fill="#555"'))
    height = int(top + 8)
    ident = "".join(c if c.isalnum() or c in "-_" else "-" for c in ident)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" '
            f'style="max-width:{WIDTH}px" role="img" aria-labelledby="{ident}-title {ident}-desc" '
            f'class="plot">'
            f'<title id="{ident}-title">{escape(title)}</title><desc id="{ident}-desc">{escape(description)}</desc>'
            + "".join(body) + "</svg>")


# --- the console's three plots --------------------------------------------------------------------------------------


def hourly_svg(engine: Engine, hours: int = 24, now: datetime | None = None) -> str:
    """Received and analysed images per UTC hour over the last ``hours`` hours."""
    counts = stats.hourly_counts(engine, hours, now)
    labels = [c.hour.strftime("%H:00") for c in counts]
    every = max(1, math.ceil(len(counts) / 8))
    ticks = [((i + 0.5) / len(counts), labels[i]) for i in range(0, len(counts), every)]
    received = Series("received", [c.received for c in counts])
    analysed = Series("analysed", [c.analysed for c in counts])
    first, last = counts[0].hour, counts[-1].hour
    span = f"{first:%Y-%m-%d %H:00} to {last:%Y-%m-%d %H:59} UTC"
    panel = Panel(f"Images per hour, last {len(counts)} h", (received, analysed), ticks,
                  "hour (UTC; the last one is the current hour)", "images",
                  bar_titles=[f"{c.hour:%Y-%m-%d %H:00} UTC" for c in counts])
    description = (f"Bar chart of images received and analysed per hour, {span}: "
                   f"{sum(received.values)} received, {sum(analysed.values)} analysed.")
    return svg_document([panel], "Received and analysed per hour", description,
                        [f"{span}. Analysed: the classifier's finding recorded in that hour."], ident="plot-hourly")


def _seconds_label(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def latency_svg(engine: Engine, days: float = stats.DEFAULT_LATENCY_DAYS, now: datetime | None = None) -> str:
    """Histogram of the time from reception to the SR: written by the node, and acknowledged by a destination."""
    latencies = stats.sr_latencies(engine, days, now)
    edges = stats.LATENCY_EDGES
    labels = [f"{_seconds_label(edges[i])}-{_seconds_label(edges[i + 1])}" if i + 1 < len(edges)
              else f">= {_seconds_label(edges[i])}" for i in range(len(edges))]
    short = [_seconds_label(e) for e in edges]
    ticks = [(i / len(edges), short[i]) for i in range(len(edges))]
    written = Series("SR written", stats.bucket(latencies.written, edges))
    sent = Series("SR sent", stats.bucket(latencies.sent, edges))
    caption = [f"Reception at the node (the stored instance's received_at) to the SR: written by the node "
               f"(blue, {len(latencies.written)} SRs)",
               f"and acknowledged by the first destination that stored it (orange, {len(latencies.sent)} exported "
               f"SRs); SRs of the last {days:g} days.",
               "When the modality started sending cannot be seen by the node. Bins start at the tick; the last "
               "bin is open-ended."]
    title = "Reception to SR latency"
    description = (f"Histogram of seconds from reception to the SR, SRs written since "
                   f"{latencies.since:%Y-%m-%d %H:%M} UTC: {len(latencies.written)} written, "
                   f"{len(latencies.sent)} sent.")
    if not latencies.written:
        return svg_document([], title, description, caption, "plot-latency",
                            empty_text=f"No SR written in the last {days:g} days.")
    panel = Panel("Reception to SR", (written, sent), ticks, "time from reception (bin start)", "SRs",
                  bar_titles=labels)
    return svg_document([panel], title, description, caption, "plot-latency")


def probability_svg(engine: Engine, since: datetime | None = None) -> str:
    """Histogram of the probability of pneumoconiosis per model version, its threshold marked."""
    models = stats.probabilities_by_model(engine, since)
    title = "Probability of pneumoconiosis per model version"
    shown = models[-MAX_MODEL_PANELS:]
    caption = [f"{PROBABILITY_BINS} bins of {1 / PROBABILITY_BINS:g}; the dashed line is the model's threshold "
               "(at or above it: present)."]
    if len(models) > len(shown):
        caption.append(f"The last {len(shown)} of {len(models)} model versions.")
    if not models:
        return svg_document([], title, "No findings recorded yet.", caption, "plot-probability",
                            empty_text="No findings recorded yet.")
    panels = []
    for m in shown:
        counts = stats.histogram(m.probabilities, 0.0, 1.0, PROBABILITY_BINS)
        threshold = m.thresholds[-1] if m.thresholds else None
        note = "" if len(m.thresholds) <= 1 else f" ({len(m.thresholds)} thresholds; the highest marked)"
        bins = [f"{i / PROBABILITY_BINS:.2f}-{(i + 1) / PROBABILITY_BINS:.2f}" for i in range(PROBABILITY_BINS)]
        panels.append(Panel(f"{m.model}: {len(m.probabilities)} findings{note}", (Series(m.model, counts),),
                            [(t, f"{t:g}") for t in (0.0, 0.25, 0.5, 0.75, 1.0)], "probability", "findings",
                            marker=None if threshold is None else (threshold, f"threshold {threshold:g}"),
                            bar_titles=bins))
    description = "Histograms of the classifier's probability per model version: " + "; ".join(
        f"{m.model}, {len(m.probabilities)} findings, threshold "
        + "/".join(f"{t:g}" for t in m.thresholds) for m in shown) + "."
    return svg_document(panels, title, description, caption, "plot-probability")
