"""The console's network, model and statistics pages (``dicom_node.console.pages_ops``, ``plots``, ``db.stats``).

The real application (``dicom_node.console.app.build_app``) through Starlette's TestClient on a real SQLite
database with rows inserted as the node writes them; the C-ECHO test against a real DCMTK storescp and a closed
port; registry changes through ``db.registry`` and the pages' CSRF-checked forms. One app per module: the tests
share its database and keep to their own rows.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from datetime import date, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from db import feedback, stats
from db.engine import init_schema, make_engine
from db.findings import FindingValues, add_finding
from db.models import (
    AssociationRecord,
    Event,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Result,
    RunState,
    TrainingRun,
    utcnow,
)
from db.registry import ensure_bundled_champion, list_models, register_candidate
from dicom_node.archive import Archive
from dicom_node.config import load_config
from dicom_node.console import plots
from dicom_node.console.context import ConsoleContext

from .support.dicom_tools import PEER_ENV, require_tool
from .support.net import free_port

SVG = "{http://www.w3.org/2000/svg}"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("storescp exited")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError("storescp did not listen")


@pytest.fixture(scope="module")
def storescp():
    require_tool("storescp")
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", str(port)], env=PEER_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory, storescp):
    root = tmp_path_factory.mktemp("console-ops")
    (root / "node.toml").write_text("")
    closed = free_port()
    destinations = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": storescp,
         "alternate": {"ae_title": "BACKUP", "host": "127.0.0.1", "port": closed}},
        {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": closed, "types": ["sr"]},
    ]
    config = load_config(root / "node.toml", {"storage.storage_root": str(root), "export.timeout_seconds": "2",
                                              "export.destinations": json.dumps(destinations)}, environ={})
    engine = make_engine(config.database.url)
    init_schema(engine)
    ctx = ConsoleContext(config=config, engine=engine, archive=Archive(root, 0))
    from dicom_node.console.app import build_app

    with TestClient(build_app(ctx), follow_redirects=False) as client:
        yield {"client": client, "engine": engine, "root": root, "ctx": ctx}


def csrf(client: TestClient, page: str = "/destinations") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(page).text)
    assert match, "the page has no CSRF field"
    return match.group(1)


def events(engine, kind: str) -> list[tuple[str | None, str | None]]:
    with Session(engine) as session:
        return [(e.actor, e.detail) for e in session.scalars(select(Event).where(Event.kind == kind)
                                                             .order_by(Event.id))]


_uid = iter(range(1, 1_000_000))


def add_analysed(engine, *, received_ago: float, sr_after: float, sent_after: float | None, probability: float,
                 version: str = "0.1.0-demo", present: bool | None = None) -> int:
    """An instance received ``received_ago`` s ago, its done job, finding, SR and (optionally sent) SR export."""
    n = next(_uid)
    now = utcnow()
    received = now - timedelta(seconds=received_ago)
    with Session(engine) as session, session.begin():
        inst = Instance(sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                        study_instance_uid=f"1.2.4.{n}", series_instance_uid=f"1.2.5.{n}", calling_aet="MODALITY",
                        received_at=received, archive_path=f"archive/{n}.dcm", size_bytes=10, sha256="0" * 64,
                        transfer_syntax_uid="1.2.840.10008.1.2.1", in_scope=True, scope_reason="cxr")
        session.add(inst)
        session.flush()
        job = Job(instance_id=inst.id, state=JobState.DONE, created_at=received)
        session.add(job)
        session.flush()
        add_finding(session, job.id, inst.id, FindingValues(
            "pneumoconiosis-resnet34", version, "0" * 64, probability,
            probability >= 0.5 if present is None else present, 0.5, 1 if probability >= 0.5 else 0,
            [0.25] * 4, 0.2))
        result = Result(job_id=job.id, instance_id=inst.id, kind="sr", sop_instance_uid=f"1.2.6.{n}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", series_instance_uid=f"1.2.7.{n}",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", archive_path=f"results/{n}.dcm", size_bytes=5,
                        analysed=True, reason="analysed", created_at=received + timedelta(seconds=sr_after))
        session.add(result)
        session.flush()
        session.add(Export(result_id=result.id, destination="pacs",
                           state=ExportState.PENDING if sent_after is None else ExportState.SENT,
                           sent_at=None if sent_after is None else received + timedelta(seconds=sent_after)))
        return int(job.id)


# --- plots and their numbers ----------------------------------------------------------------------------------------


def parse_svg(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == SVG + "svg"
    assert root.find(SVG + "title").text and root.find(SVG + "desc").text
    return root


def test_the_plots_are_valid_svg_on_an_empty_database_and_count_what_was_stored(db_url):
    engine = make_engine(db_url)
    init_schema(engine)
    for svg in (plots.hourly_svg(engine), plots.latency_svg(engine), plots.probability_svg(engine)):
        parse_svg(svg)
    assert "No SR written" in plots.latency_svg(engine)
    assert "No findings recorded yet" in plots.probability_svg(engine)

    add_analysed(engine, received_ago=7200, sr_after=3, sent_after=8, probability=0.9)
    add_analysed(engine, received_ago=60, sr_after=40, sent_after=None, probability=0.1)
    add_analysed(engine, received_ago=30, sr_after=2, sent_after=None, probability=0.3, version="site-2<&>")
    counts = stats.hourly_counts(engine, 24)
    assert len(counts) == 24 and sum(c.received for c in counts) == 3 and sum(c.analysed for c in counts) == 3
    latencies = stats.sr_latencies(engine)
    assert sorted(round(v) for v in latencies.written) == [2, 3, 40] and [round(v) for v in latencies.sent] == [8]

    hourly = parse_svg(plots.hourly_svg(engine))
    bars = [r.find(SVG + "title").text for r in hourly.iter(SVG + "rect") if r.find(SVG + "title") is not None]
    assert len(bars) == 48 and any(b.startswith("received, ") and b.endswith(": 2") for b in bars)
    texts = " ".join(t.text or "" for t in hourly.iter(SVG + "text"))
    assert "UTC" in texts and "images" in texts
    latency = plots.latency_svg(engine)
    assert "written by the node" in latency and "acknowledged by the first destination" in latency
    parse_svg(latency)
    probability = parse_svg(plots.probability_svg(engine))  # the model name with <&> escaped: still valid XML
    headings = [t.text for t in probability.iter(SVG + "text") if t.get("font-weight") == "bold"]
    assert headings == ["pneumoconiosis-resnet34 0.1.0-demo: 2 findings",
                        "pneumoconiosis-resnet34 site-2<&>: 1 findings"]
    assert sum("threshold 0.5" == t.text for t in probability.iter(SVG + "text")) == 2


# --- pages ----------------------------------------------------------------------------------------------------------


def test_statistics_page_shows_the_three_plots(env):
    add_analysed(env["engine"], received_ago=100, sr_after=5, sent_after=9, probability=0.7)
    page = env["client"].get("/statistics?hours=48")
    assert page.status_code == 200
    for ident in ("plot-hourly-title", "plot-latency-title", "plot-probability-title"):
        assert f'id="{ident}"' in page.text
    assert "last 48 h" in page.text
    assert env["client"].get("/statistics?hours=junk").status_code == 200


def test_destinations_page_lists_destinations_with_export_counts(env):
    page = env["client"].get("/destinations")
    assert page.status_code == 200
    assert "PACS@127.0.0.1" in page.text and "BACKUP@127.0.0.1" in page.text and "DOWN@127.0.0.1" in page.text
    assert page.text.count('/echo"') == 2
    expected = stats.export_counts_by_destination(env["engine"])["pacs"]
    assert expected["sent"] >= 1
    row = re.search(r"<td><a href=\"/exports\?destination=pacs\">pacs</a></td>(.*?)</tr>", page.text, re.S)
    assert row is not None
    numbers = re.findall(r'<td class="num">(\d+)</td>', row.group(1))
    assert numbers == [str(expected[s]) for s in ("pending", "sending", "sent", "dead")]


def test_c_echo_succeeds_against_storescp_and_reports_a_closed_port_both_audited(env):
    client = env["client"]
    assert client.post("/destinations/pacs/echo", data={}).status_code == 403  # no CSRF token
    token = csrf(client)
    answer = client.post("/destinations/pacs/echo", data={"csrf_token": token})
    assert answer.status_code == 303 and answer.headers["location"] == "/destinations"
    page = client.get("/destinations").text
    assert "C-ECHO of pacs" in page and "success (status 0x0000)" in page
    assert "connection refused" in page  # the alternate: nothing listens there
    assert "Traceback" not in page and "Error" not in page
    assert "C-ECHO of" not in client.get("/destinations").text  # shown once

    client.post("/destinations/down/echo", data={"csrf_token": token})
    page = client.get("/destinations").text
    assert "C-ECHO of down" in page and "refused" in page and "success" not in page.split("C-ECHO of down")[1][:800]
    assert client.post("/destinations/nowhere/echo", data={"csrf_token": token}).status_code == 404

    audited = events(env["engine"], "echo_test")
    assert [a for a, _ in audited] == ["local:testclient", "local:testclient"]
    assert "peer PACS@127.0.0.1" in audited[0][1] and "success" in audited[0][1]
    assert "alternate BACKUP@" in audited[0][1] and "refused" in audited[0][1]
    assert "destination down" in audited[1][1] and "refused" in audited[1][1]


def test_associations_page_per_calling_ae_and_its_recent_associations(env):
    engine = env["engine"]
    now = utcnow()
    with Session(engine) as session, session.begin():
        session.add_all([
            AssociationRecord(calling_aet="CR_ROOM_1", called_aet="PNEUMOCAD", peer_address="10.0.0.5", tls=False,
                              accepted=True, outcome="released", stores_ok=3, stores_failed=1, started_at=now),
            AssociationRecord(calling_aet="CR_ROOM_1", called_aet="PNEUMOCAD", peer_address="10.0.0.6", tls=True,
                              accepted=True, outcome="aborted", stores_ok=1, started_at=now + timedelta(seconds=1)),
            AssociationRecord(calling_aet="INTRUDER", called_aet="PNEUMOCAD", peer_address="10.9.9.9", tls=False,
                              accepted=False, outcome="rejected: calling AE", started_at=now),
        ])
    page = env["client"].get("/associations")
    assert page.status_code == 200
    row = re.search(r"calling_aet=CR_ROOM_1\">CR_ROOM_1</a></td>(.*?)</tr>", page.text, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    assert [re.sub("<[^>]+>", "", c) for c in cells[:5]] == ["2", "0", "1", "4", "1"]
    assert "10.0.0.6" in row and cells[-1] == "1"
    assert "rejected: calling AE" in page.text
    one = env["client"].get("/associations?calling_aet=INTRUDER")
    assert one.status_code == 200 and "Recent associations of INTRUDER" in one.text
    recent = one.text.split("Recent associations of INTRUDER")[1]
    assert "10.9.9.9" in recent and "10.0.0.5" not in recent


def _add_models(env) -> dict[str, int]:
    engine, root = env["engine"], env["root"]
    run_dir = root / "training" / "run-1"
    run_dir.mkdir(parents=True)
    (run_dir / "holdout_roc.png").write_bytes(PNG)
    (run_dir / "reliability.png").write_bytes(PNG)
    (run_dir / "result.json").write_text("{}")
    (run_dir / "classifier.md").write_text("# Site model\n\n<script>alert(1)</script> trained on 40 images\n")
    (root / "secret.png").write_bytes(PNG)
    ensure_bundled_champion(engine, name="pneumoconiosis-resnet34", version="0.1.0-demo",
                            path="/opt/node/ai/models/classifier.pt", sha256="a" * 64, card_path=None,
                            threshold=0.49)
    with Session(engine) as session, session.begin():
        run = TrainingRun(state=RunState.SUCCEEDED, trigger="command", started_by="test", host="h", stage="done",
                          progress=1.0, config_json="{}", artifacts_dir="training/run-1")
        session.add(run)
        session.flush()
        ids = {}
        for version, passed in (("site-1", True), ("site-2", False)):
            ids[version] = register_candidate(
                session, name="pneumoconiosis-resnet34", version=version, path="training/run-1/classifier.pt",
                sha256="b" * 64, card_path="training/run-1/classifier.md", run_id=run.id, threshold=0.5,
                holdout_auc=0.91, holdout={"candidate": {"auc": 0.91, "auc_ci": [0.85, 0.96], "sensitivity": 0.84}},
                gate_passed=passed,
                gate={"passed": passed, "delta_auc": 0.02, "reasons": [] if passed else ["AUC below the champion"]})
    return ids


def test_models_pages_figures_card_and_promote_rollback_through_the_forms(env):
    client, engine = env["client"], env["engine"]
    ids = _add_models(env)
    listing = client.get("/models")
    assert listing.status_code == 200
    assert 'class="model-champion" aria-current="true"' in listing.text and "site-1" in listing.text
    page = client.get(f"/models/{ids['site-1']}")
    assert page.status_code == 200
    assert "candidate.auc_ci" in page.text and "0.85, 0.96" in page.text and "delta_auc" in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; trained on 40 images" in page.text
    assert f'/models/{ids["site-1"]}/figure/holdout_roc.png' in page.text and "reliability.png" in page.text
    assert 'name="force"' not in page.text  # gate passed: nothing to force
    figure = client.get(f"/models/{ids['site-1']}/figure/holdout_roc.png")
    assert figure.status_code == 200 and figure.content == PNG and figure.headers["content-type"] == "image/png"
    for bad in ("result.json", "..%2Fsecret.png", "../secret.png", "%2E%2E%2Fsecret.png", "..%2F..%2Fnode.sqlite",
                "missing.png", "%2Fetc%2Fpasswd"):
        assert client.get(f"/models/{ids['site-1']}/figure/{bad}").status_code == 404, bad
    assert client.get("/models/9999").status_code == 404
    assert client.get("/models/9999/figure/holdout_roc.png").status_code == 404

    token = csrf(client)
    assert client.post(f"/models/{ids['site-1']}/promote", data={"reason": "x"}).status_code == 403
    done = client.post(f"/models/{ids['site-1']}/promote", data={"csrf_token": token, "reason": "better AUC"})
    assert done.status_code == 303
    assert "is the champion now" in client.get(done.headers["location"]).text
    states = {m.version: m.state for m in list_models(engine)}
    assert states["site-1"] == "champion" and states["0.1.0-demo"] == "retired"

    failed = client.get(f"/models/{ids['site-2']}")
    assert 'name="force"' in failed.text and "AUC below the champion" in failed.text
    client.post(f"/models/{ids['site-2']}/promote", data={"csrf_token": token, "reason": ""})
    refused = client.get(f"/models/{ids['site-2']}").text
    assert "Not promoted" in refused and "did not pass the champion gate" in refused
    client.post(f"/models/{ids['site-2']}/promote", data={"csrf_token": token, "force": "on"})
    assert "a forced promotion needs a reason" in client.get(f"/models/{ids['site-2']}").text
    client.post(f"/models/{ids['site-2']}/promote", data={"csrf_token": token, "force": "on", "reason": "trial"})
    assert {m.version: m.state for m in list_models(engine)}["site-2"] == "champion"

    assert client.post("/models/rollback", data={}).status_code == 403
    back = client.post("/models/rollback", data={"csrf_token": token, "reason": "too many false positives"})
    assert back.status_code == 303 and "champion again" in client.get("/models").text
    assert {m.version: m.state for m in list_models(engine)}["site-1"] == "champion"

    audited = events(engine, "model_promote") + events(engine, "model_rollback")
    assert {a for a, _ in audited} == {"local:testclient"}
    details = [d for _, d in audited]
    assert any("site-1 promoted: better AUC" in d for d in details)
    assert any("refused" in d and "champion gate" in d for d in details)
    assert any("site-2 promoted (forced): trial" in d for d in details)
    assert any("rolled back to model" in d and "site-1" in d for d in details)
    registry_events = [json.loads(d) for _, d in events(engine, "model_promoted")]
    assert {e["user"] for e in registry_events} == {"local:testclient"}


def test_disagreements_page_with_agreement_rates_model_filter_and_paging(env):
    engine = env["engine"]
    jobs = [add_analysed(engine, received_ago=50, sr_after=1, sent_after=None, probability=p, version=v)
            for p, v in ((0.9, "agree-v1"), (0.8, "agree-v1"), (0.2, "agree-v1"), (0.9, "agree-v2"))]
    feedback.add_feedback(engine, job_id=jobs[0], reader="Dr A", action="accept", read_date=date(2024, 5, 1))
    feedback.add_feedback(engine, job_id=jobs[1], reader="Dr A", action="reject", read_date=date(2024, 5, 1))
    feedback.add_feedback(engine, job_id=jobs[2], reader="Dr B", action="reading",
                          reading=feedback.Reading(present=True, category=2), read_date=date(2024, 5, 2))
    feedback.add_feedback(engine, job_id=jobs[3], reader="Dr B", action="reject", read_date=date(2024, 5, 2))
    page = env["client"].get("/disagreements")
    assert page.status_code == 200
    row = re.search(r"agree-v1</a></td>(.*?)</tr>", page.text, re.S).group(1)
    assert re.findall(r'<td class="num">([^<]+)</td>', row) == ["3", "1", "33.3 %", "1", "33.3 %"]
    for job in jobs[1:]:
        assert f'href="/jobs/{job}"' in page.text
    assert f'href="/jobs/{jobs[0]}"' not in page.text
    only = env["client"].get("/disagreements?model=pneumoconiosis-resnet34+agree-v2").text
    table = only.split('class="disagreements"')[1]
    assert f'/jobs/{jobs[3]}"' in table and f'/jobs/{jobs[1]}"' not in table
    first = env["client"].get("/disagreements?per_page=1").text
    assert 'rel="next"' in first and f'/jobs/{jobs[3]}"' in first.split('class="disagreements"')[1]
    second = env["client"].get("/disagreements?per_page=1&page=2").text
    assert 'rel="prev"' in second and f'/jobs/{jobs[2]}"' in second.split('class="disagreements"')[1]


def test_c_echo_of_a_tls_destination_verifies_the_pacs_certificate(tmp_path):
    """storescp +tls with a certificate of the site CA answers; one of another CA is refused, with the reason."""
    from .support.certs import make_certificates

    require_tool("storescp")
    certs = make_certificates(tmp_path / "certs")
    procs, destinations = [], []
    try:
        for name, pair in (("tls-pacs", certs.pacs), ("impostor", certs.wrong_pacs)):
            port = free_port()
            procs.append(subprocess.Popen(
                ["storescp", "-aet", "PACS", "+tls", str(pair.key), str(pair.cert), "+cf", str(certs.ca.cert),
                 str(port)], env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_listening(port, procs[-1])
            destinations.append({"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True})
        (tmp_path / "node.toml").write_text("")
        config = load_config(tmp_path / "node.toml", {
            "storage.storage_root": str(tmp_path), "export.timeout_seconds": "3",
            "export.destinations": json.dumps(destinations), "tls.certificate": str(certs.node.cert),
            "tls.private_key": str(certs.node.key), "tls.ca_bundle": str(certs.ca.cert)}, environ={})
        engine = make_engine(config.database.url)
        init_schema(engine)
        from dicom_node.console.app import build_app

        app = build_app(ConsoleContext(config=config, engine=engine, archive=Archive(tmp_path, 0)))
        with TestClient(app, follow_redirects=True) as client:
            token = csrf(client)
            good = client.post("/destinations/tls-pacs/echo", data={"csrf_token": token}).text
            assert "C-ECHO of tls-pacs" in good and "success (status 0x0000)" in good
            bad = client.post("/destinations/impostor/echo", data={"csrf_token": token}).text
            assert "C-ECHO of impostor" in bad and "TLS handshake failed (CERTIFICATE_VERIFY_FAILED" in bad
        audited = [d for _, d in events(engine, "echo_test")]
        assert "success" in audited[0] and "TLS handshake failed" in audited[1]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
