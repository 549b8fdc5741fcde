"""Who may use the console: the admin's login and logout, the session cookie's secret, and the gate that sends
every page to /login when the console is bound to anything but loopback.

One admin user (``console.admin_user``) with a salted scrypt hash (``console.admin_password_hash``): the node has one
operator role, so a user table would only add a second place to get wrong. The session is Starlette's signed
cookie (itsdangerous), its secret a 0600 file under the storage root made at first start, so that a restart keeps
the admins logged in and two processes on one storage root (serve and ``dicom-node console``) accept each other's
cookies.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ai.safe_text import SafeMessage, escape

from ..secret_files import create_secret_file
from . import web
from .passwords import verify_password

LOG = logging.getLogger("dicom_node.console")

SECRET_FILE = Path("secrets") / "console-session"
"""Relative to the storage root."""
SECRET_BYTES = 32
_SECRET_TEXT = re.compile(r"[0-9a-f]{64}")
OPEN_PATHS = ("/login", "/static/", "/health/", "/metrics")  # answered without a login on any binding
LOGIN_FAILED_EVENT = "console_login_failed"
LOGIN_EVENT = "console_login"
LOGOUT_EVENT = "console_logout"
MAX_USER_TEXT = 64


class SessionSecretError(SafeMessage, RuntimeError):
    """The session secret file cannot be created or read; the message names the file, never its content."""


def session_secret(storage_root: Path) -> str:
    """The cookie-signing secret: made at first start (atomically: the first process to link its file wins), read
    back afterwards. Raises ``SessionSecretError``."""
    path = Path(storage_root) / SECRET_FILE
    where = escape(path, 300)
    try:
        if not path.exists():
            create_secret_file(path, SECRET_BYTES)
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SessionSecretError(f"the console's session secret {where} cannot be created or read "
                                 f"({type(exc).__name__})") from None
    if not _SECRET_TEXT.fullmatch(value):
        raise SessionSecretError(f"the console's session secret {where} is malformed: remove it (a new one is made "
                                 "at the next start; admins log in again)")
    return value


class LoginGate:
    """ASGI middleware (inside the session middleware): when the console requires a login, every request but the
    open paths goes to /login (GET and HEAD redirected there with the page to come back to; anything else 403)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        if not web.ctx_of(request).requires_login or path.startswith(OPEN_PATHS) or web.is_admin(request):
            await self.app(scope, receive, send)
            return
        response: Response
        if request.method in ("GET", "HEAD"):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(f"/login?{_next_query(target)}", status_code=303)
        else:
            response = Response("log in first", status_code=403, media_type="text/plain")
        await response(scope, receive, send)


def _next_query(target: str) -> str:
    return urlencode({"next": target})


def _safe_next(value: object) -> str:
    """Only a path of this site (no scheme, no host, no //): an open redirect would help a phisher."""
    text = value if isinstance(value, str) else ""
    if not text.startswith("/") or text.startswith("//") or "\\" in text or len(text) > 2000:
        return "/"
    return text


async def login_page(request: Request) -> Response:
    return _login_form(request, next_url=_safe_next(request.query_params.get("next")))


def _login_form(request: Request, *, next_url: str, error: str | None = None, user: str = "",
                status_code: int = 200) -> Response:
    console = web.ctx_of(request).config.console
    return web.render(request, "login.html", {
        "title": "Log in", "next_url": next_url, "error": error, "typed_user": user or console.admin_user,
        "configured": bool(console.admin_password_hash)}, status_code=status_code)


async def login(request: Request) -> Response:
    """Checks the CSRF token, then the user and password; a failure is audited with the typed user name (never
    the password) and answered 401 with the form again."""
    form = await web.checked_form(request)
    console = web.ctx_of(request).config.console
    user = str(form.get("user") or "").strip()[:MAX_USER_TEXT]
    password = str(form.get("password") or "")
    next_url = _safe_next(form.get("next"))
    ok = bool(console.admin_password_hash) and secrets.compare_digest(user.encode(), console.admin_user.encode()) \
        and verify_password(password, console.admin_password_hash)
    if not ok:
        web.audit(request, LOGIN_FAILED_EVENT, f"failed login as {escape(user, MAX_USER_TEXT)}")
        LOG.warning("console: failed login from %s", escape(request.client.host if request.client else "unknown"))
        return _login_form(request, next_url=next_url, user=user, status_code=401,
                           error="wrong user name or password" if console.admin_password_hash
                           else "no admin password is configured (console.admin_password_hash)")
    request.session.clear()  # a new session at login: a token planted before it is worthless
    request.session[web.SESSION_USER] = console.admin_user
    request.session[web.SESSION_KEY] = web.password_fingerprint(console.admin_password_hash)
    web.audit(request, LOGIN_EVENT, f"{console.admin_user} logged in")
    return RedirectResponse(next_url, status_code=303)


async def logout(request: Request) -> Response:
    await web.checked_form(request)
    user = web.current_user(request)
    if user:
        web.audit(request, LOGOUT_EVENT, f"{user} logged out")
    request.session.clear()
    return RedirectResponse("/login" if web.ctx_of(request).requires_login else "/", status_code=303)


def routes() -> list[Route]:
    return [Route("/login", login_page, methods=["GET"]), Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"])]
