"""Disk hygiene during reception: an aborted transfer leaves nothing in tmp/, and the free-disk reserve is checked
while the dataset streams in, not only once it is all on disk."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .dicomgen import clone_instances, synthetic_dx
from .support.dicom_tools import storescu

DIE_MID_TRANSFER = """
import os, sys
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF

sent = [0]
def die_after_a_few_fragments(event):
    if isinstance(event.pdu, P_DATA_TF):
        sent[0] += 1
        if sent[0] == 8:  # the command set and a few MB of the dataset are out: the modality dies
            os._exit(0)

ae = AE(ae_title="DYING")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
ae.maximum_pdu_size = 1 << 20
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="PNEUMOCAD",
                     evt_handlers=[(evt.EVT_PDU_SENT, die_after_a_few_fragments)])
assert assoc.is_established
assoc.send_c_store(dcmread(sys.argv[2]))
print("not expected: the whole dataset was sent")
"""


def _wait_until_empty(directory: Path, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while (left := list(directory.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_an_aborted_reception_leaves_nothing_in_tmp(node, tmp_path):
    (big,) = clone_instances(synthetic_dx(4000, 4000), tmp_path / "in", 1)  # 32 MB: many 1 MB PDUs
    died = subprocess.run([sys.executable, "-c", DIE_MID_TRANSFER, str(node.port), str(big)], capture_output=True,
                          text=True, timeout=60)
    assert "not expected" not in died.stdout, died.stdout + died.stderr
    # the node may still be reading what the modality sent before it died: wait for the close to be handled
    deadline = time.monotonic() + 10
    while "was removed" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "partial reception" in node.log() and "was removed" in node.log()
    assert _wait_until_empty(node.storage_root / "tmp") == []
    assert not list((node.storage_root / "archive").rglob("*.dcm"))
    assert storescu(node.port, [big]).statuses == [(str(big), "Success")]  # the node is fine afterwards


def test_reserve_reached_mid_transfer_is_answered_a700_without_writing_the_rest(node_factory, tmp_path):
    (big,) = clone_instances(synthetic_dx(6000, 6000), tmp_path / "in", 1)  # 72 MB
    small = clone_instances(synthetic_dx(64, 64), tmp_path / "small", 1)[0]
    margin = 24 * 2**20  # free space above the reserve when the transfer starts: a third of the dataset
    reserve_mb = (shutil.disk_usage(tmp_path).free - margin) / 2**20
    node = node_factory(storage__free_disk_reserve_mb=f"{reserve_mb:.1f}").start()
    refused = storescu(node.port, [big], "-d")
    assert refused.statuses and refused.statuses[0][1] != "Success", refused.output
    assert "0xa700" in refused.output.lower(), refused.output
    assert "its reception is discarded" in node.log()
    assert "fell below the reserve during the transfer" in node.log()
    assert _wait_until_empty(node.storage_root / "tmp") == []
    assert not list((node.storage_root / "archive").rglob("*.dcm"))
    assert storescu(node.port, [small]).statuses == [(str(small), "Success")]  # small ones still fit
