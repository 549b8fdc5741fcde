"""The model registry (``db.registry``), its command line (``dicom-node models``) and the workers' hot switch to
a newly promoted champion (``dicom_node.champion``).

A real SQLite database per test; the CLI through its real parser and ``run`` (and once as a subprocess); the
worker with the real analysis on a real chest, and a "site model" that is a real classifier file written with
``ai.checkpoint.save`` (the bundled weights under another version, card and notice).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import init_schema, make_engine
from db.models import Event, ModelState, RegisteredModel
from db.registry import (
    BUNDLED_REGISTERED_EVENT,
    BUNDLED_UPDATED_EVENT,
    PROMOTED_EVENT,
    ROLLED_BACK_EVENT,
    UNUSABLE_EVENT,
    RegistryError,
    champion,
    ensure_bundled_champion,
    get_model,
    list_models,
    promote,
    register_candidate,
    rollback,
)
from dicom_node import cli_models
from dicom_node.archive import sha256_of
from dicom_node.champion import register_installed
from dicom_node.cli import build_parser
from dicom_node.runtime import Runtime

from .support.data import CONFIG, REPO
from .support.sr_tree import sr_text
from .test_worker import chest_copies, make_env

USER = getpass.getuser()
SHA_A, SHA_B = "a" * 64, "b" * 64
SITE_NOTICE = "SITE 3 model trained on this site's archive; not validated for clinical use until its acceptance."
ALGORITHM_NAME, ALGORITHM_VERSION = "111001", "111003"  # DCM codes of TID 4019


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}")
    init_schema(engine)
    return engine


def add_bundled(engine, sha256: str = SHA_A, version: str = "0.1.0-demo"):
    return ensure_bundled_champion(engine, name="pneumoconiosis-resnet34", version=version,
                                   path="/opt/node/ai/models/classifier.pt", sha256=sha256,
                                   card_path="/opt/node/ai/models/classifier.md", threshold=0.49)


def add_candidate(engine, version: str, gate_passed: bool | None = True, sha256: str = SHA_B,
                  path: str | None = None, reasons: tuple[str, ...] = ()) -> int:
    with Session(engine) as session, session.begin():
        return register_candidate(
            session, name="pneumoconiosis-resnet34", version=version,
            path=path or f"training/{version}/classifier.pt", sha256=sha256,
            card_path=f"training/{version}/classifier.md", run_id=None, threshold=0.5, holdout_auc=0.91,
            holdout={"auc": 0.91, "auc_ci": [0.85, 0.96], "sensitivity": 0.84, "specificity": 0.86},
            gate_passed=gate_passed,
            gate={"delta_auc": 0.02, "delta_auc_ci": [-0.01, 0.05], "p_value": 0.3, "reasons": list(reasons)})


def states(engine) -> dict[int, str]:
    return {m.id: m.state for m in list_models(engine)}


def events(engine, kind: str) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.scalars(select(Event.detail).where(Event.kind == kind).order_by(Event.id)).all()
    return [json.loads(r) for r in rows]


# --- the bundled champion ---------------------------------------------------------------------------------------


def test_a_new_registry_gets_the_installed_classifier_as_its_bundled_champion_once(engine):
    first = add_bundled(engine)
    assert first is not None
    assert (first.state, first.bundled, first.version, first.sha256) == ("champion", True, "0.1.0-demo", SHA_A)
    assert first.promoted_at is not None and first.path == "/opt/node/ai/models/classifier.pt"
    again = add_bundled(engine)
    assert again == first
    assert [m.id for m in list_models(engine)] == [first.id]
    assert champion(engine) == first
    assert len(events(engine, BUNDLED_REGISTERED_EVENT)) == 1


def test_an_updated_installed_file_updates_the_bundled_entry_in_place(engine):
    first = add_bundled(engine)
    updated = add_bundled(engine, sha256="c" * 64, version="0.2.0-demo")
    assert updated is not None and first is not None
    assert (updated.id, updated.version, updated.sha256, updated.state) == (first.id, "0.2.0-demo", "c" * 64,
                                                                            "champion")
    assert len(list_models(engine)) == 1
    [detail] = events(engine, BUNDLED_UPDATED_EVENT)
    assert (detail["old_version"], detail["version"]) == ("0.1.0-demo", "0.2.0-demo")


def test_no_bundled_entry_is_added_beside_a_site_champion(engine):
    site = add_candidate(engine, "site-1")
    promote(engine, site, user=USER, reason="first site model")
    assert add_bundled(engine) is None
    assert states(engine) == {site: "champion"}


def test_a_candidate_is_registered_inside_the_callers_transaction(engine):
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        register_candidate(session, name="n", version="v", path="training/1/classifier.pt", sha256=SHA_B,
                           card_path=None, run_id=None, threshold=0.5, holdout_auc=None, holdout={},
                           gate_passed=None, gate={})
        raise RuntimeError("the training run's finishing step failed")
    assert list_models(engine) == []
    model_id = add_candidate(engine, "site-1")
    entry = get_model(engine, model_id)
    assert entry is not None and entry.state == "candidate" and not entry.bundled
    assert entry.holdout == {"auc": 0.91, "auc_ci": [0.85, 0.96], "sensitivity": 0.84, "specificity": 0.86}
    assert entry.gate is not None and entry.gate["delta_auc_ci"] == [-0.01, 0.05]


@pytest.mark.parametrize("path, sha256, message", [
    ("/abs/classifier.pt", SHA_B, "relative to the storage root"),
    ("training/../../etc/classifier.pt", SHA_B, "stay below it"),
    ("training/1/classifier.pt", "XYZ", "64 lower-case hexadecimal"),
])
def test_a_candidate_outside_the_storage_root_or_without_a_digest_is_refused(engine, path, sha256, message):
    with pytest.raises(RegistryError, match=message):
        add_candidate(engine, "bad", path=path, sha256=sha256)
    assert list_models(engine) == []


# --- promote, rollback ----------------------------------------------------------------------------------------


def test_promotion_retires_the_champion_records_it_and_audits_who_and_why(engine):
    demo = add_bundled(engine)
    assert demo is not None
    site = add_candidate(engine, "site-1")
    new = promote(engine, site, user=USER, reason="better on the hold-out")
    assert (new.id, new.state, new.replaced_model_id) == (site, "champion", demo.id)
    assert new.promoted_at is not None and new.retired_at is None
    assert states(engine) == {demo.id: "retired", site: "champion"}
    old = get_model(engine, demo.id)
    assert old is not None and old.retired_at is not None
    [detail] = events(engine, PROMOTED_EVENT)
    assert detail == {"model_id": site, "name": "pneumoconiosis-resnet34", "version": "site-1", "gate_passed": True,
                      "forced": False, "user": USER, "reason": "better on the hold-out",
                      "replaced_model_id": demo.id, "replaced_version": "0.1.0-demo"}


def test_rollback_brings_back_the_replaced_champion_step_by_step_and_then_refuses(engine):
    demo = add_bundled(engine)
    assert demo is not None
    one, two = add_candidate(engine, "site-1"), add_candidate(engine, "site-2")
    promote(engine, one, user=USER, reason=None)
    promote(engine, two, user=USER, reason=None)
    back = rollback(engine, user=USER, reason="site-2 misses small opacities")
    assert (back.id, back.state) == (one, "champion")
    assert states(engine) == {demo.id: "retired", one: "champion", two: "retired"}
    assert rollback(engine, user=USER, reason=None).id == demo.id
    assert states(engine) == {demo.id: "champion", one: "retired", two: "retired"}
    details = events(engine, ROLLED_BACK_EVENT)
    assert [(d["model_id"], d["retired_model_id"], d["user"]) for d in details] == [(one, two, USER),
                                                                                   (demo.id, one, USER)]
    assert details[0]["reason"] == "site-2 misses small opacities" and details[1]["reason"] is None
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(engine, user=USER, reason=None)
    assert champion(engine) is not None and champion(engine).id == demo.id  # type: ignore[union-attr]


def test_rollback_without_any_champion_says_so(engine):
    with pytest.raises(RegistryError, match="no champion to roll back"):
        rollback(engine, user=USER, reason=None)


def test_refused_promotions_change_nothing(engine):
    demo = add_bundled(engine)
    assert demo is not None
    failed = add_candidate(engine, "failed", gate_passed=False,
                           reasons=("sensitivity 0.61 below the floor 0.80", "AUC worse than the champion"))
    unevaluated = add_candidate(engine, "unevaluated", gate_passed=None)
    retired = add_candidate(engine, "retired")
    promote(engine, retired, user=USER, reason=None)
    rollback(engine, user=USER, reason=None)
    before = states(engine)
    promoted_events = len(events(engine, PROMOTED_EVENT))
    refusals = [
        (lambda: promote(engine, 999, user=USER, reason=None), "there is no model #999"),
        (lambda: promote(engine, demo.id, user=USER, reason=None), "is champion: only a candidate"),
        (lambda: promote(engine, retired, user=USER, reason=None), "is retired: only a candidate"),
        (lambda: promote(engine, failed, user=USER, reason=None),
         r"did not pass the champion gate \(sensitivity 0.61 below the floor 0.80; AUC worse than the champion\)"),
        (lambda: promote(engine, unevaluated, user=USER, reason=None), "has no champion gate result"),
        (lambda: promote(engine, failed, user=USER, reason=None, force=True), "needs a reason"),
        (lambda: promote(engine, failed, user=USER, reason="   ", force=True), "needs a reason"),
    ]
    for attempt, message in refusals:
        with pytest.raises(RegistryError, match=message):
            attempt()
    assert states(engine) == before
    assert len(events(engine, PROMOTED_EVENT)) == promoted_events


def test_a_forced_promotion_needs_and_records_its_reason(engine):
    add_bundled(engine)
    failed = add_candidate(engine, "failed", gate_passed=False)
    new = promote(engine, failed, user=USER, reason="reader study accepted it", force=True)
    assert new.state == "champion"
    detail = events(engine, PROMOTED_EVENT)[-1]
    assert (detail["forced"], detail["reason"], detail["user"], detail["gate_passed"]) == (
        True, "reader study accepted it", USER, False)


def test_a_registry_that_somehow_holds_two_champions_is_not_changed_further(engine):
    demo = add_bundled(engine)
    assert demo is not None
    other, candidate = add_candidate(engine, "other"), add_candidate(engine, "candidate")
    with Session(engine) as session, session.begin():  # what no registry function does: a second champion
        session.get(RegisteredModel, other).state = ModelState.CHAMPION  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="holds 2 champions"):
        promote(engine, candidate, user=USER, reason=None)
    with pytest.raises(RegistryError, match="holds 2 champions"):
        rollback(engine, user=USER, reason=None)
    assert states(engine) == {demo.id: "champion", other: "champion", candidate: "candidate"}


def promote_racing(url: str, model_id: int, barrier: threading.Barrier, errors: list[BaseException]) -> None:
    """One promotion on its own engine, started together with the others at ``barrier``."""
    own = make_engine(url)
    try:
        barrier.wait()
        promote(own, model_id, user=USER, reason="race")
    except BaseException as exc:  # collected: the test fails on any
        errors.append(exc)
    finally:
        own.dispose()


def test_concurrent_promotions_from_separate_connections_leave_exactly_one_champion(tmp_path):
    """Each thread has its own engine (as two ``dicom-node models promote`` processes would): the promotions are
    serialised, so the later one replaces the earlier one and never the same old champion twice."""
    url = f"sqlite:///{tmp_path / 'node.sqlite'}"
    setup = make_engine(url)
    init_schema(setup)
    for round_number in range(3):
        ids = [add_candidate(setup, f"r{round_number}-{i}") for i in range(4)]
        barrier = threading.Barrier(len(ids))
        errors: list[BaseException] = []
        threads = [threading.Thread(target=promote_racing, args=(url, i, barrier, errors)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        models = {m.id: m for m in list_models(setup)}
        champions = [m for m in models.values() if m.state == "champion"]
        assert len(champions) == 1 and champions[0].id in ids
        # the promotions form one chain: every promoted model replaced a different predecessor
        replaced = [models[i].replaced_model_id for i in ids]
        assert len(set(replaced)) == len(ids)
        chain, current = [], champions[0]
        while current.replaced_model_id in ids:
            chain.append(current.id)
            current = models[current.replaced_model_id]  # type: ignore[index]
        assert sorted(chain + [current.id]) == sorted(ids)


# --- the command line -----------------------------------------------------------------------------------------


def runtime_of(env) -> Runtime:
    return Runtime(env.config, env.archive, env.engine)


def models_cli(rt: Runtime, *argv: str) -> int:
    """``dicom-node models ...`` through the real parser and the module's ``run`` (in this process)."""
    args = build_parser().parse_args(["models", *argv])
    return cli_models.run(rt, args)


def site_model(root: Path, version: str, notice: str = SITE_NOTICE) -> tuple[str, str]:
    """A real classifier file under the storage root (the bundled weights, another version, card and notice);
    returns its path relative to the root and its sha256."""
    from ai import checkpoint
    from ai.models import BUNDLED_DIR, CLASSIFIER

    bundled = checkpoint.load(BUNDLED_DIR / CLASSIFIER, checkpoint.CLASSIFIER_FIELDS)
    relative = f"training/run-{version}/classifier.pt"
    checkpoint.save(root / relative, bundled.state_dict,
                    {**bundled.fields, "version": version, "model_card": f"{version}.md", "notice": notice,
                     "trained_on": f"{version}: labelled radiographs of this site's archive"},
                    checkpoint.CLASSIFIER_FIELDS)
    (root / relative).with_name(f"{version}.md").write_text(f"# {version}\n")
    return relative, sha256_of(root / relative)


def add_site_candidate(env, version: str, gate_passed: bool | None = True, sha256: str | None = None) -> int:
    relative, digest = site_model(env.root, version)
    with Session(env.engine) as session, session.begin():
        return register_candidate(
            session, name="pneumoconiosis-resnet34", version=version, path=relative, sha256=sha256 or digest,
            card_path=str(Path(relative).with_name(f"{version}.md")), run_id=None, threshold=0.49,
            holdout_auc=0.912, holdout={"auc": 0.912, "sensitivity": 0.85, "specificity": 0.83},
            gate_passed=gate_passed,
            gate={"passed": gate_passed, "delta_auc": 0.03, "reasons": [] if gate_passed else
                  ["specificity 0.70 below the floor 0.80"]})


def test_models_list_and_show_print_one_json_object_per_line_with_metrics_gate_and_card(
        tmp_path, capsys, with_classifier):
    env = make_env(tmp_path / "var")
    rt = runtime_of(env)
    site = add_site_candidate(env, "site-3", gate_passed=False)
    assert models_cli(rt, "list", "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    objects = [json.loads(line) for line in lines]
    # the candidate registered before any command ran; the first command registered the installed demo too
    assert [(o["id"], o["state"], o["bundled"]) for o in objects] == [(site, "candidate", False),
                                                                     (site + 1, "champion", True)]
    for o in objects:
        assert {"id", "name", "version", "state", "holdout_auc", "sha256", "gate_passed", "created_at",
                "promoted_at"} <= o.keys()
    demo = objects[1]
    assert demo["version"] == "0.1.0-demo" and demo["path"] == str((REPO / "ai/models/classifier.pt").resolve())
    assert Path(demo["card_path"]).name == "classifier.md" and Path(demo["card_path"]).is_file()
    assert models_cli(rt, "show", str(site), "--json") == 0
    [line] = capsys.readouterr().out.splitlines()
    shown = json.loads(line)
    assert (shown["holdout_auc"], shown["holdout"]["sensitivity"]) == (0.912, 0.85)
    assert shown["gate"]["reasons"] == ["specificity 0.70 below the floor 0.80"] and shown["gate_passed"] is False
    assert shown["card_path"] == "training/run-site-3/site-3.md"
    assert models_cli(rt, "show", str(site)) == 0
    text = capsys.readouterr().out
    for expected in ("state        : candidate", "hold-out AUC : 0.912", "gate         : failed",
                     f"model card   : {env.root / 'training/run-site-3/site-3.md'}", "  sensitivity: 0.85",
                     "champion gate:", "  reasons:", "    1. specificity 0.70 below the floor 0.80"):
        assert expected in text, expected
    assert models_cli(rt, "show", "77") == 1
    assert "there is no model #77" in capsys.readouterr().err


def test_models_promote_force_needs_a_reason_and_the_audit_names_the_os_user(tmp_path, capsys, with_classifier):
    env = make_env(tmp_path / "var")
    rt = runtime_of(env)
    site = add_site_candidate(env, "site-3", gate_passed=False)
    assert models_cli(rt, "promote", str(site), "--force") == 2
    assert "--force needs --reason" in capsys.readouterr().err
    assert models_cli(rt, "promote", str(site)) == 1
    err = capsys.readouterr().err
    assert "did not pass the champion gate (specificity 0.70 below the floor 0.80)" in err
    assert "--force --reason" in err
    assert states(env.engine)[site] == "candidate" and events(env.engine, PROMOTED_EVENT) == []
    assert models_cli(rt, "promote", str(site), "--force", "--reason", "accepted after a reader study") == 0
    assert "is the champion, replacing" in capsys.readouterr().out
    [detail] = events(env.engine, PROMOTED_EVENT)
    assert (detail["user"], detail["forced"], detail["reason"]) == (USER, True, "accepted after a reader study")
    assert cli_models.status_lines(rt) == [
        f"champion     : #{site} pneumoconiosis-resnet34 site-3 (hold-out AUC 0.912)", "candidates   : 0"]
    assert models_cli(rt, "rollback", "--reason", "too many false positives") == 0
    assert "0.1.0-demo is the champion again" in capsys.readouterr().out
    [back] = events(env.engine, ROLLED_BACK_EVENT)
    assert (back["user"], back["reason"], back["retired_model_id"]) == (USER, "too many false positives", site)
    assert models_cli(rt, "rollback") == 1
    assert "nothing to roll back to" in capsys.readouterr().err


def test_models_promote_refuses_a_candidate_whose_file_is_missing_or_altered(tmp_path, capsys, with_classifier):
    env = make_env(tmp_path / "var")
    rt = runtime_of(env)
    altered = add_site_candidate(env, "altered", sha256="d" * 64)
    missing = add_site_candidate(env, "missing")
    (env.root / "training/run-missing/classifier.pt").unlink()
    assert models_cli(rt, "promote", str(altered)) == 1
    assert "does not match the registered sha256" in capsys.readouterr().err
    assert models_cli(rt, "promote", str(missing)) == 1
    assert "is missing" in capsys.readouterr().err
    assert [m.state for m in list_models(env.engine)] == ["candidate", "candidate", "champion"]


def test_dicom_node_models_list_json_and_status_as_commands(tmp_path):
    root = tmp_path / "var"
    sets = ["--config", str(CONFIG), "--set", f"storage.storage_root={root}",
            "--set", "storage.free_disk_reserve_mb=0"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    listed = subprocess.run([sys.executable, "-m", "dicom_node.cli", "models", "list", "--json", *sets],
                            capture_output=True, text=True, timeout=120, env=environment, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    demo = json.loads(line)
    assert (demo["id"], demo["state"], demo["bundled"], demo["version"]) == (1, "champion", True, "0.1.0-demo")
    status = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", *sets], capture_output=True,
                            text=True, timeout=120, env=environment, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert "champion     : #1 pneumoconiosis-resnet34 0.1.0-demo (bundled demo model, no hold-out AUC)" \
        in status.stdout.splitlines()
    assert "candidates   : 0" in status.stdout.splitlines()


# --- the worker switches between batches ----------------------------------------------------------------------


def sr_of(env, job_id: int):
    [row] = env.results(job_id=job_id, kind="sr")
    return dcmread(env.root / row.archive_path)


def test_a_running_worker_switches_to_a_newly_promoted_champion_at_its_next_batch(
        tmp_path, caplog, with_classifier):
    from ai import checkpoint
    from ai.models import BUNDLED_DIR, CLASSIFIER

    demo = checkpoint.load(BUNDLED_DIR / CLASSIFIER).info()
    env = make_env(tmp_path / "var", queue__max_attempts="1")
    rt = runtime_of(env)
    assert register_installed(rt.engine, rt.config.models.directory) is None
    site = add_site_candidate(env, "site-3")
    sources = chest_copies(tmp_path / "in", 4)
    worker = env.worker()
    caplog.set_level(logging.INFO, logger="dicom_node.worker")

    first, _ = env.receive(sources[0])
    assert worker.run_once() == 1
    sr = sr_of(env, first)
    assert demo.version in sr_text(sr, ALGORITHM_VERSION) and "site-3" not in sr_text(sr, ALGORITHM_VERSION)
    assert demo.notice in sr_text(sr, "NOTICE")

    promote(env.engine, site, user=USER, reason="passed the gate")
    second, _ = env.receive(sources[1])
    assert worker.run_once() == 1  # the same worker object: no restart
    sr = sr_of(env, second)
    assert "site-3" in sr_text(sr, ALGORITHM_VERSION) and demo.version not in sr_text(sr, ALGORITHM_VERSION)
    assert "pneumoconiosis-resnet34" in sr_text(sr, ALGORITHM_NAME)
    assert SITE_NOTICE in sr_text(sr, "NOTICE")
    assert demo.notice not in sr_text(sr, "NOTICE"), "a site model's results carry its own notice only"
    switched = [r.getMessage() for r in caplog.records if "classifier switched to" in r.getMessage()]
    assert switched == [f"classifier switched to #{site} pneumoconiosis-resnet34 site-3"]

    # a job that never reaches the models: its "not analysed" SR carries the champion's notice, not the demo's
    third, rec = env.receive(sources[2])
    env.archive.absolute(rec.archive_path).unlink()
    assert worker.run_once() == 1
    notices = sr_text(sr_of(env, third), "NOTICE")
    assert SITE_NOTICE in notices and demo.notice not in notices

    # a champion whose file is not the registered one: the worker keeps site-3, says so once, audits it once
    broken = add_site_candidate(env, "site-4", sha256="e" * 64)
    promote(env.engine, broken, user=USER, reason="test of a damaged file")
    caplog.clear()
    fourth, _ = env.receive(sources[3])
    assert worker.run_once() == 1
    assert worker.run_once() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"champion #{broken} pneumoconiosis-resnet34 site-4 cannot be used: its file's sha256 does not "
                      f"match the registry; keeping #{site} pneumoconiosis-resnet34 site-3"]
    [audit] = events(env.engine, UNUSABLE_EVENT)
    assert (audit["model_id"], audit["kept"], audit["worker"]) == (
        broken, f"#{site} pneumoconiosis-resnet34 site-3", worker.owner)
    assert "site-3" in sr_text(sr_of(env, fourth), ALGORITHM_VERSION)

    # rolled back to site-3 (already in use: no switch), then to the demo: the installed classifier again
    rollback(env.engine, user=USER, reason="damaged file")
    rollback(env.engine, user=USER, reason="back to the demo")
    fifth, _ = env.receive(chest_copies(tmp_path / "more", 1)[0])
    caplog.clear()
    assert worker.run_once() == 1
    sr = sr_of(env, fifth)
    assert demo.version in sr_text(sr, ALGORITHM_VERSION) and demo.notice in sr_text(sr, "NOTICE")
    assert [r.getMessage() for r in caplog.records if "classifier switched to" in r.getMessage()] == [
        f"classifier switched to #1 pneumoconiosis-resnet34 {demo.version} (the installed classifier)"]
