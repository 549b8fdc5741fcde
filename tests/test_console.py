"""The console core (overview, jobs, one job, exports, audit, login, CSRF) through Starlette's TestClient on a
storage root whose rows were written by the node's own code: the intake stored three images, a job was finished the
way a worker finishes it (finding, SR and a generated heat-map SC, exports to a destination), one failed, one export
was dead-lettered the way the exporter does it. One `dicom-node serve` subprocess checks the console on its port."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from db.exports import claim_due, list_exports, schedule_retry
from db.findings import FindingValues
from db.models import Event, ExportState, JobState, Label
from db.queue import claim, fail
from db.results import ResultFile, finish_job
from dicom_node.console.app import ConsoleConfigError, build_app, check_startup
from dicom_node.console.context import ConsoleContext
from dicom_node.console.passwords import hash_password
from dicom_node.intake import Intake
from dicom_node.runtime import Runtime, open_runtime

from .support.data import CHEST_UNCOMPRESSED, CONFIG, REPO
from .support.net import free_port
from .support.node import Node
from .support.sc_picture import SC_CLASS, red_ramp, write_sc

PATIENT_NAME = "Planted^Patient"
PATIENT_ID = "PID-PLANTED-4711"
PASSWORD = "correct horse battery"
DESTINATION = "pacs"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Data:
    rt: Runtime
    done_job: int
    failed_job: int
    queued_job: int
    dead_export: int
    pending_export: int


def _store(intake: Intake, rt: Runtime, tmp: Path, calling_aet: str) -> str:
    ds = pydicom.dcmread(CHEST_UNCOMPRESSED)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    path = rt.archive.tmp_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    outcome = intake.store(path, calling_aet, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
    assert outcome.status == 0, outcome
    return str(ds.SOPInstanceUID)


def _heatmap_sc(rt: Runtime, name: str) -> ResultFile:
    """A small secondary capture like the node's heat-map picture, stored as the node stores it by default (JPEG
    Baseline, YBR_FULL_422)."""
    relative = f"results/{name}.dcm"
    ds = write_sc(rt.archive.root / relative, red_ramp())
    return ResultFile(kind="sc", sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=SC_CLASS,
                      series_instance_uid=ds.SeriesInstanceUID, transfer_syntax_uid=JPEGBaseline8Bit,
                      archive_path=relative, size_bytes=(rt.archive.root / relative).stat().st_size, analysed=True,
                      reason="analysed")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("console")
    rt = open_runtime(CONFIG, [f"storage.storage_root={root / 'var'}", "storage.free_disk_reserve_mb=1"],
                      serve=True)
    intake = Intake(rt.archive, rt.engine, rt.config.storage.duplicate_policy, rt.config.limits)
    for aet in ("MOD_A", "MOD_A", "MOD_B"):
        _store(intake, rt, root, aet)
    done = claim(rt.engine, "test-worker", 60.0, 3)
    assert done is not None
    sc = _heatmap_sc(rt, "heat")
    sr = dataclasses.replace(sc, kind="sr", sop_instance_uid=generate_uid(), sop_class_uid=SR_CLASS,
                             archive_path="results/sr.dcm")
    finding = FindingValues(model_name="pneumo-resnet34", model_version="t1", model_sha256="0" * 64,
                            probability=0.83, present=True, threshold=0.5, category=2,
                            category_probabilities=(0.05, 0.12, 0.71, 0.12), analysis_seconds=0.25)
    assert finish_job(rt.engine, done, JobState.DONE, None, None, [sr, sc], {DESTINATION: ("sr", "sc")},
                      finding=finding)
    failed = claim(rt.engine, "test-worker", 60.0, 3)
    assert failed is not None
    assert fail(rt.engine, failed, "decode_failed", "pixel data cannot be decoded", 3, retryable=False)
    (export,) = claim_due(rt.engine, "test-exporter", 60.0, 1, destinations=[DESTINATION])
    assert schedule_retry(rt.engine, export.export_id, "test-exporter", None, "PACS@192.0.2.1:104 refused",
                          30.0, 3600.0, 1) is ExportState.DEAD
    (pending,) = [e.export_id for e in list_exports(rt.engine, ExportState.PENDING)]
    queued = max(done.job_id, failed.job_id) + 1
    return Data(rt, done.job_id, failed.job_id, queued, export.export_id, pending)


def _client(data: Data, **console: str) -> TestClient:
    cfg = data.rt.config
    if console:
        cfg = dataclasses.replace(cfg, console=dataclasses.replace(cfg.console, **console))
    ctx = ConsoleContext(cfg, data.rt.engine, data.rt.archive)
    return TestClient(build_app(ctx), follow_redirects=False)


@pytest.fixture(scope="module")
def client(data) -> TestClient:
    return _client(data)


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def _token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def _export_state(data: Data, export_id: int) -> str:
    return next(e.state for e in list_exports(data.rt.engine, limit=100) if e.export_id == export_id)


def _events(data: Data, kind: str) -> list[Event]:
    with Session(data.rt.engine) as session:
        return list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def test_every_page_answers_with_its_content(client, data):
    page = client.get("/")
    assert page.status_code == 200 and "<title>Overview" in page.text
    assert re.search(r'state-failed">failed</span></a></td><td class="num">1<', page.text)
    assert "pixel data cannot be decoded" in page.text  # the last errors: the failed job and the dead export
    assert "PACS@192.0.2.1:104 refused" in page.text
    assert 'id="disk-free"' in page.text and "GiB free" in page.text
    assert 'id="workers-alive"' in page.text
    assert "Images per hour" in page.text  # engineer B's plot, embedded

    jobs = client.get("/jobs")
    assert jobs.status_code == 200 and "<title>Jobs" in jobs.text
    assert all(f'href="/jobs/{j}"' in jobs.text for j in (data.done_job, data.failed_job, data.queued_job))
    assert "pneumo-resnet34 t1" in jobs.text and "0.830" in jobs.text

    job = client.get(f"/jobs/{data.done_job}")
    assert job.status_code == 200 and f"<title>Job {data.done_job}" in job.text
    for expected in ("CR", "1955 x 1841", "Explicit VR Little Endian", "in scope", "present", "pneumo-resnet34 t1",
                     "DEMO model: not for clinical use.", f"/jobs/{data.done_job}/heatmap.png", "received",
                     "PACS@192.0.2.1:104 refused", "feedback-form"):
        assert expected in job.text, expected
    assert PATIENT_NAME not in job.text and PATIENT_ID not in job.text and "hidden: log in as admin" in job.text

    exports = client.get("/exports")
    assert exports.status_code == 200 and "<title>Exports" in exports.text and "Resend all 1 dead" in exports.text
    audit = client.get("/audit")
    assert audit.status_code == 200 and "<title>Audit log" in audit.text and "export_dead" in audit.text
    assert client.get("/login").status_code == 200
    assert client.get("/jobs/99999").status_code == 404
    assert client.get("/static/console.css").headers["content-type"].startswith("text/css")


def test_job_filters_paging_and_csv(client, data):
    failed = client.get("/jobs?state=failed").text
    assert f'href="/jobs/{data.failed_job}"' in failed and f'href="/jobs/{data.done_job}"' not in failed
    by_caller = client.get("/jobs?calling_aet=MOD_B").text
    assert f'href="/jobs/{data.queued_job}"' in by_caller and f'href="/jobs/{data.done_job}"' not in by_caller
    assert "no jobs match" in client.get("/jobs?received_from=2999-01-01").text
    assert "no jobs match" in client.get("/jobs?reason=nothing_like_it").text
    bad = client.get("/jobs?received_to=yesterday&state=bogus")
    assert bad.status_code == 400 and "received_to: not a date" in bad.text and "unknown state" in bad.text
    second = client.get("/jobs?per_page=1&page=2").text
    assert "page 2 of 3" in second and f'href="/jobs/{data.failed_job}"' in second

    rows = list(csv.DictReader(io.StringIO(client.get("/jobs.csv?calling_aet=MOD_A").text)))
    assert [int(r["job_id"]) for r in rows] == [data.failed_job, data.done_job]
    done = rows[1]
    assert (done["state"], done["probability"], done["present"], done["category"], done["model"]) == \
        ("done", "0.8300", "yes", "2", "pneumo-resnet34 t1")
    assert rows[0]["reason"] == "decode_failed" and rows[0]["calling_aet"] == "MOD_A"
    assert client.get("/jobs.csv?received_from=x").status_code == 400


def test_posts_without_the_right_csrf_token_change_nothing(client, data):
    before = len(_events(data, "console_resend"))
    for form in ({}, {"csrf_token": "forged"}):
        answer = client.post("/exports/resend", data={**form, "export_id": str(data.dead_export)})
        assert answer.status_code == 403
        assert client.post(f"/jobs/{data.done_job}/feedback",
                           data={**form, "reader": "Dr X", "action": "accept"}).status_code == 403
    assert _export_state(data, data.dead_export) == "dead"
    assert len(_events(data, "console_resend")) == before
    with Session(data.rt.engine) as session:
        assert session.scalar(select(Label.id).where(Label.reader == "Dr X")) is None


def test_resend_one_and_all_matching_with_the_actor_audited(client, data):
    token = _token(client.get("/exports?state=dead").text)
    answer = client.post("/exports/resend", data={"csrf_token": token, "export_id": str(data.dead_export),
                                                  "back": "state=dead"})
    assert answer.status_code == 303 and answer.headers["location"] == "/exports?state=dead"
    assert _export_state(data, data.dead_export) == "pending"
    (event,) = _events(data, "console_resend")[-1:]
    assert event.actor == "local:testclient" and f"ids {data.dead_export}" in event.detail
    assert "1 export(s) queued again" in client.get("/exports?state=dead").text  # the flash message

    # all matching: nothing left that a resend makes sense for (the pending SC has never failed)
    client.post("/exports/resend", data={"csrf_token": token, "state": "pending"})
    assert _export_state(data, data.pending_export) == "pending"
    assert "0 export(s) queued again" in _events(data, "console_resend")[-1].detail


def test_feedback_accept_reject_and_reading_become_labels(client, data):
    page = client.get(f"/jobs/{data.done_job}").text
    token = _token(page)
    url = f"/jobs/{data.done_job}/feedback"
    for form in ({"action": "accept"}, {"action": "reject"},
                 {"action": "reading", "present": "yes", "category": "1", "subcategory": "1/2", "shape": "p/q"}):
        answer = client.post(url, data={"csrf_token": token, "reader": "Dr Reader", **form})
        assert answer.status_code == 303, answer.text
    with Session(data.rt.engine) as session:
        labels = session.scalars(select(Label).where(Label.reader == "Dr Reader").order_by(Label.id)).all()
        assert [(lb.present, lb.category, lb.subcategory, lb.shape, lb.source.value) for lb in labels] == [
            (True, 2, None, None, "console"), (False, 0, None, None, "console"), (True, 1, "1/2", "p/q", "console")]
    assert _events(data, "label_added")[-1].actor == "local:testclient"
    refused = client.post(url, data={"csrf_token": token, "reader": "Dr Reader", "action": "reading",
                                     "present": "yes", "category": "1", "subcategory": "3/2"})
    assert refused.status_code == 400 and 'id="feedback-error"' in refused.text and "subcategory" in refused.text
    assert 'value="3/2"' in refused.text  # the form keeps what was typed
    missing = client.post(url, data={"csrf_token": token, "reader": "Dr Reader", "action": "reading"})
    assert missing.status_code == 400 and "present: choose yes or no" in missing.text


def test_heatmap_png_from_the_sc_and_404_without_one(client, data):
    answer = client.get(f"/jobs/{data.done_job}/heatmap.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    assert image.mode == "RGB" and image.size == (1024, 410)
    red, green, blue = image.getpixel((1023, 200))
    assert red > 240 and green < 15 and blue < 15, "the picture's colours as stored (RGB from YBR, converted once)"
    assert max(image.getpixel((0, 200))) < 10
    assert client.get(f"/jobs/{data.failed_job}/heatmap.png").status_code == 404


def test_non_loopback_binding_needs_the_password_hash(data):
    cfg = data.rt.config
    with pytest.raises(ConsoleConfigError, match="console.admin_password_hash.*dicom-node console hash-password"):
        check_startup(dataclasses.replace(cfg, console=dataclasses.replace(cfg.console, bind_address="0.0.0.0")))
    check_startup(cfg)  # loopback: no password needed
    proc = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(CONFIG),
                           "--set", f"storage.storage_root={data.rt.archive.root}", "--set", "worker.processes=0",
                           "--set", f"network.port={free_port()}",
                           "--set", "console.bind_address=0.0.0.0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "console.admin_password_hash" in proc.stderr, proc.stderr


def test_login_gate_wrong_and_right_password_and_patient_data_for_the_admin(data, password_hash):
    client = _client(data, bind_address="0.0.0.0", admin_password_hash=password_hash)
    answer = client.get(f"/jobs/{data.done_job}")
    assert answer.status_code == 303 and answer.headers["location"] == f"/login?next=%2Fjobs%2F{data.done_job}"
    assert client.get("/health/live").status_code == 200  # open for machines
    assert client.post("/exports/resend", data={}).status_code == 403
    token = _token(client.get("/login").text)
    wrong = client.post("/login", data={"csrf_token": token, "user": "admin", "password": "guess",
                                        "next": "/jobs"})
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    refused = _events(data, "console_login_failed")[-1]
    assert "guess" not in (refused.detail or "") and refused.actor.startswith("local:")
    right = client.post("/login", data={"csrf_token": token, "user": "admin", "password": PASSWORD,
                                        "next": f"/jobs/{data.done_job}"})
    assert right.status_code == 303 and right.headers["location"] == f"/jobs/{data.done_job}"
    page = client.get(f"/jobs/{data.done_job}").text
    assert PATIENT_NAME in page and PATIENT_ID in page and "hidden: log in as admin" not in page
    assert 'value="admin"' in page  # the reader field defaults to the logged-in user
    assert _events(data, "console_login")[-1].actor == "admin"
    token = _token(page)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert client.get("/").status_code == 303
    assert client.post("/login", data={"csrf_token": token, "user": "admin", "password": PASSWORD}).status_code \
        == 403  # the session ended: its token with it
    token = _token(client.get("/login").text)
    assert client.post("/login", data={"csrf_token": token, "user": "admin", "password": PASSWORD,
                                       "next": "https://evil.example/"}).headers["location"] == "/"


def test_require_login_closes_a_loopback_console_and_secure_cookie_marks_the_session(data, password_hash):
    cfg = data.rt.config
    with pytest.raises(ConsoleConfigError, match="console.require_login.*console.admin_password_hash"):
        check_startup(dataclasses.replace(cfg, console=dataclasses.replace(cfg.console, require_login=True)))
    client = _client(data, require_login=True, admin_password_hash=password_hash)  # e.g. behind a local proxy
    answer = client.get("/jobs")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
    assert "secure" not in client.get("/login").headers["set-cookie"].lower()
    secure = _client(data, secure_cookie=True).get("/login").headers["set-cookie"].lower()
    assert "secure" in secure and "httponly" in secure and "samesite=strict" in secure


def test_serve_runs_the_console_on_its_port(tmp_path):
    port = free_port()
    node = Node(root=tmp_path, port=free_port(), overrides={"console.enabled": "true", "console.port": str(port)})
    node.start()
    try:
        assert f"console at http://127.0.0.1:{port}/" in node.log()
        for path, expected in (("/health/live", None), ("/", "<title>Overview")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
                body = answer.read().decode()
                assert answer.status == 200 and (expected is None or expected in body)
        blocked = subprocess.run(node.args("serve"), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert blocked.returncode == 1 and f"console port 127.0.0.1:{port}" in blocked.stdout + blocked.stderr
    finally:
        assert node.stop() == 0
    shutil.rmtree(tmp_path / "var", ignore_errors=True)
