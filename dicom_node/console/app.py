"""The console's ASGI application: routes of every page, the session and login gate, static files, and the
start-up rule that a console reachable from the network needs an admin password.

Why Starlette + Jinja2 + uvicorn: the console is server-rendered HTML pages with a few forms and JSON endpoints, so a
small, well-kept ASGI toolkit (Starlette: routing, signed-cookie sessions, forms, static files, a test client) with
the standard template engine (Jinja2, autoescaping) and the standard ASGI server (uvicorn, run in-process) covers it
without FastAPI's pydantic layer, a JavaScript framework or a front-end build; every asset is served by the node.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ai.safe_text import SafeMessage, escape, exception_summary

from ..config import NodeConfig
from . import auth, health, metrics, pages_jobs, pages_ops, web
from .context import ConsoleContext

LOG = logging.getLogger("dicom_node.console")
SESSION_COOKIE = "dicom_node_console"
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
     b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
]
# Modules of other parts of the console, each with a function (ctx) -> list of routes; mounted when present.


class ConsoleConfigError(SafeMessage, ValueError):
    """The console cannot start with this configuration; the message names the key and what to do."""


def check_startup(config: NodeConfig) -> None:
    """Raise ``ConsoleConfigError`` for a console bound beyond loopback, or told to require a login, without
    ``console.admin_password_hash``."""
    console = config.console
    if console.require_login and not console.admin_password_hash:
        raise ConsoleConfigError(
            "console.require_login is true, which needs an admin login: set console.admin_password_hash to the "
            "output of 'dicom-node console hash-password'")
    if not console.is_local and not console.admin_password_hash:
        raise ConsoleConfigError(
            f"console.bind_address = {console.bind_address!r} is reachable from other hosts, which needs an admin "
            "login: set console.admin_password_hash to the output of 'dicom-node console hash-password' "
            "(or bind the console to 127.0.0.1)")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    if "session" not in request.scope or request.url.path.startswith(("/static/", "/health/", "/metrics")) \
            or request.url.path.endswith((".png", ".csv", ".svg")):
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)
    return web.render(request, "error.html", {"title": f"{exc.status_code}", "detail": exc.detail},
                      status_code=exc.status_code)


def build_app(ctx: ConsoleContext) -> Starlette:
    """The Starlette application; ``ctx`` is on ``app.state.ctx`` for every handler."""
    secret = auth.session_secret(ctx.archive.root)
    routes: list[BaseRoute] = [*auth.routes(), *pages_jobs.routes(), *pages_ops.routes(ctx),
                               *health.health_routes(ctx), *metrics.metrics_routes(ctx),
                               Mount("/static", app=StaticFiles(directory=str(web.STATIC_DIR)), name="static")]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(SessionMiddleware, secret_key=secret, session_cookie=SESSION_COOKIE,
                   max_age=int(ctx.config.console.session_hours * 3600), same_site="strict",
                   https_only=ctx.config.console.secure_cookie),
        Middleware(auth.LoginGate),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})
    app.state.ctx = ctx
    return app


def asgi_app(ctx: ConsoleContext) -> ASGIApp:
    """What the server runs: the application inside ``SafeErrors``."""
    return SafeErrors(build_app(ctx))


class SecurityHeaders:
    """Headers that keep the pages out of frames and other sites' scripts away from them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SafeErrors:
    """The outermost layer: an unexpected exception is logged as a log-safe one-line summary (a traceback could
    quote a dataset's values) and answered 500, and never reaches uvicorn, which would log it raw."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            LOG.error("console: %s %s failed: %s", scope.get("method", ""), escape(scope.get("path", ""), 200),
                      exception_summary(exc))
            if scope["type"] == "http" and not started:
                response: Any = PlainTextResponse("internal error: see the node's log", status_code=500)
                await response(scope, receive, send)
