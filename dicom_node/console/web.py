"""What every console page uses: the templates, the request's context and user, rendering with the shared frame,
the CSRF-checked form of a state-changing POST, the audit event of an action, and paging arguments.

One place for these so that no page can forget the CSRF check or the audit trail of an action.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from db.models import Event

from .. import __version__
from .context import ConsoleContext

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
                                                  autoescape=True, trim_blocks=True, lstrip_blocks=True))

NAV: tuple[tuple[str, str, str], ...] = (
    # (key, label, href)
    ("overview", "Overview", "/"),
    ("jobs", "Jobs", "/jobs"),
    ("exports", "Exports", "/exports"),
    ("destinations", "Destinations", "/destinations"),
    ("associations", "Associations", "/associations"),
    ("models", "Models", "/models"),
    ("disagreements", "Disagreements", "/disagreements"),
    ("statistics", "Statistics", "/statistics"),
    ("audit", "Audit", "/audit"),
)

SESSION_USER = "user"
SESSION_KEY = "key"  # fingerprint of the password hash the user logged in with: a new hash ends old sessions
SESSION_CSRF = "csrf"
SESSION_FLASH = "flash"

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500
MAX_PAGE = 1_000_000


def ctx_of(request: Request) -> ConsoleContext:
    ctx: ConsoleContext = request.app.state.ctx
    return ctx


def password_fingerprint(password_hash: str) -> str:
    """Short digest of the configured hash, kept in the session (never the hash itself)."""
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()[:16]


def current_user(request: Request) -> str | None:
    """The logged-in admin, or None when anonymous (also when the password hash changed since the login)."""
    if "session" not in request.scope:
        return None
    user = request.session.get(SESSION_USER)
    console = ctx_of(request).config.console
    if not user or not console.admin_password_hash or user != console.admin_user:
        return None
    if not hmac.compare_digest(str(request.session.get(SESSION_KEY, "")),
                               password_fingerprint(console.admin_password_hash)):
        return None
    return str(user)


def is_admin(request: Request) -> bool:
    """Only the authenticated admin sees patient names, IDs and birth dates."""
    return current_user(request) is not None


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        request.session[SESSION_CSRF] = token
    return token


def flash(request: Request, message: str, level: str = "info") -> None:
    """A message shown once on the next rendered page (after a redirect)."""
    request.session[SESSION_FLASH] = {"message": message, "level": level}


def _take_flash(request: Request) -> dict[str, str] | None:
    value = request.session.pop(SESSION_FLASH, None)
    return value if isinstance(value, dict) else None


def _active(request: Request) -> str:
    path = request.url.path
    for key, _label, href in NAV:
        if href != "/" and (path == href or path.startswith(href + "/") or path.startswith(href + ".")):
            return key
    return "overview" if path == "/" else ""


def render(request: Request, name: str, context: Mapping[str, Any] | None = None,
           status_code: int = 200) -> HTMLResponse:
    """``name`` rendered inside base.html's frame: the user, the CSRF token, the active navigation item and the
    node's title, AE title and version are added to ``context`` (which may set ``title`` and ``active``)."""
    ctx = ctx_of(request)
    values: dict[str, Any] = {
        "user": current_user(request),
        "is_admin": is_admin(request),
        "csrf_token": csrf_token(request),
        "nav": NAV,
        "active": _active(request),
        "node_ae": ctx.config.network.ae_title,
        "version": __version__,
        "login_possible": bool(ctx.config.console.admin_password_hash),
        "requires_login": ctx.requires_login,
        "flash": _take_flash(request),
    }
    values.update(context or {})
    response: HTMLResponse = templates.TemplateResponse(request, name, values, status_code=status_code)
    return response


async def checked_form(request: Request) -> FormData:
    """The POSTed form, after checking its ``csrf_token`` against the session's; HTTPException 403 otherwise."""
    if request.method != "POST":
        raise HTTPException(405)
    form = await request.form()
    sent = form.get("csrf_token")
    expected = request.session.get(SESSION_CSRF) if "session" in request.scope else None
    if not isinstance(sent, str) or not isinstance(expected, str) or not expected \
            or not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form


def actor(request: Request) -> str:
    """Who did it: the logged-in user, or ``local:<client address>`` for an anonymous request."""
    user = current_user(request)
    if user:
        return user[:64]
    host = request.client.host if request.client else "unknown"
    return f"local:{host}"[:64]


def audit(request: Request, kind: str, detail: str, sop_instance_uid: str | None = None) -> None:
    """An Event row for an action of a person, with its actor."""
    with Session(ctx_of(request).engine) as session, session.begin():
        session.add(Event(kind=kind[:32], detail=detail, sop_instance_uid=sop_instance_uid, actor=actor(request)))


def page_args(request: Request) -> tuple[int, int]:
    """(limit, offset) from ``?page=`` (1-based) and ``?per_page=``, bounded; junk gives the defaults."""
    page = _int_arg(request.query_params.get("page"), 1, 1, MAX_PAGE)
    per_page = _int_arg(request.query_params.get("per_page"), DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    return per_page, (page - 1) * per_page


def _int_arg(text: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(text) if text is not None and text.strip() else default
    except ValueError:
        return default
    return min(max(value, low), high)


def paging(request: Request, total: int) -> dict[str, Any]:
    """What templates/base.html's ``pager`` macro needs: page, pages, total and links keeping the other query
    arguments."""
    limit, offset = page_args(request)
    page = offset // limit + 1
    pages = max(1, (total + limit - 1) // limit)

    def link(number: int) -> str:
        params = dict(request.query_params)
        params["page"] = str(number)
        return request.url.path + "?" + urlencode([(k, v) for k, v in params.items() if v != ""])

    return {"page": page, "pages": pages, "total": total, "per_page": limit,
            "prev": link(page - 1) if page > 1 else None, "next": link(page + 1) if page < pages else None}

