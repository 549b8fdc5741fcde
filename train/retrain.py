"""Retrain the classifier on a site's own labelled archive: the node's training job.

    python -m train.retrain --manifest FILE --out DIR

The node (``dicom_node/retraining.py``) writes the manifest (``train/manifest.py``: images by instance id, archive
path and patient key; the lung U-Net file; the champion; the settings), starts this program in its own low-priority
process, copies ``DIR/progress.jsonl`` into the database and registers the model when ``DIR/result.json`` exists.
Nothing here touches the database. The steps:

1. inputs, once, as inference makes them: ``ai.normalise``, the given lung U-Net, the node's input check (an image
   it refuses, or cannot read, is excluded and counted), the lung crop (``ai.lung_crop.classifier_input``);
2. the seed paper's protocol (``train.classifier.run_protocol``): K-fold stratified CV grouped by patient key, a
   leakage check on every fold, brightness augmentation after the split, the final model on all training images,
   the threshold from the pooled out-of-fold predictions; saved with ``ai.checkpoint``;
3. the saved model and the champion on the frozen hold-out through the node's own inference path
   (``ai.classifier.PneumoconiosisClassifier``), and the champion gate (``train.gate``);
4. the model card, report.md/report.json, figures, and ``result.json`` last (atomically).

Artifacts name images by instance id and patient key only: the manifest copy drops the paths, and no report holds
a file name, a UID or anything read from a header. Exit 0 on success; otherwise one line on stderr and exit 1
(2 for a manifest that cannot be used).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from ai.classifier import PneumoconiosisClassifier
from ai.decoding import UnreadableImage
from ai.input_check import check_lung_fields
from ai.limits import ImageTooLarge
from ai.normalise import normalise
from ai.resnet import PROFUSION_CATEGORIES
from ai.safe_text import SafeMessage, exception_summary
from ai.segment import LungSegmenter

from . import manifest as manifest_file
from . import model_card
from .classifier import Item, export_classifier, prepare_inputs, protocol_args, run_protocol
from .engine import resolve_device
from .gate import GateReport, evaluate_gate, plot_reliability, reliability_curve
from .manifest import Manifest, ManifestError, ManifestItem
from .metrics import binary_summary, multiclass_metrics, roc_curve
from .report import _jsonable, plot_confusion, plot_roc, write_report

MODEL_FILE = "classifier.pt"
CARD_FILE = "classifier.md"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"
MANIFEST_COPY = "manifest.json"
NOTICE = "Trained at site {site} on its own archive (run {run_id}); not validated for clinical use until the site's " \
         "own acceptance"
# Where each stage starts on the 0-1 progress scale the node shows (the protocol gets most of it).
PREPARING, PROTOCOL, HOLDOUT, WRITING = 0.0, 0.10, 0.85, 0.95


class RetrainFailure(SafeMessage, RuntimeError):
    """The run cannot go on (e.g. too few usable images after the exclusions); the message says why."""


class Progress:
    """Progress as JSON lines for the node ({"stage", "progress", "at"}) and as a bar on a terminal."""

    def __init__(self, path: Path, show: bool, stream: IO[str] = sys.stdout) -> None:
        self.path = path
        self.show = show
        self.path.write_text("", encoding="utf-8")
        self.bar = tqdm(total=1000, disable=not show, file=stream, bar_format="{l_bar}{bar}| {elapsed}")
        self.last: tuple[str, float] | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        fraction = round(min(max(fraction, 0.0), 1.0), 4)
        if self.last is not None and self.last[0] == stage and fraction - self.last[1] < 0.005 and fraction < 1:
            return  # a line per stage change or half a percent, not one per image
        self.last = (stage, fraction)
        line = {"stage": stage, "progress": fraction, "at": datetime.now(UTC).isoformat(timespec="seconds")}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        self.bar.set_description_str(stage)
        self.bar.update(max(0, round(fraction * 1000) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def scaled(progress: Progress, start: float, end: float):
    """A protocol-local progress callback mapped onto [start, end] of the run's scale."""
    def report(stage: str, fraction: float) -> None:
        progress(stage, start + (end - start) * fraction)

    return report


# --- counts: what the model was trained and judged on --------------------------------------------------------------

def counts(items: Sequence[ManifestItem], excluded: dict[int, str]) -> dict[str, Any]:
    """Images, patients, classes, categories, label sources and read dates of the used items; exclusions by
    reason."""
    used = [i for i in items if i.instance_id not in excluded]
    dates = sorted(i.read_date for i in used if i.read_date)
    return {
        "images": len(used), "patients": len({i.patient_key for i in used}),
        "present": sum(i.present for i in used), "absent": sum(1 - i.present for i in used),
        "category": {("unknown" if k < 0 else str(k)): v
                     for k, v in sorted(Counter(i.category for i in used).items())},
        "label_sources": dict(sorted(Counter(i.label_source or "unknown" for i in used).items())),
        "read_dates": {"first": dates[0] if dates else None, "last": dates[-1] if dates else None},
        "excluded": dict(sorted(Counter(excluded.values()).items())),
    }


def trained_on(manifest: Manifest, c: dict[str, Any]) -> str:
    """One sentence for the results' algorithm parameters: what the training data were."""
    cats = ", ".join(f"{k}: {v}" for k, v in c["category"].items())
    sources = ", ".join(f"{k} ({v})" for k, v in c["label_sources"].items())
    dates = c["read_dates"]
    read = f", read {dates['first']} to {dates['last']}" if dates["first"] else ""
    return (f"{c['images']} radiographs of {c['patients']} patients of site {manifest.site}'s archive (run "
            f"{manifest.run_id}): {c['present']} pneumoconiosis present, {c['absent']} absent; ILO major category "
            f"{cats}; labels from {sources}{read}. {manifest.labels_note}").strip()


def check_trainable(items: list[Item], folds: int, excluded: int) -> None:
    for present, what in ((1, "present"), (0, "absent")):
        patients = {i.group for i in items if i.present == present}
        if len(patients) < folds:
            raise RetrainFailure(f"after excluding {excluded} unusable image(s) the training set has "
                                 f"{len(patients)} patient(s) labelled {what}; {folds} folds need at least {folds}")


# --- the hold-out through the node's inference path ----------------------------------------------------------------

@dataclass
class HoldoutScores:
    y: np.ndarray  # (n,) present
    category: np.ndarray  # (n,) ILO category, -1 unknown
    probability: dict[str, np.ndarray]  # role -> (n,) probability of pneumoconiosis
    categories: dict[str, np.ndarray]  # role -> (n, 4)
    excluded: dict[int, str]  # instance id -> reason


def score_holdout(items: Sequence[ManifestItem], segmenter: LungSegmenter,
                  classifiers: dict[str, PneumoconiosisClassifier], progress) -> HoldoutScores:
    """Every hold-out image as the worker analyses it: normalise, lung U-Net, input check, then each classifier
    on the same lung fields (one image in memory at a time)."""
    kept: list[ManifestItem] = []
    excluded: dict[int, str] = {}
    probs: dict[str, list[float]] = {role: [] for role in classifiers}
    cats: dict[str, list[np.ndarray]] = {role: [] for role in classifiers}
    for n, item in enumerate(items, start=1):
        progress(f"hold-out evaluation {n}/{len(items)}", (n - 1) / max(len(items), 1))
        try:
            image = normalise(item.path)
        except (UnreadableImage, ImageTooLarge, OSError) as exc:
            excluded[item.instance_id] = "unreadable: " + type(exc).__name__
            continue
        seg = segmenter.segment([image])[0]
        check = check_lung_fields(seg.labels, seg.confidence)
        if not check.accepted:
            excluded[item.instance_id] = check.reason
            continue
        kept.append(item)
        for role, classifier in classifiers.items():
            p, c, _ = classifier.probabilities(image, seg.labels)
            probs[role].append(p)
            cats[role].append(c)
    return HoldoutScores(
        y=np.array([i.present for i in kept], dtype=np.int64), category=np.array([i.category for i in kept]),
        probability={r: np.array(v, dtype=np.float64) for r, v in probs.items()},
        categories={r: np.array(v).reshape(-1, PROFUSION_CATEGORIES) for r, v in cats.items()}, excluded=excluded)


def holdout_metrics(scores: HoldoutScores, role: str, classifier: PneumoconiosisClassifier) -> dict[str, Any]:
    y, p = scores.y, scores.probability[role]
    out: dict[str, Any] = {"model": f"{classifier.info.name} {classifier.info.version}",
                           "card_id": classifier.info.card_id}
    if y.size:
        out.update(binary_summary(y, p, classifier.threshold))
        out["ece"] = reliability_curve(y, p).ece()
    known = scores.category >= 0
    if known.any():
        mc = multiclass_metrics(scores.category[known], scores.categories[role][known])
        out.update(profusion_accuracy=mc["accuracy"], qwk=mc["qwk"])
    return out


# --- writing -------------------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the folder: a reader sees the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def holdout_figures(out: Path, scores: HoldoutScores, threshold: float) -> None:
    if scores.y.size == 0 or scores.y.min() == scores.y.max():
        return  # one class: no ROC, and a reliability curve against one class says little; the gate says why
    curves: list[tuple] = []
    for role, p in scores.probability.items():
        fpr, tpr, _ = roc_curve(scores.y, p)
        curves.append((fpr, tpr, role, binary_summary(scores.y, p, threshold)["auc"]))
    plot_roc(curves, out / "holdout_roc.png", title="ROC on the frozen hold-out")
    candidate = binary_summary(scores.y, scores.probability["candidate"], threshold)
    plot_confusion(candidate["confusion"], ["absent", "present"], out / "holdout_confusion.png",
                   title="Candidate on the hold-out")
    plot_reliability({role: reliability_curve(scores.y, p) for role, p in scores.probability.items()},
                     out / "reliability.png")


# --- the run -------------------------------------------------------------------------------------------------------

def retrain(manifest: Manifest, out: Path, show_progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    s = manifest.settings
    if s.threads:
        torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)  # a result left by an earlier attempt must not pass for this one
    (out / MANIFEST_COPY).write_text(json.dumps(manifest.public_copy(), indent=1) + "\n", encoding="utf-8")
    progress = Progress(out / PROGRESS_FILE, show_progress)
    try:
        return _run(manifest, out, progress, started)
    finally:
        progress.close()


def _run(manifest: Manifest, out: Path, progress: Progress, started: float) -> dict[str, Any]:
    s = manifest.settings
    device = resolve_device(s.device)
    notice = NOTICE.format(site=manifest.site, run_id=manifest.run_id)

    # 1. Inputs, once, the way inference makes them
    progress("preparing inputs", PREPARING)
    all_items = [Item(image=i.path, present=i.present, category=i.category, group=i.patient_key, mask=None)
                 for i in manifest.training]
    inputs = prepare_inputs(all_items, s.size, 0.05, False, manifest.segmenter, check_lungs=True,
                            on_item=lambda done, total: progress("preparing inputs", PROTOCOL * done / total))
    excluded = {manifest.training[i].instance_id: reason for i, reason in inputs.refused.items()}
    items = [all_items[i] for i in inputs.kept]
    used = [manifest.training[i] for i in inputs.kept]
    check_trainable(items, s.folds, len(excluded))
    holdout_keys = {i.patient_key for i in manifest.holdout}
    if holdout_keys & {i.group for i in items}:  # parse() refuses it; checked again where it would do harm
        raise RetrainFailure("a hold-out patient is among the training items")
    train_counts = counts(manifest.training, excluded)

    # 2. The protocol: CV, pooled threshold, final model, saved
    args = protocol_args(out, folds=s.folds, epochs=s.epochs, size=s.size, batch_size=s.batch_size, lr=s.lr,
                         patience=s.patience, seed=s.seed, device=s.device, imagenet_weights=s.imagenet_weights,
                         threshold_rule=s.threshold_rule, version=manifest.version, notice=notice,
                         trained_on=trained_on(manifest, train_counts), no_progress=not progress.show,
                         discard_checkpoints=True)
    outcome = run_protocol(args, items, inputs.x, names=[f"instance {i.instance_id}" for i in used],
                           data=f"run {manifest.run_id}: {len(items)} archive images of site {manifest.site}",
                           final=True, on_progress=scaled(progress, PROTOCOL, HOLDOUT))
    assert outcome.model is not None and outcome.final_epochs is not None
    export_classifier(outcome.model, out / MODEL_FILE, args, outcome.threshold, outcome.cv.init,
                      outcome.final_epochs, outcome.pooled, extra={
                          "name": manifest.name, "site": manifest.site, "run_id": manifest.run_id,
                          "labels_note": manifest.labels_note, "training_data": train_counts})
    digest = sha256(out / MODEL_FILE)

    # 3. The saved model and the champion on the hold-out, the gate
    segmenter = LungSegmenter(manifest.segmenter, device)
    # float32: the gate's figures are the same on every machine (the node's decisions are float32's anyway)
    classifiers = {"candidate": PneumoconiosisClassifier(out / MODEL_FILE, device, precision="fp32")}
    if manifest.champion is not None:
        classifiers["champion"] = PneumoconiosisClassifier(manifest.champion.path, device, precision="fp32")
    scores = score_holdout(manifest.holdout, segmenter, classifiers, scaled(progress, HOLDOUT, WRITING))
    candidate = classifiers["candidate"]
    gate: GateReport = evaluate_gate(
        scores.y, scores.probability["candidate"], candidate.threshold, scores.probability.get("champion"),
        alpha=s.alpha, min_sensitivity=s.min_sensitivity, min_specificity=s.min_specificity)
    holdout = {"n": int(scores.y.size), "excluded": len(scores.excluded),
               "candidate": holdout_metrics(scores, "candidate", candidate),
               "champion": None if manifest.champion is None else {
                   "id": manifest.champion.id, **holdout_metrics(scores, "champion", classifiers["champion"])}}

    # 4. Figures, reports, card, and result.json last
    progress("writing reports", WRITING)
    holdout_figures(out, scores, candidate.threshold)
    figures = sorted(p.name for p in out.glob("*.png"))
    result = _jsonable({
        "run_id": manifest.run_id, "name": manifest.name, "version": manifest.version, "site": manifest.site,
        "model_file": MODEL_FILE, "model_card": CARD_FILE, "sha256": digest, "threshold": outcome.threshold,
        "notice": notice, "labels_note": manifest.labels_note, "settings": manifest.raw_settings,
        "protocol": {"initialisation": outcome.cv.init, "final_epochs": outcome.final_epochs,
                     "device": str(device)},
        "per_fold": outcome.cv.per_fold, "pooled": outcome.pooled, "holdout": holdout, "gate": gate.to_json(),
        "counts": {"training": train_counts, "holdout": counts(manifest.holdout, scores.excluded)},
        "champion": None if manifest.champion is None else {
            "id": manifest.champion.id, "name": manifest.champion.name, "version": manifest.champion.version},
        "figures": figures,
    })
    write_report(out, {**outcome.summary, "title": f"Retraining run {manifest.run_id} at site {manifest.site}",
                       "notice": notice, "holdout": holdout, "gate": gate.to_json(), "counts": result["counts"]},
                 outcome.cv.per_fold)
    (out / CARD_FILE).write_text(model_card.render(result), encoding="utf-8")
    result["seconds"] = round(time.perf_counter() - started, 1)
    progress("finished", 1.0)
    write_atomically(out / RESULT_FILE, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        manifest = manifest_file.read(args.manifest)
    except ManifestError as exc:
        print(f"retrain: error: manifest: {exc}", file=sys.stderr)
        return 2
    try:
        result = retrain(manifest, args.out, show_progress=sys.stdout.isatty())
    except Exception as exc:  # noqa: BLE001 - one line for the node, never a traceback or a library's text
        print(f"retrain: error: {exception_summary(exc)}", file=sys.stderr)
        return 1
    gate = result["gate"]
    print(f"run {manifest.run_id}: {result['version']} hold-out AUC {result['holdout']['candidate'].get('auc')}, "
          f"gate {'passed' if gate['passed'] else 'refused'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
