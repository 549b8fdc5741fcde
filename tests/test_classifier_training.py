"""A tiny end-to-end run of the classifier protocol: two folds, one epoch, a dozen real images."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from train.datasets import read_lung_masks

from .conftest import REPO, SAMPLES


def test_tiny_cross_validation_writes_report_figures_and_final_model(tmp_path):
    samples = read_lung_masks()
    normal = [s for s in samples if s.finding == "normal"][:6]
    disease = [s for s in samples if s.finding != "normal"][:6]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "present", "category", "patient_id", "mask"])
        for i, s in enumerate(normal + disease):
            present = int(s.finding != "normal")
            writer.writerow([s.image_path, present, 1 + i % 3 if present else 0, s.patient_id, s.mask_path])
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "train", "classifier", "--data", str(table), "--out", str(out),
         "--folds", "2", "--epochs", "1", "--batch-size", "4", "--size", "64", "--no-progress", "--final",
         "--notice", "test model, not for clinical use"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "report.json", "roc.png", "confusion.png", "history.png", "confusion_profusion.png",
                 "classifier.pt", "oof.npz"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert len(report["per_fold"]) == 2
    pooled = report["summary"]["pooled"]
    assert pooled["n"] == 12 and sum(map(sum, pooled["confusion"])) == 12
    assert {"accuracy", "auc", "auc_ci", "sensitivity", "specificity", "qwk"} <= set(pooled)
    assert report["summary"]["initialisation"] in ("scratch",) or report["summary"]["initialisation"].startswith(
        "imagenet:")
    assert "pooled" in (out / "report.md").read_text()
    # The final model, installed as a site's own classifier, adds its outputs to every analysis.
    chest = SAMPLES / "chest" / "RG1_UNCR.dcm"
    analysed = subprocess.run([sys.executable, "-m", "dicom_node.cli", "analyse", "--json", str(chest)], cwd=REPO,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DICOM_NODE_MODELS_DIRECTORY": str(out)})
    assert analysed.returncode == 0, analysed.stderr[-2000:]
    line = json.loads(analysed.stdout)
    p = line["pneumoconiosis"]
    assert 0 <= p["probability"] <= 1 and p["present"] == (p["probability"] >= p["threshold"])
    assert len(line["profusion_category"]["probabilities"]) == 4
    assert abs(sum(line["profusion_category"]["probabilities"]) - 1) < 1e-3
    assert line["profusion_category"]["most_likely"] in (0, 1, 2, 3)
    assert set(line["zones"]) == {"right_upper", "right_middle", "right_lower", "left_upper", "left_middle",
                                  "left_lower"}
    assert all(0 <= v <= 1 for v in line["zones"].values())
    names = [m["name"] for m in line["models"]]
    assert names == ["lung-field-unet", "pneumoconiosis-resnet34"]
    assert line["models"][1]["notice"] == "test model, not for clinical use"
