"""Machine endpoints (/health/live, /health/ready, /metrics), worker heartbeats and the Storage SCP's association
history, against a real in-process Storage SCP with pynetdicom as the modality and a tmp SQLite storage root."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.engine import init_schema, make_engine
from db.models import AssociationRecord
from dicom_node import store_metrics
from dicom_node.archive import Archive
from dicom_node.config import NodeConfig, load_config
from dicom_node.intake import Intake
from dicom_node.netsetup import configure_pynetdicom
from dicom_node.scp import StorageServer

from .dicomgen import synthetic_dx
from .support.net import free_port

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def node_config(root: Path, **sets: str) -> NodeConfig:
    values = {"storage.storage_root": str(root), "storage.free_disk_reserve_mb": "1", "worker.processes": "0"}
    values.update(sets)
    return load_config(None, values, environ={})


# --- the Storage SCP's association history and C-STORE metrics ----------------------------------------------------


class ScpNode:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.config = node_config(root, **{"network.port": str(self.port), "network.bind_address": "127.0.0.1",
                                           "network.allowed_calling_aets": "MODALITY"})
        self.archive = Archive(self.config.storage.storage_root, self.config.storage.free_disk_reserve_bytes)
        self.archive.prepare()
        self.engine = make_engine(self.config.database.url)
        init_schema(self.engine)
        intake = Intake(self.archive, self.engine, self.config.storage.duplicate_policy, self.config.limits)
        self.server = StorageServer(self.config, intake)


@pytest.fixture(scope="module")
def scp(tmp_path_factory) -> Iterator[ScpNode]:
    saved = tempfile.tempdir
    node = ScpNode(tmp_path_factory.mktemp("scp"))
    configure_pynetdicom(node.archive.tmp_dir)
    node.server.start()
    try:
        yield node
    finally:
        node.server.stop(grace_seconds=2)
        tempfile.tempdir = saved


def _rows(engine: Engine, calling: str) -> list[AssociationRecord]:
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(select(AssociationRecord).where(AssociationRecord.calling_aet == calling)
                                    .order_by(AssociationRecord.id)))


def _wait_rows(engine: Engine, calling: str, done) -> list[AssociationRecord]:
    deadline = time.monotonic() + 5
    while True:
        rows = _rows(engine, calling)
        if done(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def _cstore_count(status: str) -> float:
    return store_metrics.REGISTRY.get_sample_value("pneumo_cstore_total", {"status": status}) or 0.0


def test_association_with_stores_is_recorded_released_and_timed(scp):
    before = _cstore_count("0x0000")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PNEUMOCAD")
    assert assoc.is_established
    statuses = []
    for seed in range(2):
        ds = synthetic_dx(32, 32, seed=seed)
        statuses.append(assoc.send_c_store(ds).Status)
    assoc.release()
    assert statuses == [0, 0]
    rows = _wait_rows(scp.engine, "MODALITY", lambda r: r and r[-1].outcome != "open")
    assert len(rows) == 1
    row = rows[0]
    assert (row.accepted, row.outcome, row.stores_ok, row.stores_failed, row.tls) == (True, "released", 2, 0, False)
    assert row.called_aet == "PNEUMOCAD" and row.peer_address == "127.0.0.1" and row.ended_at is not None
    assert _cstore_count("0x0000") == before + 2
    assert store_metrics.REGISTRY.get_sample_value("pneumo_cstore_seconds_count", {"status": "0x0000"}) >= 2


def test_rejected_calling_ae_is_recorded_not_accepted(scp):
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PNEUMOCAD")
    assert assoc.is_rejected
    rows = _wait_rows(scp.engine, "INTRUDER", bool)
    assert [(r.accepted, r.outcome, r.stores_ok) for r in rows] == [(False, "rejected: calling AE", 0)]
    assert rows[0].ended_at is not None
