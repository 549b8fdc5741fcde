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


def test_worker_with_a_broken_model_file_beats_not_ok_and_still_reports(scp, tmp_path):
    """A worker whose models fail to load keeps running: heartbeat models_ok False with a log-safe reason, its
    jobs (the two stored above) end failed with a "not analysed" SR, and a clean stop sets stopped_at."""
    import threading

    from ai import analyse_batch
    from db import workers
    from db.models import Job, JobState, Result
    from dicom_node.worker import Worker

    (tmp_path / "lung_unet.pt").write_bytes(b"not a model")
    config = node_config(scp.config.storage.storage_root, **{"models.directory": str(tmp_path),
                                                             "queue.max_attempts": "1"})
    worker = Worker(config, scp.engine, scp.archive, owner="test-host:1:broken", analyse=analyse_batch)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Session(scp.engine) as session:
                states = set(session.scalars(select(Job.state)))
                reports = session.scalar(select(Result.id).where(Result.kind == "sr").limit(1))
            if states == {JobState.FAILED} and reports is not None:
                break
            time.sleep(0.1)
        [row] = workers.list_alive(scp.engine)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert states == {JobState.FAILED} and reports is not None
    assert (row.name, row.models_ok, row.models()) == ("test-host:1:broken", False, [])
    assert row.models_detail and "not a model" not in row.models_detail
    assert workers.list_alive(scp.engine) == []
    [stopped] = workers.list_workers(scp.engine)
    assert stopped.stopped_at is not None and stopped.jobs_done == 2


# --- /health and /metrics on a tmp SQLite storage root ----------------------------------------------------------


def _context(root: Path, **sets: str):
    from dicom_node.console.context import ConsoleContext

    config = node_config(root, **sets)
    archive = Archive(config.storage.storage_root, config.storage.free_disk_reserve_bytes)
    archive.root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.database.url)
    if engine.dialect.name == "sqlite":
        init_schema(engine)
    return ConsoleContext(config=config, engine=engine, archive=archive)


def _client(ctx):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from dicom_node.console.health import health_routes
    from dicom_node.console.metrics import metrics_routes

    return TestClient(Starlette(routes=health_routes(ctx) + metrics_routes(ctx)))


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    ctx = _context(tmp_path_factory.mktemp("console"))
    with _client(ctx) as client:
        yield ctx, client


@pytest.fixture
def no_workers(console):
    from db.models import WorkerHeartbeat

    ctx, _ = console
    with Session(ctx.engine) as session, session.begin():
        session.query(WorkerHeartbeat).delete()
    yield


MODELS = [{"role": "segmenter", "name": "lung-unet", "version": "1.0", "sha256": "ab" * 32},
          {"role": "classifier", "name": "pneumo-resnet34", "version": "demo", "sha256": "cd" * 32}]


def _beating(engine: Engine, name: str = "host:1:aa", models_ok: bool = True, detail: str | None = None) -> None:
    from db.workers import models_json, upsert

    upsert(engine, name, host="host", pid=1, device="cpu", models_ok=models_ok,
           models_detail=models_json(MODELS) if detail is None else detail)


def test_live_answers(console):
    response = console[1].get("/health/live")
    assert (response.status_code, response.json()) == (200, {"status": "live"})


def test_ready_without_a_live_worker_is_503(console, no_workers):
    response = console[1].get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready" and body["checks"]["database"]["ok"] is True
    assert body["reasons"] == ["no worker is alive (worker.processes = 0 and no external worker has a live "
                               "heartbeat)"]


def test_ready_with_a_live_worker_then_its_models_failing(console, no_workers):
    ctx, client = console
    _beating(ctx.engine)
    response = client.get("/health/ready")
    assert (response.status_code, response.json()["status"], response.json()["reasons"]) == (200, "ready", [])
    assert response.json()["checks"]["models"]["loaded"] == ["classifier: pneumo-resnet34 demo",
                                                             "segmenter: lung-unet 1.0"]
    _beating(ctx.engine, "host:2:bb", models_ok=False, detail="RuntimeError: the models failed to load")
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["reasons"] == ["the models failed to load on 1 of 2 live worker(s)"]
    assert response.json()["checks"]["models"]["problems"] == ["RuntimeError: the models failed to load"]


def test_heartbeats_alive_stale_and_stopped(console, no_workers):
    from datetime import timedelta

    from db import workers
    from db.models import utcnow

    engine = console[0].engine
    _beating(engine, "w1")
    _beating(engine, "w2")
    workers.beat(engine, "w1", jobs_done=7)
    assert {w.name: w.jobs_done for w in workers.list_alive(engine)} == {"w1": 7, "w2": 0}
    assert workers.list_alive(engine)[0].models() == MODELS
    later = utcnow() + timedelta(seconds=workers.ALIVE_SECONDS + 1)
    assert workers.list_alive(engine, now=later) == []  # three missed beats: dead
    workers.stop(engine, "w2", jobs_done=3)
    assert [w.name for w in workers.list_alive(engine)] == ["w1"] and workers.count_alive(engine) == 1
    stopped = [w for w in workers.list_workers(engine) if w.name == "w2"][0]
    assert stopped.stopped_at is not None and stopped.jobs_done == 3
    assert workers.latest_models(engine) == MODELS
    assert workers.parse_models("OSError: details withheld") == []


def test_disk_below_the_reserve_is_not_ready(tmp_path):
    ctx = _context(tmp_path, **{"storage.free_disk_reserve_mb": str(1 << 40)})
    _beating(ctx.engine)
    with _client(ctx) as client:
        response = client.get("/health/ready")
    assert response.status_code == 503
    [reason] = response.json()["reasons"]
    assert reason.startswith("free disk below the reserve") and response.json()["checks"]["disk"]["ok"] is False


def test_unreachable_database_is_not_ready_quickly(tmp_path):
    ctx = _context(tmp_path, **{"database.url": f"postgresql+psycopg://node:pw@127.0.0.1:{free_port()}/node"})
    started = time.monotonic()
    with _client(ctx) as client:
        response = client.get("/health/ready")
        metrics = client.get("/metrics")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"]["ok"] is False and body["reasons"][0].startswith("database unreachable")
    assert "pw" not in response.text and "node:" not in response.text
    assert metrics.status_code == 200 and "pneumo_database_up 0.0" in metrics.text


def _families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_carry_the_database_counts(console, no_workers):
    from db.models import Finding, Instance, Job, JobState

    ctx, client = console
    with Session(ctx.engine) as session, session.begin():
        for i, state in enumerate([JobState.DONE, JobState.DONE, JobState.QUEUED, JobState.FAILED]):
            instance = Instance(sop_instance_uid=f"2.25.{i + 1}", sop_class_uid=DX, study_instance_uid="2.25.9",
                                series_instance_uid="2.25.8", calling_aet="MODALITY", archive_path=f"a/{i}",
                                size_bytes=1, sha256="0" * 64, transfer_syntax_uid=ExplicitVRLittleEndian,
                                in_scope=True, scope_reason="ok")
            job = Job(instance=instance, state=state)
            session.add_all([instance, job])
            if state == JobState.DONE:
                session.flush()
                session.add(Finding(job_id=job.id, instance_id=instance.id, model_name="pneumo-resnet34",
                                    model_version="demo", probability=0.2, present=False, threshold=0.5,
                                    category=0, category_probabilities="[1, 0, 0, 0]", analysis_seconds=0.3 + i))
        session.add(AssociationRecord(calling_aet="MODALITY", called_aet="PNEUMOCAD", peer_address="127.0.0.1",
                                      accepted=True, outcome="released", stores_ok=5, stores_failed=1))
    _beating(ctx.engine)
    started = time.perf_counter()
    response = client.get("/metrics")
    assert time.perf_counter() - started < 1.0
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = _families(response.text)
    jobs = {s.labels["state"]: s.value for s in families["pneumo_jobs"].samples}
    assert (jobs["done"], jobs["queued"], jobs["failed"], jobs["running"]) == (2, 1, 1, 0)
    assert {s.labels["state"] for s in families["pneumo_exports"].samples} == {"pending", "sending", "sent", "dead"}
    assert families["pneumo_workers_alive"].samples[0].value == 1
    assert families["pneumo_database_up"].samples[0].value == 1
    analysis = {(s.name, s.labels.get("le")): s.value for s in families["pneumo_analysis_seconds"].samples}
    assert analysis[("pneumo_analysis_seconds_count", None)] == 2
    assert analysis[("pneumo_analysis_seconds_bucket", "0.5")] == 1 and analysis[("pneumo_analysis_seconds_bucket",
                                                                                  "2.0")] == 2
    cstore = {s.labels["status"]: s.value for s in families["pneumo_cstore"].samples}
    assert cstore == {"ok": 5, "failed": 1}  # outside serve: from the association history
    roles = {s.labels["role"]: s.labels for s in families["pneumo_model_info"].samples}
    assert roles["segmenter"]["name"] == "lung-unet" and roles["segmenter"]["sha256"] == "ab" * 32
    assert families["pneumo_build_info"].samples[0].labels["version"]
    assert families["pneumo_disk_free_bytes"].samples[0].value > 0
    assert families["pneumo_export_failures"].samples[0].value == 0
    assert "MODALITY" not in response.text and "2.25.1" not in response.text  # no AE titles, no UIDs


def test_metrics_inside_serve_carry_the_in_process_cstore_metrics(console):
    from dataclasses import replace

    from prometheus_client import generate_latest

    from dicom_node.console.metrics import metrics_registry

    store_metrics.observe_store(0xA700, 0.02)
    families = _families(generate_latest(metrics_registry(replace(console[0], in_serve=True))).decode())
    statuses = {s.labels["status"] for s in families["pneumo_cstore"].samples if s.name == "pneumo_cstore_total"}
    assert "0xA700" in statuses and "ok" not in statuses
    assert any(s.name == "pneumo_cstore_seconds_bucket" for s in families["pneumo_cstore_seconds"].samples)
