"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary directory, ``pg_ctl start`` on a free
TCP port on 127.0.0.1, a fresh database per test (or per module), ``pg_ctl stop -m fast`` at the end.

PostgreSQL refuses to run as root: under root (as here and in CI) the server runs as Debian's ``postgres`` system
user (created by the ``postgresql`` package), else as ``nobody``; otherwise as the current user. The binaries are
found with ``pg_config --bindir`` or under ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them off PATH), the
highest version first. ``scripts/test.sh`` installs the package and ``scripts/setup.sh`` the driver (psycopg); when
either is missing the PostgreSQL tests fail, naming what is missing, unless $PNEUMO_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .net import free_port

SKIP_ENV = "PNEUMO_SKIP_POSTGRES"
# Every engine that has connected, so that a database's engines give their pooled connections back before it is
# dropped: otherwise psycopg finds them open when the engine is collected, long after ("deleted while still open").
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@event.listens_for(Engine, "engine_connect")
def _remember_engine(connection: Connection) -> None:
    _ENGINES.add(connection.engine)

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "postgres"  # the cluster's superuser (a database role, not the OS user)
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    # A throwaway cluster: durability costs time and buys nothing.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    # Not UTC, on purpose: the node writes every timestamp itself, naive UTC (db.models.utcnow); one taken from the
    # server's clock (now(), CURRENT_TIMESTAMP) would be off by hours here, as on a server set to local time.
    "timezone": "Pacific/Chatham",
}


SQLITE_ONLY = pytest.mark.parametrize("db_backend", ["sqlite"])
"""For a test of ``db_backend``'s modules that runs on SQLite alone: what it checks of the database is checked on
PostgreSQL by the module's other tests, and its running time goes to something else (network deadlines, models)."""


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries or the Python driver are not installed."""


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() and os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_bindir() -> Path | None:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    return next((c for c in candidates if _has_server(c)), None)


def check_available() -> Path:
    """The binaries' directory; raises PostgresUnavailable naming what is missing and how to install it."""
    missing = []
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("the Python driver psycopg (.venv/bin/pip install 'psycopg[binary]>=3.1', or "
                       "bash scripts/setup.sh)")
    bindir = find_bindir()
    if bindir is None:
        missing.append("the PostgreSQL server (initdb, pg_ctl, postgres: apt-get install postgresql; Debian puts "
                       "them in /usr/lib/postgresql/<version>/bin)")
    if missing:
        raise PostgresUnavailable(f"the PostgreSQL tests need {' and '.join(missing)}; scripts/test.sh installs "
                                  f"both (set {SKIP_ENV}=1 to skip these tests instead)")
    assert bindir is not None
    return bindir


def _server_account() -> pwd.struct_passwd | None:
    """The OS user to run the server as: None for the current user, an unprivileged one under root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither the 'postgres' nor the 'nobody' user exists to run "
                              "the PostgreSQL server as (PostgreSQL refuses to run as root)")


class PostgresCluster:
    """One running cluster; ``create_database`` gives each test an empty database of its own."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.account = _server_account()
        self.root = Path(tempfile.mkdtemp(prefix="pneumo-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.counter = 0
        self.started = False

    # -- the server ----------------------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120) -> None:
        extra: dict[str, Any] = {}
        if self.account is not None:
            extra = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        if self.account is not None:
            env |= {"HOME": str(self.root), "USER": self.account.pw_name, "LOGNAME": self.account.pw_name}
        proc = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=timeout, **extra)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{log}")

    def start(self) -> PostgresCluster:
        self.sockets.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.account is not None:
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
        finally:
            pwfile.unlink()
        options = " ".join([f"-p {self.port}", f"-k {self.sockets}",
                            *(f"-c {key}={value}" for key, value in SERVER_SETTINGS.items())])
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options)
        self.started = True
        return self

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------------------------------

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _admin(self, statement: str, database: str) -> None:
        """``statement`` with ``{}`` standing for the quoted name ``database``, outside any transaction."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(database)))

    def create_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        self.counter += 1
        name = f"test_{os.getpid()}_{self.counter}"
        self._admin("CREATE DATABASE {}", name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url``: the test's engines close their pooled connections first, and the server ends
        any a test still holds checked out."""
        name = url.rsplit("/", 1)[1]
        for engine in list(_ENGINES):
            if engine.url.get_backend_name() == "postgresql" and engine.url.database == name:
                engine.dispose()
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


class Databases:
    """New, empty databases of one backend: a SQLite file where the test says, or a PostgreSQL database of the
    session's cluster (dropped when the fixture ends)."""

    def __init__(self, backend: str, cluster: PostgresCluster | None) -> None:
        self.backend = backend
        self.cluster = cluster
        self.created: list[str] = []

    def url(self, sqlite_file: Path) -> str:
        """``sqlite:///<sqlite_file>``, or a new PostgreSQL database (``sqlite_file`` unused)."""
        if self.cluster is None:
            return f"sqlite:///{sqlite_file}"
        self.created.append(self.cluster.create_database())
        return self.created[-1]

    def drop(self) -> None:
        while self.cluster is not None and self.created:
            self.cluster.drop_database(self.created.pop())


def start_cluster() -> PostgresCluster:
    """Start a cluster (raises PostgresUnavailable when PostgreSQL or psycopg is missing)."""
    cluster = PostgresCluster(check_available())
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
