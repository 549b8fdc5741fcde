"""``dicom-node serve`` life cycle: SIGTERM lets open associations finish, refuses new ones, exits 0."""

from __future__ import annotations

import signal
import subprocess
import time

from .conftest import PEER_ENV, parse_storescu
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
