"""``dicom-node serve`` life cycle: SIGTERM lets open associations finish, refuses new ones, exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

from .conftest import PEER_ENV, free_port, parse_storescu
from .dicomgen import clone_instances, synthetic_dx


def test_sigterm_finishes_in_flight_stores_and_refuses_new_associations(node, tmp_path):
    files = clone_instances(synthetic_dx(256, 256), tmp_path / "in", 60)
    sender = subprocess.Popen(["storescu", "-v", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port),
                               *map(str, files)], env=PEER_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while node.log().count("C-STORE from") < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = subprocess.run(["echoscu", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port)], env=PEER_ENV,
                          capture_output=True, text=True, timeout=30)
    assert late.returncode != 0, "a new association was accepted after SIGTERM"

    output = sender.communicate(timeout=120)[0]
    statuses = parse_storescu(output)
    assert sender.returncode == 0 and len(statuses) == len(files), output[-2000:]
    assert all(status == "Success" for _, status in statuses)
    assert node.proc.wait(60) == 0
    assert "SIGTERM received" in node.log() and "stopped" in node.log()
    assert len(list((node.storage_root / "archive").rglob("*.dcm"))) == len(files)


def test_serve_runs_every_periodic_job_on_one_scheduler(node_factory):
    """The identity check, the lease reclaim, the worker supervision, each destination's export round, the SR
    label import and the training schedule are jobs of serve's one scheduler (dicom_node.scheduler), named in its
    start-up line."""
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    node = node_factory(export__destinations=json.dumps([destination]), training__schedule="30 1 * * *").start()
    line = re.search(r"INFO dicom_node\.scheduler: scheduler: (.*)", node.log())
    assert line, node.log()[-3000:]
    jobs = dict(re.split(" every | at ", item, maxsplit=1) for item in line.group(1).split(", "))
    assert jobs == {"export:pacs": "0.2 s", "lease-reclaim": "98.25 s", "database-identity": "2 s",
                    "labels-sr": "60 s", "training": "'30 1 * * *'"}, line.group(1)
    assert node.stop() == 0
    assert "stopped (0 association(s) aborted" in node.log()


def test_a_worker_process_runs_niced_and_is_restarted_by_the_schedulers_workers_job_when_it_dies(node_factory):
    node = node_factory(worker__processes="1").start()
    assert re.search(r"scheduler: .*workers every 0\.5 s", node.log()), node.log()[-3000:]
    started = re.findall(r"worker 0 started \(pid (\d+)\)", node.log())
    assert len(started) == 1, node.log()[-3000:]
    deadline = time.monotonic() + 30  # worker.nice (15): the intake gets the CPU first on a busy node
    own = os.getpriority(os.PRIO_PROCESS, 0)
    while os.getpriority(os.PRIO_PROCESS, int(started[0])) != min(19, own + 15):  # niceness stops at 19
        assert time.monotonic() < deadline, "the worker process did not lower its priority by worker.nice"
        time.sleep(0.1)
    os.kill(int(started[0]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(re.findall(r"worker 0 started", node.log())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = node.log()
    assert f"worker 0 (pid {started[0]}) exited with status -9" in log, log[-3000:]
    assert len(re.findall(r"worker 0 started", log)) == 2, log[-3000:]
    assert node.stop() == 0
