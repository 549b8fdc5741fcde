"""Wake-ups between ``dicom-node serve`` and the worker processes it supervises: a byte in a pipe instead of a wait
for the next poll.

The queue and the exports live in the database; a bell only says "look now". ``serve`` rings the *jobs* bell when
the intake has committed a new job (an idle worker claims it at once instead of after up to ``worker.poll_seconds``),
and a worker rings the *results* bell when it has recorded a job's result objects (the exporter sends them at once
instead of after up to ``export.poll_seconds``). On an idle node the two polls were about a fifth of the time from
send to SR in PACS (docs/benchmarks.md).

A bell is a hint, never the only path: a lost, full or absent bell (a ``dicom-node worker`` on another host has
none) leaves the polls as the bound they always were. Both bells are anonymous pipes created by ``serve`` and handed
to each worker at spawn (``pass_fds``, their numbers in ``PNEUMO_DOORBELL_FDS``), so nothing listens on a port or a
path, and a worker that several processes share a pipe with wakes at most once per ring: one byte, one reader.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

LOG = logging.getLogger("dicom_node.doorbell")

DOORBELL_ENV = "PNEUMO_DOORBELL_FDS"  # "<jobs read fd>,<results write fd>" in a worker started by serve
_DRAIN_BYTES = 4096


def _ring(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except (BlockingIOError, BrokenPipeError):  # full: a wake-up is already pending; no reader left: nobody to wake
        pass
    except OSError as exc:  # a closed descriptor: the polls still bound the delay
        LOG.debug("doorbell write failed (errno %s)", exc.errno)


def _wait(fd: int, timeout: float) -> bool:
    """True when a ring came within ``timeout`` seconds (every pending ring is consumed)."""
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
    except (OSError, ValueError):  # closed meanwhile: behave as the poll it replaces
        return False
    if not readable:
        return False
    try:
        return bool(os.read(fd, _DRAIN_BYTES))  # b"": every writer closed its end
    except BlockingIOError:  # another process sharing the pipe took the byte first
        return False
    except OSError:
        return False


@dataclass(frozen=True)
class Pipe:
    read_fd: int
    write_fd: int

    @classmethod
    def open(cls) -> Pipe:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # inherited only through pass_fds
        return cls(read_fd, write_fd)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class ServeBells:
    """``serve``'s side: rings the workers' jobs bell, listens to their results bell."""

    def __init__(self) -> None:
        self.jobs = Pipe.open()
        self.results = Pipe.open()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    def child_fds(self) -> tuple[int, int]:
        """The descriptors a worker process inherits: the jobs bell's read end, the results bell's write end."""
        return self.jobs.read_fd, self.results.write_fd

    def child_environment(self) -> dict[str, str]:
        return {DOORBELL_ENV: "{},{}".format(*self.child_fds())}

    def ring_workers(self) -> None:
        """A job was committed: one idle worker looks at the queue now."""
        _ring(self.jobs.write_fd)

    def on_results(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (e.g. ``Exporter.wake``) on a thread of its own whenever a worker rings."""

        def listen() -> None:
            while not self._stop.is_set():
                if _wait(self.results.read_fd, 0.5) and not self._stop.is_set():
                    try:
                        callback()
                    except Exception:  # noqa: BLE001 - the polls still export; the listener must not die
                        LOG.exception("results doorbell callback failed")

        self._listener = threading.Thread(target=listen, name="results-doorbell", daemon=True)
        self._listener.start()

    def close(self) -> None:
        """Stop listening and close serve's descriptors (after the workers stopped)."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
        self.jobs.close()
        self.results.close()


@dataclass(frozen=True)
class WorkerBells:
    """A worker's side: waits on the jobs bell, rings the results bell."""

    jobs_read_fd: int
    results_write_fd: int

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> WorkerBells | None:
        """The bells ``serve`` handed this process, or None (run alone, or a value that is not two descriptors)."""
        value = (os.environ if environ is None else environ).get(DOORBELL_ENV, "")
        if not value:
            return None
        try:
            read_fd, write_fd = (int(part) for part in value.split(","))
            os.fstat(read_fd)
            os.fstat(write_fd)
        except (ValueError, OSError):
            LOG.warning("%s is set but does not name two open descriptors: polling only", DOORBELL_ENV)
            return None
        return cls(read_fd, write_fd)

    def wait_for_jobs(self, timeout: float) -> bool:
        return _wait(self.jobs_read_fd, timeout)

    def results_recorded(self) -> None:
        _ring(self.results_write_fd)
