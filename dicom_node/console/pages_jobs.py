"""The console's pages about the work itself: the overview, the jobs (list, CSV, one job with its header summary,
results, events, heat map and the readers' feedback), the exports with resend, and the audit log."""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ai.safe_text import escape, exception_summary
from db import browse, feedback, workers
from db.exports import export_counts, resend
from db.findings import finding_of_job
from db.labels import list_labels
from db.models import ExportState, JobState
from db.queue import counts_by_state
from db.registry import champion, list_models

from . import plots, web

LOG = logging.getLogger("dicom_node.console")
HEATMAP_MAX_PIXELS = 1024
LABELS_SHOWN = 200  # reads of one image listed on its page, newest first
RESEND_EVENT = "console_resend"
FEEDBACK_FAILED_EVENT = "console_feedback_refused"
CSV_COLUMNS = ("job_id", "sop_instance_uid", "state", "reason", "attempts", "modality", "calling_aet", "received_at",
               "probability", "present", "category", "model")
HEADER_FIELDS = (  # (label, keyword) shown to everybody
    ("Modality", "Modality"), ("Manufacturer", "Manufacturer"), ("Model", "ManufacturerModelName"),
    ("Photometric", "PhotometricInterpretation"), ("Bits stored", "BitsStored"), ("View position", "ViewPosition"),
    ("Body part", "BodyPartExamined"), ("Study date", "StudyDate"), ("Study description", "StudyDescription"),
)
PATIENT_FIELDS = (("Patient name", "PatientName"), ("Patient ID", "PatientID"), ("Birth date", "PatientBirthDate"))
HIDDEN = "hidden: log in as admin"


# --- small helpers ---------------------------------------------------------------------------------------------------


def _job_state(text: str | None, errors: list[str]) -> JobState | None:
    if not text:
        return None
    try:
        return JobState(text)
    except ValueError:
        errors.append(f"state: unknown state {escape(text, 40)!r}")
        return None


def _export_state(text: str | None, errors: list[str]) -> ExportState | None:
    if not text:
        return None
    try:
        return ExportState(text)
    except ValueError:
        errors.append(f"state: unknown export state {escape(text, 40)!r}")
        return None


def _date(name: str, text: str | None, errors: list[str]) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        errors.append(f"{name}: not a date (YYYY-MM-DD): {escape(text, 40)!r}")
        return None


def _text(value: Any, limit: int = 64) -> str:
    return str(value or "").strip()[:limit]


def _job_filter(request: Request, errors: list[str]) -> tuple[browse.JobFilter, dict[str, str]]:
    q = request.query_params
    current = {k: _text(q.get(k)) for k in ("state", "reason", "calling_aet", "received_from", "received_to")}
    f = browse.JobFilter(state=_job_state(current["state"], errors), reason=current["reason"] or None,
                         calling_aet=current["calling_aet"] or None,
                         received_from=_date("received_from", current["received_from"], errors),
                         received_to=_date("received_to", current["received_to"], errors))
    return f, current


def _job_id(request: Request) -> int:
    try:
        return int(request.path_params["job_id"])
    except (KeyError, ValueError):
        raise HTTPException(404, "no such job") from None


def _under_root(root: Path, relative: str) -> Path | None:
    """The stored relative path under the storage root, or None if it would lead outside it."""
    path = (root / relative).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path


# --- overview --------------------------------------------------------------------------------------------------------


def _disk(request: Request) -> dict[str, Any]:
    archive = web.ctx_of(request).archive
    try:
        usage = shutil.disk_usage(archive.root)
    except OSError as exc:
        return {"error": exception_summary(exc, message=exc.strerror or None)}
    total = max(usage.total, 1)
    reserve = archive.reserve_bytes
    return {"free": usage.free, "total": usage.total, "reserve": reserve, "low": usage.free < reserve,
            "used_pct": round(100 * (usage.total - usage.free) / total, 1),
            "reserve_pct": round(min(100.0, 100 * reserve / total), 1)}


def _workers(request: Request) -> dict[str, Any]:
    return {"alive": workers.list_alive(web.ctx_of(request).engine),
            "configured": web.ctx_of(request).config.worker.processes}


def _hourly_svg(request: Request) -> str | None:
    try:
        return plots.hourly_svg(web.ctx_of(request).engine, hours=24)
    except Exception as exc:  # a plot must not take the overview down
        LOG.warning("console: hourly plot failed: %s", exception_summary(exc))
        return None


def _overview_context(request: Request) -> dict[str, Any]:
    engine = web.ctx_of(request).engine
    return {
        "title": "Overview",
        "job_counts": counts_by_state(engine), "export_counts": export_counts(engine),
        "disk": _disk(request), "workers": _workers(request), "champion": champion(engine),
        "failed_jobs": browse.jobs(engine, browse.JobFilter(state=JobState.FAILED), limit=10).rows,
        "dead_exports": browse.exports(engine, ExportState.DEAD, limit=10).rows,
        "error_events": browse.error_events(engine, limit=10),
        "hourly_svg": _hourly_svg(request),
    }


async def overview(request: Request) -> Response:
    context = await run_in_threadpool(_overview_context, request)
    return web.render(request, "overview.html", context)


# --- jobs ------------------------------------------------------------------------------------------------------------


async def jobs_page(request: Request) -> Response:
    errors: list[str] = []
    f, current = _job_filter(request, errors)
    limit, offset = web.page_args(request)
    engine = web.ctx_of(request).engine
    page = await run_in_threadpool(browse.jobs, engine, f, limit, offset)
    reasons, callers = await run_in_threadpool(browse.job_choices, engine)
    csv_query = urlencode([(k, v) for k, v in current.items() if v])
    return web.render(request, "jobs.html", {
        "title": "Jobs", "rows": page.rows, "paging": web.paging(request, page.total), "errors": errors,
        "current": current, "states": [s.value for s in JobState], "reasons": reasons, "callers": callers,
        "csv_url": "/jobs.csv" + (f"?{csv_query}" if csv_query else "")}, status_code=400 if errors else 200)


def _csv_safe(value: object) -> str:
    """Cells a spreadsheet would run as a formula (a calling AE title is the sender's to choose) start with '."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_lines(engine: Any, f: browse.JobFilter) -> Iterator[str]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in browse.iter_jobs(engine, f):
        writer.writerow([_csv_safe(v) for v in (
            r.job_id, r.sop_instance_uid, r.state, r.reason, r.attempts, r.modality, r.calling_aet,
            r.received_at.isoformat(timespec="seconds") + "Z",
            "" if r.probability is None else f"{r.probability:.4f}",
            "" if r.present is None else ("yes" if r.present else "no"), r.category, r.model)])
        if out.tell() > 64 * 1024:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


async def jobs_csv(request: Request) -> Response:
    errors: list[str] = []
    f, _current = _job_filter(request, errors)
    if errors:
        return Response("; ".join(errors) + "\n", status_code=400, media_type="text/plain")
    return StreamingResponse(_csv_lines(web.ctx_of(request).engine, f), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="jobs.csv"'})


def _header_summary(request: Request, job: browse.JobDetail) -> dict[str, Any]:
    """What the archived file's header says (no pixels read); patient fields only for the admin."""
    ctx = web.ctx_of(request)
    path = _under_root(ctx.archive.root, job.archive_path)
    if path is None or not path.is_file():
        return {"error": "the archived file is missing (dicom-node check lists such rows)"}
    from ai.limits import read_dataset_bounded

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings may quote values
            ds = read_dataset_bounded(path, ctx.config.limits, stop_before_pixels=True)
    except Exception as exc:
        return {"error": f"the archived file cannot be read: {exception_summary(exc)}"}
    fields: list[tuple[str, str]] = [(label, _value(ds, keyword)) for label, keyword in HEADER_FIELDS]
    rows, columns = _value(ds, "Rows"), _value(ds, "Columns")
    fields.insert(3, ("Rows x columns", f"{rows} x {columns}" if rows or columns else ""))
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    fields.append(("Transfer syntax", f"{syntax.name} ({syntax})" if syntax is not None else job.transfer_syntax_uid))
    admin = web.is_admin(request)
    patient = [(label, _value(ds, keyword) if admin else HIDDEN) for label, keyword in PATIENT_FIELDS]
    return {"fields": fields, "patient": patient}


def _value(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
        text = "" if value is None else str(value.value if hasattr(value, "value") else value)
    except Exception:  # a malformed value: shown as unreadable, never as the library's text
        return "(unreadable)"
    return escape(text.strip(), 200)


def _model_notes(engine: Any, model: str | None) -> dict[str, Any] | None:
    if model is None:
        return None
    for entry in list_models(engine):
        if f"{entry.name} {entry.version}" == model:
            return {"label": entry.label, "id": entry.id, "state": entry.state, "bundled": entry.bundled}
    return None


def _sc_notice(request: Request, results: list[browse.ResultWithExports]) -> str | None:
    """The notice the heat-map picture carries (a demo model's "not for clinical use"): its ImageComments."""
    ctx = web.ctx_of(request)
    for r in results:
        if r.kind != "sc":
            continue
        path = _under_root(ctx.archive.root, r.archive_path)
        if path is None or not path.is_file():
            return None
        try:
            import pydicom

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageComments"])
            return escape(str(ds.get("ImageComments", "")), 500) or None
        except Exception:
            return None
    return None


def _job_context(request: Request, job_id: int) -> dict[str, Any]:
    engine = web.ctx_of(request).engine
    job = browse.job_detail(engine, job_id)
    if job is None:
        raise HTTPException(404, f"there is no job {job_id}")
    finding = finding_of_job(engine, job_id)
    results = browse.results_of_job(engine, job_id)
    return {
        "title": f"Job {job_id}", "job": job, "header": _header_summary(request, job), "finding": finding,
        "model": _model_notes(engine, finding.model if finding else None), "notice": _sc_notice(request, results),
        "results": results, "has_heatmap": any(r.kind == "sc" for r in results),
        "events": browse.events_of_instance(engine, job.sop_instance_uid),
        "labels": list_labels(engine, LABELS_SHOWN, instance_id=job.instance_id),
        "form": {"reader": web.current_user(request) or ""}, "feedback_error": None,
    }



async def job_page(request: Request) -> Response:
    context = await run_in_threadpool(_job_context, request, _job_id(request))
    return web.render(request, "job.html", context)


def _heatmap_png(request: Request, job_id: int) -> bytes:
    ctx = web.ctx_of(request)
    relative = browse.result_path(ctx.engine, job_id, "sc")
    path = _under_root(ctx.archive.root, relative) if relative else None
    if path is None or not path.is_file():
        raise HTTPException(404, "this job has no heat-map picture")
    import numpy as np
    import pydicom
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            pixels = np.asarray(ds.pixel_array)  # YBR (the JPEG SC's YBR_FULL_422) comes back as RGB already
            if pixels.ndim == 4:  # frames: the first
                pixels = pixels[0]
        if pixels.dtype != np.uint8:
            top = float(pixels.max()) or 1.0
            pixels = (pixels.astype(np.float32) * (255.0 / top)).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
        image.thumbnail((HEATMAP_MAX_PIXELS, HEATMAP_MAX_PIXELS), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "PNG", optimize=False)
        return out.getvalue()
    except Exception as exc:
        LOG.warning("console: heat-map picture of job %d cannot be rendered: %s", job_id, exception_summary(exc))
        raise HTTPException(404, "the heat-map picture cannot be rendered") from None


async def heatmap_png(request: Request) -> Response:
    data = await run_in_threadpool(_heatmap_png, request, _job_id(request))
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _reading_of(form: FormData, action: str) -> feedback.Reading | None:
    """The form's own reading: required for "reading", optional detail for accept/reject."""
    present_text = _text(form.get("present"), 8)
    category_text = _text(form.get("category"), 8)
    if not present_text and not category_text:
        if action == "reading":
            raise feedback.FeedbackError("present: choose yes or no for your own reading", "present")
        return None
    if present_text not in ("yes", "no"):
        raise feedback.FeedbackError("present: choose yes or no", "present")
    present = present_text == "yes"
    if not category_text:
        category = 0 if not present else None
        if category is None:
            raise feedback.FeedbackError("category: choose the ILO category 1-3", "category")
    else:
        try:
            category = int(category_text)
        except ValueError:
            raise feedback.FeedbackError("category: choose the ILO category 0-3", "category") from None
    return feedback.Reading(present=present, category=category,
                            subcategory=_text(form.get("subcategory"), 8) or None,
                            shape=_text(form.get("shape"), 8) or None,
                            large_opacities=_text(form.get("large_opacities"), 2) or None)


async def feedback_action(request: Request) -> Response:
    job_id = _job_id(request)
    form = await web.checked_form(request)
    action = _text(form.get("action"), 16)
    reader = _text(form.get("reader"), 200)
    try:
        if action not in feedback.ACTIONS:
            raise feedback.FeedbackError(f"action: choose one of {', '.join(feedback.ACTIONS)}", "action")
        reading = _reading_of(form, action)
        label_id = await run_in_threadpool(lambda: feedback.add_feedback(
            web.ctx_of(request).engine, job_id=job_id, reader=reader, action=action, reading=reading,
            actor=web.actor(request)))
    except feedback.FeedbackError as exc:
        context = await run_in_threadpool(_job_context, request, job_id)
        context["feedback_error"] = str(exc)
        context["form"] = {k: _text(form.get(k), 200) for k in
                           ("reader", "action", "present", "category", "subcategory", "shape", "large_opacities")}
        return web.render(request, "job.html", context, status_code=400)
    web.flash(request, f"{action} stored as label {label_id}", "ok")
    return RedirectResponse(f"/jobs/{job_id}#feedback", status_code=303)


# --- exports ---------------------------------------------------------------------------------------------------------


async def exports_page(request: Request) -> Response:
    errors: list[str] = []
    q = request.query_params
    current = {"state": _text(q.get("state")), "destination": _text(q.get("destination"))}
    state = _export_state(current["state"], errors)
    limit, offset = web.page_args(request)
    engine = web.ctx_of(request).engine
    page = await run_in_threadpool(browse.exports, engine, state, current["destination"] or None, limit, offset)
    resendable = await run_in_threadpool(browse.count_resendable, engine, state, current["destination"] or None)
    destinations = await run_in_threadpool(browse.export_destinations, engine)
    return web.render(request, "exports.html", {
        "title": "Exports", "rows": page.rows, "paging": web.paging(request, page.total), "errors": errors,
        "current": current, "states": [s.value for s in ExportState], "destinations": destinations,
        "resendable_count": resendable, "back": request.url.query,
    }, status_code=400 if errors else 200)


async def resend_action(request: Request) -> Response:
    """Resend one export (``export_id``) or every resendable one matching the filter (``state``, ``destination``):
    dead ones and pending ones that failed before; an audit event with the user and the ids."""
    form = await web.checked_form(request)
    errors: list[str] = []
    state = _export_state(_text(form.get("state")), errors)
    destination = _text(form.get("destination")) or None
    back = _text(form.get("back"), 1000)
    target = "/exports" + (f"?{back}" if back and "\n" not in back and "\r" not in back else "")
    return_to = _text(form.get("return_to"), 40)
    if re.fullmatch(r"/jobs/[0-9]{1,12}", return_to):
        target = return_to
    if errors:
        web.flash(request, "; ".join(errors), "error")
        return RedirectResponse(target, status_code=303)
    engine = web.ctx_of(request).engine
    one = _text(form.get("export_id"), 20)
    if one:
        try:
            export_id = int(one)
        except ValueError:
            web.flash(request, "export_id: not a number", "error")
            return RedirectResponse(target, status_code=303)
        ids = await run_in_threadpool(lambda: browse.resendable_export_ids(engine, export_ids=[export_id]))
        what = f"export {export_id}"
    else:
        ids = await run_in_threadpool(browse.resendable_export_ids, engine, state, destination)
        what = "every dead or failing export" + "".join(
            f" {k} {v}" for k, v in (("in state", state.value if state else None), ("to", destination)) if v)
    count = await run_in_threadpool(lambda: resend(engine, export_ids=ids, states=browse.RESENDABLE)) if ids else 0
    shown = ", ".join(str(i) for i in ids[:50]) + (f" and {len(ids) - 50} more" if len(ids) > 50 else "")
    web.audit(request, RESEND_EVENT, f"resend of {what}: {count} export(s) queued again" +
              (f" (ids {shown})" if count else ""))
    web.flash(request, f"{count} export(s) queued again" if count else f"nothing to resend ({what})",
              "ok" if count else "info")
    return RedirectResponse(target, status_code=303)


# --- audit -----------------------------------------------------------------------------------------------------------


async def audit_page(request: Request) -> Response:
    q = request.query_params
    current = {"kind": _text(q.get("kind"), 32), "actor": _text(q.get("actor"), 64)}
    limit, offset = web.page_args(request)
    engine = web.ctx_of(request).engine
    page = await run_in_threadpool(browse.events, engine, current["kind"] or None, current["actor"] or None,
                                   limit, offset)
    kinds, actors = await run_in_threadpool(browse.event_choices, engine)
    return web.render(request, "audit.html", {
        "title": "Audit log", "rows": page.rows, "paging": web.paging(request, page.total), "current": current,
        "kinds": kinds, "actors": actors})


def routes() -> list[Route]:
    return [
        Route("/", overview, methods=["GET"]),
        Route("/jobs", jobs_page, methods=["GET"]),
        Route("/jobs.csv", jobs_csv, methods=["GET"]),
        Route("/jobs/{job_id:int}", job_page, methods=["GET"]),
        Route("/jobs/{job_id:int}/heatmap.png", heatmap_png, methods=["GET"]),
        Route("/jobs/{job_id:int}/feedback", feedback_action, methods=["POST"]),
        Route("/exports", exports_page, methods=["GET"]),
        Route("/exports/resend", resend_action, methods=["POST"]),
        Route("/audit", audit_page, methods=["GET"]),
    ]
