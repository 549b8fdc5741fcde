"""``python -m train.retrain`` on a tiny real manifest: sixteen public radiographs written as DICOM files with planted
patient data (``tests/support/cxr_dicom``), two folds, one epoch, size 64, the bundled demo classifier as the
champion."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ai.classifier import PneumoconiosisClassifier
from train import retrain
from train.datasets import read_lung_masks

from .support.cxr_dicom import write_film
from .support.data import REPO
from .support.models import BUNDLED_MODELS

LABELS_NOTE = "tuberculosis labels standing in for pneumoconiosis (test)"
SETTINGS = {"folds": 2, "epochs": 1, "size": 64, "batch_size": 4, "seed": 7, "threads": 1, "device": "cpu",
            "imagenet_weights": None, "threshold_rule": "youden", "alpha": 0.05, "min_sensitivity": 0.5,
            "min_specificity": 0.5, "nice": 10}


def build_manifest(tmp_path: Path) -> tuple[dict, list[str]]:
    """The manifest the node would write, and every value that must never reach an artifact."""
    samples = read_lung_masks()
    normal = [s for s in samples if s.finding == "normal"]
    disease = [s for s in samples if s.finding != "normal"]
    chosen = normal[:4] + normal[-4:] + disease[:4] + disease[-4:]  # both hospitals, both classes
    archive = tmp_path / "archive-7f3a"
    forbidden = [str(archive), archive.name]
    entries = []
    for n, sample in enumerate(chosen):
        present = int(sample.finding != "normal")
        film = write_film(sample.image_path, archive / f"study{n:02d}" / f"object{n:02d}.dcm", index=n + 1,
                          present=present, tag="rtp")
        path = film.path
        forbidden += [film.patient_id, film.patient_name, film.birth_date, film.accession_number,
                      film.sop_instance_uid, film.study_instance_uid, sample.file, Path(sample.file).stem,
                      str(path), path.name]
        entries.append({"instance_id": 100 + n, "path": str(path), "patient_key": f"pk{n:02d}{'ab' * 8}",
                        "present": present, "category": (1 + n % 3) if present else 0,
                        "label_source": "csv" if n % 4 else "sr", "read_date": f"2025-0{1 + n % 9}-15"})
    holdout_at = {2, 6, 10, 14, 3, 11}  # three of each class
    manifest = {
        "run_id": 7, "name": "pneumoconiosis-resnet34", "version": "site-7", "site": "TESTNODE",
        "segmenter": str(BUNDLED_MODELS / "lung_unet.pt"),
        "champion": {"id": 1, "name": "pneumoconiosis-resnet34", "version": "0.1.0-demo",
                     "path": str(BUNDLED_MODELS / "classifier.pt")},
        "settings": SETTINGS,
        "training": [e for i, e in enumerate(entries) if i not in holdout_at],
        "holdout": [e for i, e in enumerate(entries) if i in holdout_at],
        "labels_note": LABELS_NOTE,
    }
    return manifest, forbidden


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    manifest, forbidden = build_manifest(tmp)
    manifest_path = tmp / "run-7.manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "train.retrain", "--manifest", str(manifest_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc, out, manifest, forbidden


def test_retrain_writes_a_registered_model_with_its_card_reports_and_result(run):
    proc, out, manifest, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    model = out / result["model_file"]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == result["sha256"]
    assert (result["run_id"], result["version"], result["name"]) == (7, "site-7", "pneumoconiosis-resnet34")

    assert len(result["per_fold"]) == 2
    for row in [*result["per_fold"], result["pooled"]]:
        assert {"auc", "auc_ci", "accuracy", "sensitivity", "specificity", "qwk"} <= set(row)
    counts = result["counts"]
    assert counts["training"]["images"] + sum(counts["training"]["excluded"].values()) == 10
    assert counts["training"]["present"] + counts["training"]["absent"] == counts["training"]["images"]
    assert counts["training"]["label_sources"].keys() <= {"csv", "sr"}
    assert counts["training"]["read_dates"]["first"] <= counts["training"]["read_dates"]["last"]
    assert set(counts["training"]["category"]) <= {"0", "1", "2", "3"}

    holdout = result["holdout"]
    assert holdout["n"] + holdout["excluded"] == 6
    assert {"auc", "sensitivity", "specificity", "ece"} <= set(holdout["candidate"])
    assert holdout["champion"]["model"] == "pneumoconiosis-resnet34 0.1.0-demo"
    gate = result["gate"]
    assert isinstance(gate["passed"], bool) and gate["passed"] == (gate["reasons"] == [])
    assert gate["threshold"] == pytest.approx(result["threshold"])
    if holdout["n"] == 6:  # both classes, three each: the paired comparison ran
        assert gate["auc_difference"] == pytest.approx(gate["candidate_auc"] - gate["champion_auc"])
        assert gate["candidate_auc"] == pytest.approx(holdout["candidate"]["auc"])

    # The model file is what the worker loads: its notice, what it was trained on, its threshold.
    classifier = PneumoconiosisClassifier(model, torch.device("cpu"))
    assert classifier.info.notice == ("Trained at site TESTNODE on its own archive (run 7); not validated for "
                                      "clinical use until the site's own acceptance")
    assert LABELS_NOTE in classifier.info.trained_on and "site TESTNODE" in classifier.info.trained_on
    assert classifier.threshold == pytest.approx(result["threshold"]) and classifier.input_size == 64

    card = (out / "classifier.md").read_text()
    assert classifier.info.notice in card and LABELS_NOTE in card and "Promotion gate" in card
    for name in ("roc.png", "confusion.png", "history.png", "reliability.png", "holdout_roc.png", "report.md",
                 "report.json", "manifest.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert set(result["figures"]) >= {"roc.png", "confusion.png", "history.png", "reliability.png"}
    copy = json.loads((out / "manifest.json").read_text())
    assert [i["instance_id"] for i in copy["training"]] == [i["instance_id"] for i in manifest["training"]]
    assert all("path" not in i for i in copy["training"] + copy["holdout"])


def test_progress_goes_through_every_stage_and_ends_at_one(run):
    proc, out, _, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert all(set(line) == {"stage", "progress", "at"} for line in lines)
    values = [line["progress"] for line in lines]
    assert values == sorted(values) and values[0] == 0 and values[-1] == 1.0
    stages = " | ".join(line["stage"] for line in lines)
    for stage in ("preparing inputs", "fold 1/2 epoch 1/1", "fold 2/2 epoch 1/1", "final model epoch 1/1",
                  "hold-out evaluation 1/6", "writing reports", "finished"):
        assert stage in stages, stages


def test_no_artifact_holds_patient_data_paths_or_uids(run):
    proc, out, _, forbidden = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    planted = re.compile(b"|".join(re.escape(v.encode()) for v in sorted(set(forbidden), key=len, reverse=True)))
    for path in files:
        found = planted.search(path.read_bytes())
        assert found is None, f"{path.relative_to(out)} holds {found.group().decode()!r}"


def write(tmp_path: Path, manifest: dict) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_a_manifest_that_cannot_be_used_is_one_line_naming_the_key(tmp_path, capsys):
    manifest, _ = build_manifest(tmp_path)
    cases = []
    leak = json.loads(json.dumps(manifest))
    leak["holdout"][0]["patient_key"] = leak["training"][3]["patient_key"]
    cases.append((leak, "holdout[0].patient_key: a hold-out patient is among the training items"))
    bad = json.loads(json.dumps(manifest))
    bad["training"][4]["present"] = 2
    cases.append((bad, "training[4].present: must be 0 to 1"))
    bad = json.loads(json.dumps(manifest))
    del bad["settings"]["folds"]
    cases.append((bad, "settings: missing key(s) folds"))
    bad = json.loads(json.dumps(manifest))
    bad["training"][0]["colour"] = "x"
    cases.append((bad, "training[0]: unknown key(s) 'colour'"))
    bad = json.loads(json.dumps(manifest))
    bad["holdout"][1]["read_date"] = "15.03.2025"
    cases.append((bad, "holdout[1].read_date: must be a date YYYY-MM-DD or null"))
    bad = json.loads(json.dumps(manifest))
    bad["segmenter"] = "relative/lung_unet.pt"
    cases.append((bad, "segmenter: must be an absolute path"))
    for broken, message in cases:
        out = tmp_path / "out"
        assert retrain.main(["--manifest", str(write(tmp_path, broken)), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"retrain: error: manifest: {message}\n"
        assert not (out / "result.json").exists()
    (tmp_path / "manifest.json").write_text("{not json")
    assert retrain.main(["--manifest", str(tmp_path / "manifest.json"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "retrain: error: manifest: the manifest is not readable JSON (JSONDecodeError)\n"


def test_too_few_usable_patients_fail_with_one_line_and_no_result(tmp_path, capsys):
    manifest, _ = build_manifest(tmp_path)
    for item in manifest["training"]:
        if item["present"]:
            item["path"] = str(tmp_path / "gone" / f"{item['instance_id']}.dcm")  # archive file missing
    out = tmp_path / "out"
    assert retrain.main(["--manifest", str(write(tmp_path, manifest)), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("retrain: error: RetrainFailure: after excluding 5 unusable image(s) the training set has "
                          "0 patient(s) labelled present") and err.count("\n") == 1
    assert str(tmp_path) not in err and not (out / "result.json").exists()
