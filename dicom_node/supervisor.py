"""Start, watch and stop the worker processes of ``dicom-node serve``.

Each worker is a ``dicom-node worker`` child process with the same configuration (file, environment and ``--set``
overrides), so what runs under ``serve`` is exactly what an admin can run alone on another host. A worker that
dies is restarted (after a growing pause if it keeps dying); its job comes back when its lease expires. The
supervisor does not poll by itself: ``start`` registers ``check`` as the ``workers`` job of ``serve``'s scheduler
(``dicom_node.scheduler``), every ``CHECK_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .doorbell import ServeBells
from .scheduler import WORKERS_JOB, NodeScheduler

LOG = logging.getLogger("dicom_node.supervisor")

SUPERVISOR_PID_ENV = "PNEUMO_SUPERVISOR_PID"
RESTART_PAUSE_S = (1.0, 60.0)  # first pause after a crash, cap (doubles while crashes follow each other)
STABLE_AFTER_S = 60.0  # a worker that ran this long resets the pause
CHECK_SECONDS = 0.5  # how often the scheduler looks for a worker that exited


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    pause: float = RESTART_PAUSE_S[0]
    restart_at: float = 0.0


class WorkerSupervisor:
    def __init__(self, count: int, config_path: Path | None, overrides: list[str],
                 bells: ServeBells | None = None) -> None:
        self.count = count
        self.bells = bells  # handed to every worker (dicom_node.doorbell); None: the workers only poll
        self.command = [sys.executable, "-m", "dicom_node.cli", "worker"]
        if config_path is not None:
            self.command += ["--config", str(config_path)]
        for item in overrides:
            self.command += ["--set", item]
        self.slots = [_Slot(i) for i in range(count)]
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one check at a time, and none while stop() terminates the workers
        self._scheduler: NodeScheduler | None = None

    def start(self, scheduler: NodeScheduler) -> None:
        """Start every worker, and watch them from ``scheduler``'s ``workers`` job."""
        for slot in self.slots:
            self._spawn(slot)
        scheduler.every(WORKERS_JOB, CHECK_SECONDS, self.check)
        self._scheduler = scheduler

    def _spawn(self, slot: _Slot) -> None:
        # The worker stops by itself when this process disappears (even by SIGKILL): no orphaned workers.
        env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
        fds: tuple[int, ...] = ()
        if self.bells is not None:
            env.update(self.bells.child_environment())
            fds = self.bells.child_fds()
        slot.process = subprocess.Popen(self.command, env=env, pass_fds=fds)
        slot.started_at = time.monotonic()
        LOG.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def check(self) -> None:
        """Note the workers that exited and restart each once its pause is over (the scheduler's ``workers``
        job)."""
        with self._lock:
            if self._stop.is_set():
                return
            now = time.monotonic()
            for slot in self.slots:
                proc = slot.process
                if proc is not None and proc.poll() is not None:
                    ran = now - slot.started_at
                    slot.pause = RESTART_PAUSE_S[0] if ran > STABLE_AFTER_S else min(slot.pause * 2,
                                                                                     RESTART_PAUSE_S[1])
                    slot.restart_at = now + slot.pause
                    LOG.error("worker %d (pid %d) exited with status %s after %.0f s; restarting in %.0f s",
                              slot.index, proc.pid, proc.returncode, ran, slot.pause)
                    slot.process = None
                if slot.process is None and now >= slot.restart_at:
                    self._spawn(slot)

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM every worker (each finishes its batch in hand), SIGKILL what is still running after the grace."""
        if self._scheduler is not None:
            self._scheduler.remove(WORKERS_JOB)
            self._scheduler = None
        with self._lock:  # a check in progress finishes first; none restarts a worker after this
            self._stop.set()
        running = [s.process for s in self.slots if s.process is not None and s.process.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + grace_seconds
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOG.warning("worker pid %d did not stop within %.0f s: killed (its job returns after the lease)",
                            proc.pid, grace_seconds)
                proc.kill()
                proc.wait()


def stop_when_supervisor_exits(stop: threading.Event, interval: float = 1.0) -> None:
    """In a worker started by ``serve``: set ``stop`` once the supervising process is gone (its parent changes)."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return

    def watch() -> None:
        while not stop.wait(interval):
            if os.getppid() != int(expected):
                LOG.warning("supervising dicom-node serve (pid %s) is gone: stopping after the batch in hand",
                            expected)
                stop.set()

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
