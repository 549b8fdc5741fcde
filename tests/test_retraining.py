"""Retraining as a node job, end to end on real films: receive, label, retrain, register; the frozen hold-out;
artifacts without patient data; kill -9 of a run; the intake answering while a training runs.

A tiny configuration (16 films, 2 folds, 1 epoch, 64 px) keeps each run to seconds; the films are the public
lung-mask radiographs as CR files of synthetic patients (``tests/support/cxr_dicom.py``), whose tuberculosis labels
stand in for "pneumoconiosis present".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ModelState, RegisteredModel, RunState, SplitAssignment, SplitPart, TrainingRun

from .support.cxr_dicom import Film, labels_csv, lung_mask_films
from .support.data import CONFIG, DATA_DIR, REPO
from .support.dicom_tools import PEER_ENV
from .support.net import free_port
from .support.node import Node, open_db

TINY = ["--set", "training.folds=2", "--set", "training.epochs=1", "--set", "training.size=64",
        "--set", "training.batch_size=8", "--set", "training.threads=1", "--set", "training.device=cpu"]


def _send(node: Node, folder: Path) -> None:
    sent = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port),
                           "+sd", str(folder)], env=PEER_ENV, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr[-2000:]


NESTED = {"labels", "models"}  # their sub-subcommand comes before --config and --set


def _cli(node: Node, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    words = 2 if args[0] in NESTED else 1
    cmd = node.args(args[0])
    cmd[4:4] = list(args[1:words])  # after [python, -m, dicom_node.cli, command]
    return subprocess.run(cmd + list(args[words:]), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _import_labels(node: Node, films: list[Film], path: Path) -> None:
    done = _cli(node, "labels", "import", str(labels_csv(films, path)))
    assert done.returncode == 0, done.stdout + done.stderr


def _runs(node: Node) -> list[TrainingRun]:
    with Session(open_db(node)) as session:
        return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id)))


def _sides(node: Node) -> dict[str, SplitPart]:
    with Session(open_db(node)) as session:
        return {row.patient_key: row.part for row in session.scalars(select(SplitAssignment))}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A node that received 16 labelled films and ran one retraining."""
    root = tmp_path_factory.mktemp("site")
    films = lung_mask_films(DATA_DIR / "cxr-lung-masks", root / "films", per_class=8, tag="site")
    node = Node(root, free_port()).start()
    try:
        _send(node, root / "films")
        _import_labels(node, films, root / "labels.csv")
        first = _cli(node, "retrain", *TINY)
        assert first.returncode == 0, first.stdout + first.stderr
        yield node, films
    finally:
        node.stop()


def test_retrain_registers_a_candidate_with_hold_out_metrics_gate_and_card(site):
    node, _films = site
    run = _runs(node)[0]
    assert run.state is RunState.SUCCEEDED and run.model_id is not None and run.progress == 1.0
    with Session(open_db(node)) as session:
        model = session.get(RegisteredModel, run.model_id)
        assert model is not None and model.state is ModelState.CANDIDATE and model.run_id == run.id
        assert model.version == f"site-{run.id}" and model.holdout_auc is not None and model.gate_passed is not None
        path = node.storage_root / model.path
        assert path.is_file() and model.card_path and (node.storage_root / model.card_path).is_file()
    card = (node.storage_root / model.card_path).read_text()
    assert "not validated for clinical use" in card
    assert "2026-11-30 to 2026-11-30" in card, "the card names the read dates of the labels"
    listed = [json.loads(line) for line in _cli(node, "models", "list", "--json").stdout.splitlines()]
    assert any(m["id"] == model.id and m["state"] == "candidate" for m in listed)
    status = _cli(node, "status").stdout
    assert f"last run #{run.id} succeeded" in status and "labelled" in status


def test_artifacts_of_a_run_carry_no_planted_patient_data(site):
    node, films = site
    run = _runs(node)[0]
    artifacts = node.storage_root / run.artifacts_dir
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".png" for p in files)
    planted = [v for f in films for v in (f.patient_id, f.patient_name, f.patient_name.replace("^", " "),
                                          f.birth_date, f.accession_number, f.source_file)]
    for path in files:
        data = path.read_bytes()
        found = [v for v in planted if v.encode() in data]
        assert not found, f"{path.relative_to(artifacts)} contains patient data: {found[:3]}"
    assert not list((node.storage_root / "training").glob("*.manifest.json")), "the input manifest was left behind"


def test_the_hold_out_is_frozen_across_retrainings_and_never_trained_on(site, tmp_path):
    node, _films = site
    before = _sides(node)
    held = {k for k, side in before.items() if side is SplitPart.HOLDOUT}
    assert held and len(held) < len(before)
    more = lung_mask_films(DATA_DIR / "cxr-lung-masks", tmp_path / "more", per_class=3, from_end=True,
                           tag="more")
    _send(node, tmp_path / "more")
    _import_labels(node, more, tmp_path / "more.csv")
    second = _cli(node, "retrain", *TINY)
    assert second.returncode == 0, second.stdout + second.stderr
    after = _sides(node)
    assert all(after[k] is side for k, side in before.items()), "a patient changed sides"
    assert len(after) == len(before) + len(more)
    run = _runs(node)[-1]
    manifest = json.loads((node.storage_root / run.artifacts_dir / "manifest.json").read_text())
    trained = {item["patient_key"] for item in manifest["training"]}
    tested = {item["patient_key"] for item in manifest["holdout"]}
    holdout_now = {k for k, side in after.items() if side is SplitPart.HOLDOUT}
    assert trained and not trained & holdout_now
    assert tested == holdout_now and held <= tested


def test_a_dry_run_records_nothing(site):
    node, _films = site
    runs, sides = len(_runs(node)), _sides(node)
    dry = _cli(node, "retrain", "--dry-run", *TINY)
    assert dry.returncode == 0, dry.stderr
    assert "training :" in dry.stdout and "hold-out :" in dry.stdout and "nothing recorded" in dry.stdout
    assert len(_runs(node)) == runs and _sides(node) == sides


def test_too_few_labels_is_a_clear_refusal(tmp_path):
    node = Node(tmp_path, free_port())
    refused = _cli(node, "retrain", *TINY)
    assert refused.returncode == 1
    assert "cannot retrain" in refused.stderr and "label more images" in refused.stderr
    assert "Traceback" not in refused.stderr


def _wait_for_training_child(node: Node, proc: subprocess.Popen, timeout: float = 120) -> TrainingRun:
    """The running run once its training process computes (past the start), while ``proc`` still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "retrain ended before it could be observed"
        runs = [r for r in _runs(node) if r.state is RunState.RUNNING]
        if runs and runs[0].stage not in ("starting",):
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("no running training run observed")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: no procps needed)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            children.append(int(stat.parent.name))
    return children


def test_a_scheduled_run_shows_in_status_the_intake_answers_meanwhile_and_kill_9_registers_nothing(site, tmp_path):
    """One training run serves several checks (a run costs tens of seconds): the schedule waits for enough new
    labels and starts a run of its own; ``status`` shows its stage; C-STOREs are answered while it computes; killed
    with SIGKILL, its training process dies with it, the next command marks the run failed, and no model exists."""
    from dicom_node import retraining

    node, _films = site
    engine = open_db(node)
    args = node.args("retrain")
    sets = [value for flag, value in pairwise(args) if flag == "--set"] + TINY[1::2] + ["training.epochs=6"]
    assert not retraining.scheduled_retrain(engine, node.storage_root, CONFIG, sets, min_new_labels=1000)
    before = len(_runs(node))
    assert retraining.scheduled_retrain(engine, node.storage_root, CONFIG, sets, min_new_labels=0)
    proc = retraining._scheduled[-1]
    try:
        run = _wait_for_training_child(node, proc)
        assert run.trigger == "schedule" and len(_runs(node)) == before + 1
        status = _cli(node, "status").stdout
        assert f"run #{run.id} running" in status and "(schedule)" in status and " %" in status
        assert not retraining.scheduled_retrain(engine, node.storage_root, CONFIG, sets, min_new_labels=0)

        during = lung_mask_films(DATA_DIR / "cxr-lung-masks", tmp_path / "during", limit=3, from_end=True,
                                 tag="during")
        started = time.monotonic()
        _send(node, tmp_path / "during")
        seconds = time.monotonic() - started
        assert seconds < 20 and len(during) == 3, f"3 C-STOREs took {seconds:.1f} s during training"

        children = _children(proc.pid)
        assert children and proc.poll() is None, "the training runs in a process of its own"
        os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only: its training process must follow
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{c}").exists() and "zombie" not in Path(f"/proc/{c}/status").read_text()
                  for c in children):
            assert time.monotonic() < deadline, "the training process outlived its parent"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert next(r for r in _runs(node) if r.id == run.id).state is RunState.RUNNING  # nobody noticed yet
    noticed = _cli(node, "retrain", "--dry-run", *TINY)
    assert noticed.returncode == 0, noticed.stderr
    dead = next(r for r in _runs(node) if r.id == run.id)
    assert dead.state is RunState.FAILED and dead.model_id is None and "ended without finishing" in dead.error
    with Session(open_db(node)) as session:
        assert session.scalars(select(RegisteredModel).where(RegisteredModel.run_id == run.id)).first() is None


def test_serve_schedules_the_training_at_its_cron_expression(tmp_path):
    node = Node(tmp_path, free_port(), overrides={"training.schedule": "0 3 * * 6"}).start()
    try:
        assert "training at '0 3 * * 6'" in node.log()
    finally:
        node.stop()
