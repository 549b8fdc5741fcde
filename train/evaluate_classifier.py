"""Evaluate an exported classifier file on held-out images through the node's own inference path.

    python -m train.evaluate_classifier --model runs/demo/classifier.pt --data runs/synth_test --out runs/eval_synth
    python -m train.evaluate_classifier --model runs/demo/classifier.pt --data ../shared/data/cxr-lung-masks \\
        --part test --out runs/eval_real

Each image goes through what ``ai.analyse`` does (normalise, lung U-Net, input check, lung crop, classifier) at the
threshold stored in the file. Reported: AUC, accuracy, sensitivity, specificity, detection rate per profusion
category and profusion accuracy / QWK where categories are known, and the false-positive rate per finding group
(e.g. normal, tuberculosis) where a ``finding`` column exists: what the demo model calls "pneumoconiosis" on real
films that have none.

``--engine`` chooses the inference engine of both models (ai/onnx_engine.py; default as the node: ONNX Runtime on
CPU) and ``--precision`` the classifier's arithmetic (ai/precision.py; default as the node); ``--reference`` an
earlier evaluation.json of the same images, e.g. one made with ``--precision fp32``: the AUC difference and every
image whose decision, refusal or most likely category differs are then reported under ``against_reference``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.classifier import PneumoconiosisClassifier
from ai.input_check import check_lung_fields
from ai.models import LUNG_UNET, model_path
from ai.normalise import normalise
from ai.precision import PRECISIONS
from ai.segment import LungSegmenter

from .classifier import Item, read_items
from .metrics import binary_summary, multiclass_metrics


def evaluation_items(data: Path, part: str | None, split_seed: int = 0) -> list[Item]:
    """The images of ``data`` to evaluate: all of them, or one ``part`` of a lung-mask-layout folder's seeded split
    (the split the segmenter and the synthetic data used)."""
    items = read_items(data)
    if part:
        from .datasets import read_lung_masks, stratified_split

        keep = {s.file for s in stratified_split(read_lung_masks(data), split_seed)[part]}
        items = [i for i in items if i.image.name in keep]
    return items


def evaluate(classifier_file: Path, data: Path, part: str | None, split_seed: int, engine: str = "auto",
             precision: str = "auto") -> dict:
    classifier = PneumoconiosisClassifier(classifier_file, torch.device("cpu"), engine, precision)
    segmenter = LungSegmenter(model_path(LUNG_UNET), torch.device("cpu"), engine)
    items = evaluation_items(data, part, split_seed)
    findings: dict[str, str] = {}
    if (data / "labels.csv").is_file() if data.is_dir() else False:
        import csv

        with (data / "labels.csv").open(newline="") as fh:
            findings = {r["file"]: r.get("finding", "") for r in csv.DictReader(fh)}
    rows: list[dict[str, Any]] = []
    for item in items:
        image = normalise(item.image)
        seg = segmenter.segment([image])[0]
        check = check_lung_fields(seg.labels, seg.confidence)
        if not check.accepted:
            rows.append({"file": item.image.name, "present": item.present, "category": item.category,
                         "finding": findings.get(item.image.name, ""), "refused": check.reason})
            continue
        prob, cats, precision = classifier.probabilities(image, seg.labels)
        rows.append({"file": item.image.name, "present": item.present, "category": item.category,
                     "finding": findings.get(item.image.name, ""), "probability": prob,
                     "categories": [float(c) for c in cats], "precision": precision})
    done = [r for r in rows if "probability" in r]
    y = np.array([r["present"] for r in done])
    p = np.array([r["probability"] for r in done])
    out: dict = {"model": classifier.info.to_json(), "engine": classifier.engine, "threshold": classifier.threshold,
                 "precision": classifier.precision,
                 "answered_in_bf16": sum(r.get("precision") == "bf16" for r in done), "images": len(rows),
                 "refused_by_input_check": len(rows) - len(done), "data": str(data), "part": part}
    if any(r["category"] >= 0 for r in done) and 0 < y.sum() < len(y):  # labelled for this task (synthetic)
        out["binary"] = binary_summary(y, p, classifier.threshold)
    positives = p >= classifier.threshold
    by_category = {}
    for c in range(4):
        sel = np.array([r["category"] == c for r in done])
        if sel.any():
            by_category[str(c)] = {"n": int(sel.sum()), "called_present": round(float(positives[sel].mean()), 4)}
    if by_category:
        out["called_present_by_category"] = by_category
        known = np.array([r["category"] >= 0 for r in done])
        if known.any():
            mc = multiclass_metrics(np.array([r["category"] for r in done])[known],
                                    np.array([r["categories"] for r in done])[known])
            out["profusion"] = {k: mc[k] for k in ("accuracy", "qwk")}
    groups = sorted({r["finding"] for r in done if r["finding"]})
    if groups:
        out["called_present_by_finding"] = {
            g: {"n": int(sum(r["finding"] == g for r in done)),
                "false_positive_rate": round(float(np.mean([pos for r, pos in zip(done, positives, strict=True)
                                                            if r["finding"] == g])), 4)}
            for g in groups}
    out["rows"] = rows
    return out


def against_reference(result: dict, reference: dict) -> dict:
    """How ``result`` differs from an earlier evaluation of the same images: AUC, and each changed decision."""
    def decision(row: dict) -> str:
        if "probability" not in row:
            return f"refused:{row.get('refused')}"
        return "present" if row["probability"] >= result["threshold"] else "absent"

    before = {r["file"]: r for r in reference["rows"]}
    changed = []
    categories_changed = []
    deltas = []
    for row in result["rows"]:
        old = before.get(row["file"])
        if old is None:
            continue
        if "probability" in row and "probability" in old:
            deltas.append(abs(row["probability"] - old["probability"]))
            now_category, old_category = int(np.argmax(row["categories"])), int(np.argmax(old["categories"]))
            if now_category != old_category:
                categories_changed.append({"file": row["file"], "before": old_category, "now": now_category})
        if decision(row) != decision(old):
            changed.append({"file": row["file"], "before": decision(old), "now": decision(row),
                            "probability_before": old.get("probability"), "probability_now": row.get("probability")})
    out: dict[str, Any] = {"images_compared": sum(r["file"] in before for r in result["rows"]),
                           "decisions_changed": changed, "most_likely_categories_changed": categories_changed,
                           "max_probability_difference": round(max(deltas), 6) if deltas else None}
    if "binary" in result and "binary" in reference:
        out["auc_difference"] = round(result["binary"]["auc"] - reference["binary"]["auc"], 6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with labels.csv, or a CSV file")
    parser.add_argument("--part", choices=["train", "val", "test"], help="only this part of the seeded split "
                        "of a lung-mask-layout folder (the split the segmenter and the synthetic data used)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--engine", choices=["auto", "torch", "onnxruntime"], default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the classifier's arithmetic (ai/precision.py; default as the node: bfloat16 where the "
                             "CPU has AMX or AVX-512 BF16, float32 near a decision)")
    parser.add_argument("--reference", type=Path, help="an earlier evaluation.json of the same images")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = evaluate(args.model, args.data, args.part, args.split_seed, args.engine, args.precision)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.reference:
        result["against_reference"] = against_reference(result, json.loads(args.reference.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
