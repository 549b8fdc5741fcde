"""Engine creation and schema check.

SQLite is made safe for several processes: WAL journal, synchronous=FULL (a commit survives power loss before we
answer Success), a busy timeout, and every transaction opened with BEGIN IMMEDIATE so that two writers never both
read-then-write the same job. PostgreSQL needs none of this: its claim uses FOR UPDATE SKIP LOCKED instead.

A database file also gets a ``db.integrity.DatabaseGuard``: before a connection is opened, when a transaction
begins and right before it commits, the file at the path must still be the one first opened, else
``DatabaseReplaced`` is raised (and keeps being raised until the process restarts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from .integrity import DatabaseGuard, attach_guard
from .models import SCHEMA_VERSION, Base, SchemaInfo

SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY_OPTION = "pneumo_read_only"
UPGRADES_FROM = {1, 2, 3}
"""Schema versions this one upgrades in place: 1 -> 2 added results and exports; 2 -> 3 added the retraining tables
and ``instances.patient_key`` (filled from the archived files by ``dicom_node.patient_key`` at start-up); 3 -> 4
added findings, associations and ``events.actor`` (the console)."""


class SchemaError(RuntimeError):
    """The database was written by a node with another schema version."""


def make_engine(url: str) -> Engine:
    """Create an engine; for SQLite also create the file's directory and install the multi-process settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)

    guard = None
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        guard = DatabaseGuard(Path(parsed.database).resolve())
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        hide_parameters=True,  # SQL errors end up in logs: never with row values
    )
    if guard is not None:
        _install_guard(engine, guard)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if guard is not None and guard.identity is not None:
            guard.check()  # before the first statement on the new connection touches the file
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself instead of pysqlite's deferred BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        if guard is not None:
            guard.opened()  # the first connection records the file's identity, later ones must match it

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if guard is not None:
            guard.check()  # before BEGIN: nothing is read from, or written to, a file that was replaced
        # Readers (see ``readonly``) take no write lock; every other transaction reserves it up front.
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN DEFERRED")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _install_guard(engine: Engine, guard: DatabaseGuard) -> None:
    """Identity checks before a connection is opened and right before every COMMIT (``_on_begin`` checks at BEGIN)."""
    attach_guard(engine, guard)

    @event.listens_for(engine, "do_connect")
    def _before_connect(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        # Before sqlite3.connect: opening a removed path would create an empty file there.
        guard.check()
        return None  # let the dialect connect as usual

    @event.listens_for(engine, "commit")
    def _before_commit(_connection: Connection) -> None:
        # Raising here skips the COMMIT; the transaction stays open and is rolled back by its context manager
        # (or by the pool when the connection is returned).
        guard.check()


def readonly(engine: Engine) -> Engine:
    """The same engine (same pool) for read-only work: on SQLite its transactions do not take the write lock,
    so lookups never queue behind, or block, the intake and the workers."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def init_schema(engine: Engine) -> int:
    """Create missing tables and check the schema version; returns the version. Raises SchemaError on mismatch."""
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    with Session(engine) as session, session.begin():
        info = session.scalars(select(SchemaInfo).order_by(SchemaInfo.id).limit(1)).first()
        if info is None:
            session.add(SchemaInfo(version=SCHEMA_VERSION))
            return SCHEMA_VERSION
        if info.version in UPGRADES_FROM and info.version < SCHEMA_VERSION:
            # New tables were created by create_all and new columns added above: record the upgrade.
            info.version = SCHEMA_VERSION
            return SCHEMA_VERSION
        if info.version != SCHEMA_VERSION:
            raise SchemaError(
                f"database schema version {info.version}, this node expects {SCHEMA_VERSION}: "
                "migrate or point database.url at a new database"
            )
        return info.version


ADDED_COLUMNS = {"instances": ("patient_key",), "events": ("actor",)}
"""Columns added to existing tables since version 1 (nullable, so ALTER TABLE ADD COLUMN is enough)."""


def _add_missing_columns(engine: Engine) -> None:
    existing = inspect(engine)
    for table_name, columns in ADDED_COLUMNS.items():
        present = {c["name"] for c in existing.get_columns(table_name)}
        table = Base.metadata.tables[table_name]
        for name in columns:
            if name in present:
                continue
            column = table.c[name]
            with engine.begin() as conn:
                kind = column.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {name} {kind}")
                for index in table.indexes:
                    if [c.name for c in index.columns] == [name]:
                        index.create(conn, checkfirst=True)
