"""Database integrity: detect that the SQLite file was removed or replaced under a running process.

An SQLite connection keeps writing to the file it opened, even after that file was deleted or another file was
put at its path: every commit would still succeed, into a file nobody will ever open again, and the node would
keep answering Success for instances its database no longer knows. So each engine on a database file has a
``DatabaseGuard`` that records the file's identity (``st_dev``, ``st_ino``) when it is first opened and compares
the path's identity with it

- before a new connection is opened (so that a removed file is never silently recreated empty, and a replaced
  one is never opened: two files sharing one ``-wal``/``-shm`` pair would corrupt both),
- at the start of every transaction and again right before every COMMIT (``db.engine`` installs the hooks),
- and every ``database.identity_check_seconds`` (``poll``, a job of ``dicom-node serve``'s scheduler,
  ``dicom_node.scheduler``), so that an idle node notices it as well.

A ``stat`` costs about a microsecond, so no result is cached: a commit is never let through on an old answer.
Once a mismatch is seen the guard stays *tripped* for the life of the process: every later transaction raises
``DatabaseReplaced`` (an ``OperationalError``, so the intake answers 0xA701 and the workers back off) until the node
is restarted; start-up then reconciles the archive with whatever database it opens (``dicom_node.reconcile``).
Whoever must react at once (``serve`` stops its exporter and its database jobs) registers with ``on_trip``.

PostgreSQL and in-memory SQLite have no file to watch: they get no guard.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

LOG = logging.getLogger("db.integrity")


class DatabaseReplaced(OperationalError):
    """The database file this process opened was removed or replaced; raised by every transaction afterwards.

    An ``OperationalError`` (the database is not usable, through no fault of the statement), hence also an
    ``SQLAlchemyError``: the intake maps it to 0xA701 and the workers treat it as a database outage."""

    def __init__(self, message: str) -> None:
        super().__init__(None, None, RuntimeError(message), hide_parameters=True)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[DatabaseReplaced], tuple[str]]:
        return type(self), (self.message,)


Identity = tuple[int, int]


def file_identity(path: Path) -> Identity | None:
    """(st_dev, st_ino) of ``path``, None when there is no file there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class DatabaseGuard:
    """Watches one SQLite database file; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.identity: Identity | None = file_identity(path)  # None until the file exists (first connection)
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def tripped(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def check(self) -> None:
        """Raise ``DatabaseReplaced`` if the file at the path is no longer the one this process opened."""
        if self._reason is None and self.identity is not None:
            current = file_identity(self.path)
            if current != self.identity:
                self._trip("removed" if current is None else "replaced by another file")
        if self._reason is not None:
            raise DatabaseReplaced(self._reason)

    def opened(self) -> None:
        """A connection has just opened the file: the first one records its identity, later ones must match."""
        if self.identity is None:
            with self._lock:
                if self.identity is None:
                    self.identity = file_identity(self.path)
                    return
        self.check()

    def _trip(self, what: str) -> None:
        with self._lock:
            if self._reason is not None:
                return
            dev, ino = self.identity or (0, 0)
            self._reason = (f"the database file {self.path} was {what} while this process was running "
                            f"(it had opened device {dev} inode {ino})")
        LOG.error("%s: every database commit now fails and C-STOREs are answered 0xA701 until the node is "
                  "restarted; stop the node and start it again: start-up reconciliation re-registers the archived "
                  "files in the database it then opens", self._reason)
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            self._notify(listener)

    def on_trip(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` once when the guard trips (at once if it has already), in the thread that saw the
        mismatch, which may be inside a transaction: a listener only hands work on (e.g. to a scheduler)."""
        with self._lock:
            if self._reason is None:
                self._listeners.append(listener)
                return
        self._notify(listener)

    @staticmethod
    def _notify(listener: Callable[[], None]) -> None:
        try:
            listener()
        except Exception:  # noqa: BLE001 - the guard's own error must still be raised to the transaction
            LOG.exception("a listener of the database guard failed")  # the node's formatter withholds the text

    def poll(self) -> bool:
        """One check without raising; True while the file is still the one opened (the scheduler's periodic
        check)."""
        try:
            self.check()
        except DatabaseReplaced:
            return False
        return True


_GUARDS: weakref.WeakKeyDictionary[Engine, DatabaseGuard] = weakref.WeakKeyDictionary()


def attach_guard(engine: Engine, guard: DatabaseGuard) -> None:
    _GUARDS[engine] = guard


def guard_of(engine: Engine) -> DatabaseGuard | None:
    """The engine's guard; None for PostgreSQL and in-memory SQLite (nothing to watch)."""
    return _GUARDS.get(engine)
