"""The wake-ups between serve and its workers (dicom_node.doorbell): a ring wakes one waiter at once, a missing
ring costs only the poll, and nothing about a bell can block or crash either side."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from dicom_node.doorbell import DOORBELL_ENV, ServeBells, WorkerBells


def worker_side(bells: ServeBells) -> WorkerBells:
    side = WorkerBells.from_environment(bells.child_environment())
    assert side is not None
    return side


def test_a_ring_wakes_the_waiting_worker_at_once_and_is_consumed():
    bells = ServeBells()
    try:
        worker = worker_side(bells)
        started = time.monotonic()
        assert not worker.wait_for_jobs(0.2)  # no ring: the whole poll interval
        assert time.monotonic() - started >= 0.19
        for _ in range(5):  # several jobs committed while the worker was busy: one wake-up
            bells.ring_workers()
        started = time.monotonic()
        assert worker.wait_for_jobs(5.0)
        assert time.monotonic() - started < 1.0
        assert not worker.wait_for_jobs(0.05)  # every pending ring was consumed
    finally:
        bells.close()


def test_the_results_ring_calls_serves_callback_on_its_own_thread():
    bells = ServeBells()
    woken = threading.Event()
    try:
        bells.on_results(woken.set)
        worker_side(bells).results_recorded()
        assert woken.wait(5.0)
    finally:
        bells.close()


def test_a_failing_callback_does_not_stop_the_listener():
    bells = ServeBells()
    calls: list[int] = []

    def callback() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("exporter stopped")

    try:
        bells.on_results(callback)
        worker = worker_side(bells)
        worker.results_recorded()
        deadline = time.monotonic() + 5
        while len(calls) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.results_recorded()
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 2
    finally:
        bells.close()


def test_a_full_pipe_neither_blocks_nor_raises():
    bells = ServeBells()
    try:
        started = time.monotonic()
        for _ in range(100_000):  # far beyond a pipe's 64 KiB: nobody is reading
            bells.ring_workers()
        assert time.monotonic() - started < 10
        assert worker_side(bells).wait_for_jobs(1.0)
    finally:
        bells.close()


def test_bells_of_a_closed_serve_are_harmless_to_the_worker():
    bells = ServeBells()
    worker = worker_side(bells)
    bells.close()
    worker.results_recorded()  # closed descriptor: logged at debug level, nothing raised
    assert not worker.wait_for_jobs(0.05)


def test_without_or_with_a_bad_environment_the_worker_only_polls(caplog):
    assert WorkerBells.from_environment({}) is None
    assert WorkerBells.from_environment({DOORBELL_ENV: "not,numbers"}) is None
    assert WorkerBells.from_environment({DOORBELL_ENV: "1"}) is None
    assert WorkerBells.from_environment({DOORBELL_ENV: "100000,100001"}) is None  # not open here
    assert "polling only" in caplog.text


def test_a_child_process_inherits_the_bells_through_pass_fds():
    """As the supervisor starts a worker: the two descriptors pass, the environment names them."""
    bells = ServeBells()
    woken = threading.Event()
    try:
        bells.on_results(woken.set)
        child = ("import sys; from dicom_node.doorbell import WorkerBells\n"
                 "b = WorkerBells.from_environment()\n"
                 "assert b is not None\n"
                 "assert b.wait_for_jobs(10.0)\n"
                 "b.results_recorded()\n")
        proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, **bells.child_environment()},
                                pass_fds=bells.child_fds())
        time.sleep(0.2)
        bells.ring_workers()
        assert proc.wait(30) == 0
        assert woken.wait(5.0)
    finally:
        bells.close()
