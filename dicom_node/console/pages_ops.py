"""The console's network, model and statistics pages: export destinations (with a C-ECHO test), associations per
calling AE, the model registry (metrics, card, figures, promote and rollback), the readers' disagreements with the
model, and the plots.

Every state-changing request is a POST through ``web.checked_form`` (CSRF) and leaves an event with its actor
(``web.audit``); the registry's own refusals are shown on the page, never as an error page.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from ai.safe_text import escape, exception_summary
from db import associations as db_associations
from db import feedback, registry, stats, training
from db.models import utcnow

from . import plots
from .context import ConsoleContext
from .echo import EchoOutcome, echo_destination
from .web import actor, audit, checked_form, ctx_of, flash, page_args, render

ECHO_SESSION_KEY = "echo"
FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.png")
CARD_MAX_BYTES = 256 * 1024
STATISTICS_HOURS = (24, 48, 168)
RECENT_ASSOCIATIONS = 100
LIST_SHOWN = 12  # values of a metric's list shown in a table cell (a curve's points are in the figures)


# --- destinations -------------------------------------------------------------------------------------------------


async def destinations_page(request: Request) -> Response:
    ctx = ctx_of(request)
    counts = stats.export_counts_by_destination(ctx.engine)
    configured = ctx.config.export.destinations
    rows = [{"name": d.name, "peer": str(d.peer), "alternate": str(d.alternate) if d.alternate else None,
             "types": ", ".join(d.types), "tls": d.tls, "counts": counts.get(d.name)} for d in configured]
    unconfigured = sorted((name, c) for name, c in counts.items() if name not in {d.name for d in configured})
    echo = request.session.pop(ECHO_SESSION_KEY, None) if "session" in request.scope else None
    return render(request, "destinations.html", {
        "title": "Destinations", "destinations": rows, "unconfigured": unconfigured, "echo": echo,
        "states": ("pending", "sending", "sent", "dead"), "ae_title": ctx.config.network.ae_title,
        "timeout": ctx.config.export.timeout_seconds})


def _echo_detail(name: str, outcomes: list[EchoOutcome]) -> str:
    return f"destination {escape(name, 64)}: " + "; ".join(
        f"{o.role} {o.peer} {o.outcome} ({o.detail}, {o.milliseconds} ms)" for o in outcomes)


async def echo_action(request: Request) -> Response:
    await checked_form(request)
    ctx = ctx_of(request)
    name = request.path_params["name"]
    destination = next((d for d in ctx.config.export.destinations if d.name == name), None)
    if destination is None:
        raise HTTPException(404, "no such destination in export.destinations")
    outcomes = await run_in_threadpool(echo_destination, ctx.config, destination)
    audit(request, "echo_test", _echo_detail(name, outcomes))
    request.session[ECHO_SESSION_KEY] = {
        "name": name, "at": utcnow().strftime("%Y-%m-%d %H:%M:%S"),
        "results": [{"role": o.role, "peer": o.peer, "ok": o.ok, "outcome": o.outcome, "detail": o.detail,
                     "ms": o.milliseconds} for o in outcomes]}
    return RedirectResponse("/destinations", status_code=303)


# --- associations -------------------------------------------------------------------------------------------------


async def associations_page(request: Request) -> Response:
    ctx = ctx_of(request)
    selected = (request.query_params.get("calling_aet") or "")[:16] or None  # an AE title has at most 16
    callers = db_associations.callers(ctx.engine)
    recent = db_associations.recent_associations(ctx.engine, RECENT_ASSOCIATIONS, selected)
    return render(request, "associations.html", {
        "title": "Associations" if selected is None else f"Associations of {selected}",
        "callers": callers, "recent": recent, "selected": selected, "limit": RECENT_ASSOCIATIONS})


# --- models -------------------------------------------------------------------------------------------------------


def _storage_root(ctx: ConsoleContext) -> Path:
    return ctx.archive.root.resolve()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError):
        return False
    return True


def artifacts_dir(ctx: ConsoleContext, entry: registry.ModelEntry) -> Path | None:
    """The training run's folder of a model (figures, reports, card), inside the storage root; None if it has none."""
    root = _storage_root(ctx)
    relative: str | None = None
    if entry.run_id is not None:
        run = training.get_run(ctx.engine, entry.run_id)
        relative = run.artifacts_dir if run is not None and run.artifacts_dir else None
    if relative is None and not entry.bundled and not Path(entry.path).is_absolute():
        relative = str(Path(entry.path).parent)
    if not relative:
        return None
    folder = root / relative
    return folder.resolve() if folder.is_dir() and _inside(folder, root) else None


def figure_names(folder: Path | None) -> list[str]:
    """The run's PNG figures (ROC, calibration/reliability, confusion, ...): plain names, files inside the folder."""
    if folder is None:
        return []
    names = []
    for path in sorted(folder.iterdir()):
        if FIGURE_NAME.fullmatch(path.name) and path.is_file() and _inside(path, folder):
            names.append(path.name)
    return names


def _card_text(ctx: ConsoleContext, entry: registry.ModelEntry) -> str | None:
    """The model card's Markdown (bounded), or None. A registered card is inside the storage root, or the bundled
    model's absolute path written by the node itself."""
    if not entry.card_path:
        return None
    card = Path(entry.card_path)
    if not card.is_absolute():
        card = _storage_root(ctx) / card
        if not _inside(card, _storage_root(ctx)):
            return None
    elif not entry.bundled:
        return None
    try:
        with card.open("rb") as fh:
            data = fh.read(CARD_MAX_BYTES + 1)
    except OSError:
        return None
    text = data[:CARD_MAX_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[...]" if len(data) > CARD_MAX_BYTES else "")


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        shown = ", ".join(_value(v) for v in value[:LIST_SHOWN])
        return shown + (f", ... ({len(value)} values)" if len(value) > LIST_SHOWN else "")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def flatten(data: dict[str, Any] | None, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """Nested metrics as (dotted key, shown value) rows, for a two-column table."""
    rows: list[tuple[str, str]] = []
    for key, value in (data or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < 4:
            rows += flatten(value, name + ".", depth + 1)
        else:
            rows.append((name, _value(value)))
    return rows


def _model_or_404(ctx: ConsoleContext, request: Request) -> registry.ModelEntry:
    entry = registry.get_model(ctx.engine, int(request.path_params["model_id"]))
    if entry is None:
        raise HTTPException(404, "no such model")
    return entry


async def models_page(request: Request) -> Response:
    ctx = ctx_of(request)
    models = registry.list_models(ctx.engine)
    champion = next((m for m in models if m.state == "champion"), None)
    return render(request, "models.html", {
        "title": "Models", "models": list(reversed(models)), "champion": champion,
        "can_rollback": champion is not None and champion.replaced_model_id is not None})


async def model_page(request: Request) -> Response:
    ctx = ctx_of(request)
    entry = _model_or_404(ctx, request)
    folder = artifacts_dir(ctx, entry)
    gate = dict(entry.gate or {})
    reasons = gate.pop("reasons", None)
    return render(request, "model.html", {
        "title": f"Model {entry.label}", "model": entry, "holdout_rows": flatten(entry.holdout),
        "gate_rows": flatten(gate), "gate_reasons": reasons if isinstance(reasons, list) else None,
        "card": _card_text(ctx, entry), "figures": figure_names(folder)})


async def model_figure(request: Request) -> Response:
    ctx = ctx_of(request)
    entry = _model_or_404(ctx, request)
    name = request.path_params["name"]
    folder = artifacts_dir(ctx, entry)
    if folder is None or name not in figure_names(folder):
        raise HTTPException(404, "no such figure")
    return FileResponse(folder / name, media_type="image/png",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300"})


async def promote_action(request: Request) -> Response:
    form = await checked_form(request)
    ctx = ctx_of(request)
    model_id = int(request.path_params["model_id"])
    reason = str(form.get("reason") or "").strip()[:500]
    force = form.get("force") in ("on", "1", "true", "yes")
    try:
        entry = await run_in_threadpool(lambda: registry.promote(ctx.engine, model_id, user=actor(request),
                                                                 reason=reason or None, force=force))
    except registry.RegistryError as exc:
        audit(request, "model_promote", f"model #{model_id}: refused ({escape(str(exc), 400)})")
        flash(request, f"Not promoted: {exc}", "error")
    except Exception as exc:  # noqa: BLE001 - a database failure is reported, not a 500 page
        audit(request, "model_promote", f"model #{model_id}: failed ({exception_summary(exc)})")
        flash(request, f"Not promoted: {exception_summary(exc)}", "error")
    else:
        audit(request, "model_promote", f"model {entry.label} promoted{' (forced)' if force else ''}"
                                        f"{': ' + escape(reason, 400) if reason else ''}")
        flash(request, f"Model {entry.label} is the champion now.", "ok")
    return RedirectResponse(f"/models/{model_id}", status_code=303)


async def rollback_action(request: Request) -> Response:
    form = await checked_form(request)
    ctx = ctx_of(request)
    reason = str(form.get("reason") or "").strip()[:500]
    try:
        entry = await run_in_threadpool(lambda: registry.rollback(ctx.engine, user=actor(request),
                                                                  reason=reason or None))
    except registry.RegistryError as exc:
        audit(request, "model_rollback", f"refused ({escape(str(exc), 400)})")
        flash(request, f"Not rolled back: {exc}", "error")
    except Exception as exc:  # noqa: BLE001
        audit(request, "model_rollback", f"failed ({exception_summary(exc)})")
        flash(request, f"Not rolled back: {exception_summary(exc)}", "error")
    else:
        audit(request, "model_rollback", f"rolled back to model {entry.label}"
                                         f"{': ' + escape(reason, 400) if reason else ''}")
        flash(request, f"Rolled back: model {entry.label} is the champion again.", "ok")
    return RedirectResponse("/models", status_code=303)


# --- disagreements ------------------------------------------------------------------------------------------------


async def disagreements_page(request: Request) -> Response:
    ctx = ctx_of(request)
    limit, offset = page_args(request)
    model = request.query_params.get("model") or None
    rows = feedback.disagreements(ctx.engine, limit=limit + 1, offset=offset, model=model)
    agreement = feedback.agreement_by_model(ctx.engine)
    page = offset // limit + 1

    def link(number: int) -> str:
        params = {"page": str(number), "per_page": str(limit), **({"model": model} if model else {})}
        return "/disagreements?" + urlencode(params)

    return render(request, "disagreements.html", {
        "title": "Disagreements", "rows": rows[:limit], "agreement": agreement, "model": model,
        "models": [a.model for a in agreement], "page": page,
        "prev": link(page - 1) if page > 1 else None, "next": link(page + 1) if len(rows) > limit else None})


# --- statistics ---------------------------------------------------------------------------------------------------


async def statistics_page(request: Request) -> Response:
    ctx = ctx_of(request)
    try:
        hours = int(request.query_params.get("hours", "24"))
    except ValueError:
        hours = 24
    hours = hours if hours in STATISTICS_HOURS else 24
    now = utcnow()

    def build() -> tuple[str, str, str]:
        return (plots.hourly_svg(ctx.engine, hours, now), plots.latency_svg(ctx.engine, now=now),
                plots.probability_svg(ctx.engine))

    hourly, latency, probability = await run_in_threadpool(build)
    return render(request, "plots.html", {
        "title": "Statistics", "hours": hours, "choices": STATISTICS_HOURS, "generated": now,
        "hourly": Markup(hourly), "latency": Markup(latency), "probability": Markup(probability)})


def routes(ctx: ConsoleContext) -> list[Route]:
    """Engineer B's pages, mounted by ``dicom_node.console.app``."""
    del ctx  # every handler takes what it needs from the request (web.ctx_of)
    return [
        Route("/destinations", destinations_page, methods=["GET"]),
        Route("/destinations/{name}/echo", echo_action, methods=["POST"]),
        Route("/associations", associations_page, methods=["GET"]),
        Route("/models", models_page, methods=["GET"]),
        Route("/models/rollback", rollback_action, methods=["POST"]),
        Route("/models/{model_id:int}", model_page, methods=["GET"]),
        Route("/models/{model_id:int}/figure/{name}", model_figure, methods=["GET"]),
        Route("/models/{model_id:int}/promote", promote_action, methods=["POST"]),
        Route("/disagreements", disagreements_page, methods=["GET"]),
        Route("/statistics", statistics_page, methods=["GET"]),
    ]
