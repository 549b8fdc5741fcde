"""The console's HTTP server: uvicorn run in-process on a thread of its own, on a socket bound before it starts.

Binding the socket here (not in uvicorn, which answers a port in use with ``sys.exit``) turns a port in use into an
``OSError`` the caller reports like the DICOM port's; the thread (not the main one) keeps uvicorn from installing
signal handlers, so ``serve``'s SIGTERM/SIGINT handling stays the node's.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from .app import asgi_app, check_startup
from .auth import SessionSecretError
from .context import ConsoleContext

LOG = logging.getLogger("dicom_node.console")
BACKLOG = 64
STOP_SECONDS = 10.0


def console_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises OSError (e.g. EADDRINUSE) with the OS's reason."""
    family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart while old connections linger
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock


class ConsoleServer:
    """``start()`` checks the configuration (``ConsoleConfigError``), binds (``OSError``: a port in use, or the
    session secret file unusable) and serves on a daemon thread; ``stop()`` asks uvicorn to finish its open
    requests and waits for the thread."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        console = self.ctx.config.console
        port = self._socket.getsockname()[1] if self._socket is not None else console.port
        return console_url(console.bind_address, port)

    def start(self) -> None:
        check_startup(self.ctx.config)
        console = self.ctx.config.console
        try:
            app = asgi_app(self.ctx)  # before binding: a bad secret file fails with nothing listening
        except SessionSecretError as exc:
            raise OSError(str(exc)) from None
        try:
            self._socket = bind_socket(console.bind_address, console.port)
        except OSError as exc:
            raise OSError(exc.errno, f"console port {console.bind_address}:{console.port}: "
                                     f"{exc.strerror or type(exc).__name__}") from None
        config = uvicorn.Config(app, host=console.bind_address, port=console.port, log_config=None,
                                access_log=False, lifespan="off", server_header=False, proxy_headers=False,
                                timeout_graceful_shutdown=int(STOP_SECONDS))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="console", daemon=True)
        self._thread.start()
        LOG.info("console at %s%s", self.url, "" if self.ctx.requires_login else " (loopback: no login needed)")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = STOP_SECONDS + 2.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("console: the web server did not stop within %.0f s", timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
