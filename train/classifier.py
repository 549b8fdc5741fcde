"""Train the pneumoconiosis classifier with the seed paper's protocol, readable top to bottom.

    python -m train.classifier --data DIR_OR_CSV --out runs/cls [--folds 10] [--epochs 50] [--size 384] ...

1. Data: a folder with ``labels.csv`` in the public lung-mask layout (file, source, finding; masks in ``masks/``),
   or any CSV with ``file`` and ``present`` (0/1) and optionally ``category`` (ILO 0-3), ``patient_id`` or
   ``source_file`` (the grouping key: synthetic images made from one radiograph share it) and ``mask``.
   Images without a mask file are segmented with the node's lung U-Net.
2. Every image becomes the classifier's input once, the same way inference makes it (``ai.lung_crop``): lung crop
   with a margin, optional outside-lung suppression, letterbox to ``--size``, contrast standardisation.
3. k-fold cross-validation (default 10), stratified, grouped by patient; brightness augmentation after the split,
   on training folds only: ``random`` (a factor in 0.7-1.3 per image per epoch, the default, as cheap as no
   augmentation) or ``copies`` (the paper's eight brightness levels as eight copies: eight times the epoch time).
4. ResNet-34 with a binary head and an ILO profusion head, focal loss on each (alpha, gamma per head); Adam, lr 1e-4,
   batch 32, 50 epochs, early stopping on validation AUC, resumable (``fold*/last.pt``); CPU or CUDA (AMP on CUDA).
5. Per fold and pooled out-of-fold: accuracy, AUC with DeLong 95 % CI, sensitivity, specificity, confusion matrix,
   and for the profusion head accuracy and quadratic weighted kappa; ROC, confusion and history figures; report.md
   and report.json.
6. ``--final``: a model trained on all data for the median best epoch of the folds, with the decision threshold
   chosen on the pooled out-of-fold predictions (``--threshold-rule youden`` or ``sensitivity:0.90``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai import checkpoint
from ai.decoding import UnreadableImage
from ai.input_check import check_lung_fields
from ai.limits import ImageTooLarge
from ai.lung_crop import classifier_input
from ai.lungs import postprocess_probability
from ai.normalise import normalise
from ai.resnet import PROFUSION_CATEGORIES, PneumoconiosisNet
from ai.segment import LungSegmenter

from .engine import Batch, FitConfig, fit, resolve_device, seed_everything
from .folds import BRIGHTNESS_RANGE, brightness_levels, check_no_leakage, stratified_group_kfold
from .losses import focal_loss_binary, focal_loss_multiclass
from .metrics import binary_summary, multiclass_metrics, roc_auc, roc_curve, threshold_for_sensitivity, youden_threshold
from .report import plot_confusion, plot_history, plot_roc, write_report

MODEL_NAME = "pneumoconiosis-resnet34"
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class Item:
    image: Path
    present: int
    category: int  # -1 when unknown
    group: str
    mask: Path | None


def read_items(data: Path) -> list[Item]:
    """The training table: a lung-mask-layout folder or a generic CSV (see the module docstring)."""
    csv_path = data / "labels.csv" if data.is_dir() else data
    root = csv_path.parent
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    items = []
    for row in rows:
        image = Path(row["file"]) if Path(row["file"]).is_absolute() else root / (
            "images/" + row["file"] if (root / "images" / row["file"]).exists() else row["file"])
        if "present" in row:
            present = int(row["present"])
        else:
            present = int(row["finding"].strip().lower() != "normal")
        category = int(row["category"]) if row.get("category", "") not in ("", None) else -1
        group = row.get("patient_id") or row.get("source_file") or Path(row["file"]).stem.rsplit("_", 1)[0]
        mask = Path(row["mask"]) if row.get("mask") else root / "masks" / row["file"]
        items.append(Item(image, present, category, group, mask if mask.is_file() else None))
    return items


class RefusedInput(ValueError):
    """The node's input check refuses an image's lung fields: inference would never classify it."""


def input_pixels(item: Item, size: int, margin: float, suppress: bool, segmenter: Callable[[], LungSegmenter],
                 check_lungs: bool = False) -> np.ndarray:
    """One item's (size, size) uint8 classifier input, made the way inference makes it (``ai.lung_crop``).

    The lung fields come from the item's mask file or, without one, from ``segmenter()`` (called only then);
    ``check_lungs`` treats the item as the node's inference would: a file it cannot read or decode, or lung
    fields its input check refuses, raise ``RefusedInput`` (naming the kind of failure, never a value)."""
    from PIL import Image

    try:
        image = normalise(item.image)
    except (UnreadableImage, ImageTooLarge, OSError) as exc:
        if not check_lungs:
            raise
        raise RefusedInput("unreadable: " + type(exc).__name__) from None
    if item.mask is not None:
        with Image.open(item.mask) as m:
            mask = np.asarray(m.convert("L").resize(image.pixels.shape[::-1]), dtype=np.float32) / 255
        labels = postprocess_probability(mask)
    else:
        seg = segmenter().segment([image])[0]
        if check_lungs:
            check = check_lung_fields(seg.labels, seg.confidence)
            if not check.accepted:
                raise RefusedInput(check.reason)
        labels = seg.labels
    x, _ = classifier_input(image, labels, size, margin, suppress)
    return np.round(x * 255).astype(np.uint8)


@dataclass
class Inputs:
    """The classifier inputs of the items the input check kept, and why the others were refused."""

    x: torch.Tensor  # (len(kept), 1, size, size) uint8
    kept: list[int]  # indices into the items, in order
    refused: dict[int, str]  # index -> the input check's reason


def prepare_inputs(items: list[Item], size: int, margin: float, suppress: bool, segmenter: Path | None = None, *,
                   check_lungs: bool = False, on_item: Callable[[int, int], None] | None = None) -> Inputs:
    """Every item's classifier input, made once. ``segmenter``: the lung U-Net file to use where an item has no
    mask (a node's current one), default the node's bundled or installed one (``ai.models.lung_segmenter``);
    ``on_item(done, total)`` after each item (progress)."""
    loaded: list[LungSegmenter] = []

    def get_segmenter() -> LungSegmenter:
        if not loaded:
            if segmenter is not None:
                loaded.append(LungSegmenter(segmenter, torch.device("cpu")))
            else:
                from ai.models import lung_segmenter

                loaded.append(lung_segmenter())
        return loaded[0]

    rows: list[np.ndarray] = []
    kept: list[int] = []
    refused: dict[int, str] = {}
    for i, item in enumerate(items):
        try:
            rows.append(input_pixels(item, size, margin, suppress, get_segmenter, check_lungs))
            kept.append(i)
        except RefusedInput as exc:
            refused[i] = str(exc)
        if on_item is not None:
            on_item(i + 1, len(items))
    x = torch.from_numpy(np.stack(rows)[:, None]) if rows else torch.empty((0, 1, size, size), dtype=torch.uint8)
    return Inputs(x, kept, refused)


def make_loss(alpha_b: float, gamma_b: float, alpha_p: float | None, gamma_p: float, with_profusion: bool) -> LossFn:
    def loss(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        value = focal_loss_binary(outputs["binary"], targets[:, 0].float(), alpha=alpha_b, gamma=gamma_b)
        if with_profusion:
            known = targets[:, 1] >= 0
            if known.any():
                value = value + focal_loss_multiclass(outputs["profusion"][known], targets[known, 1].long(),
                                                      alpha=alpha_p, gamma=gamma_p)
        return value

    return loss


def auc_score(outputs: list[dict[str, torch.Tensor]], targets: list[torch.Tensor]) -> float:
    y = torch.cat(targets)[:, 0].numpy()
    scores = torch.cat([o["binary"] for o in outputs]).numpy()
    if y.min() == y.max():
        return float(np.mean((scores > 0) == y))
    return roc_auc(y, scores)


def binary_accuracy(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[int, int]:
    return int(((outputs["binary"] > 0).long() == targets[:, 0].long()).sum()), int(targets.shape[0])


def batches(x: torch.Tensor, y: torch.Tensor, index: np.ndarray, batch_size: int, seed: int | None,
            brightness: list[float] | None = None):
    """Float batches in [0, 1]; ``brightness`` expands each index into one copy per level (the paper's copies)."""
    rows = np.repeat(index, len(brightness)) if brightness else index
    factors = np.tile(brightness, len(index)) if brightness else np.ones(len(rows))
    order = np.random.default_rng(seed).permutation(len(rows)) if seed is not None else np.arange(len(rows))
    for start in range(0, len(rows), batch_size):
        pick = order[start:start + batch_size]
        images = x[rows[pick]].float() / 255
        images = (images * torch.from_numpy(factors[pick]).float().view(-1, 1, 1, 1)).clamp(0, 1)
        yield images, y[rows[pick]]


def random_brightness(generator: torch.Generator):
    lo, hi = BRIGHTNESS_RANGE

    def transform(images: torch.Tensor, targets: torch.Tensor):
        factors = torch.rand(images.shape[0], generator=generator) * (hi - lo) + lo
        return (images * factors.to(images.device).view(-1, 1, 1, 1)).clamp(0, 1), targets

    return transform


@torch.no_grad()
def predict(model: PneumoconiosisNet, x: torch.Tensor, index: np.ndarray, device: torch.device
            ) -> tuple[np.ndarray, np.ndarray]:
    model.eval().to(device)
    probs, cats = [], []
    for start in range(0, len(index), 64):
        out = model((x[index[start:start + 64]].float() / 255).to(device))
        probs.append(torch.sigmoid(out["binary"]).float().cpu())
        cats.append(torch.softmax(out["profusion"], dim=1).float().cpu())
    return torch.cat(probs).numpy(), torch.cat(cats).numpy()


def choose_threshold(rule: str, y: np.ndarray, p: np.ndarray) -> float:
    if rule == "youden":
        return float(youden_threshold(y, p))
    if rule.startswith("sensitivity:"):
        return float(threshold_for_sensitivity(y, p, float(rule.split(":", 1)[1])))
    raise ValueError(f"unknown threshold rule {rule!r} (youden or sensitivity:0.90)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with labels.csv, or a CSV file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--suppress-outside", action="store_true")
    parser.add_argument("--augment", choices=["random", "copies", "none"], default="random")
    parser.add_argument("--focal-alpha", type=float, default=0.25)
    parser.add_argument("--focal-gamma", type=float, default=2.0)
    parser.add_argument("--profusion-alpha", type=float, default=None)
    parser.add_argument("--profusion-gamma", type=float, default=2.0)
    parser.add_argument("--imagenet-weights", type=Path, help="local ImageNet ResNet-34 state dict")
    parser.add_argument("--threshold-rule", default="youden")
    parser.add_argument("--final", action="store_true", help="also train the final model on all data")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--trained-on", default="", help="what the data are, for the model card and every result")
    parser.add_argument("--notice", default="", help="sentence every result must carry (e.g. demo / not for "
                                                      "clinical use)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--discard-checkpoints", action="store_true",
                        help="remove each model's best.pt/last.pt once it is done (hundreds of MB each; no resume)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def protocol_args(out: Path, **settings: Any) -> argparse.Namespace:
    """The protocol's settings for a caller other than this command line (``train.retrain``): the command's
    defaults with ``settings`` (argument names with underscores) applied; an unknown name is an error."""
    args = parse_args(["--data", "", "--out", str(out)])
    unknown = sorted(set(settings) - set(vars(args)))
    if unknown:
        raise ValueError(f"unknown protocol settings: {', '.join(unknown)}")
    for name, value in settings.items():
        setattr(args, name, value)
    return args


ProgressFn = Callable[[str, float], None]
"""``(stage, fraction)``: what the protocol is doing and how much of it (0-1) is done, once per epoch."""


@dataclass
class CrossValidation:
    """Step 4's outcome: out-of-fold predictions for every image, and each fold's metrics, history and ROC."""

    prob: np.ndarray  # (N,) out-of-fold probability of pneumoconiosis
    category: np.ndarray  # (N, 4) out-of-fold ILO category probabilities
    per_fold: list[dict]
    histories: list[list[dict[str, float]]]
    curves: list[tuple]  # (fpr, tpr, label, auc) per fold with both classes
    init: str  # how the models were initialised ("scratch" or "imagenet:<path>")


def cross_validate(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, groups: list[str],
                   folds: list[tuple[np.ndarray, np.ndarray]], levels: list[float] | None, loss_fn: LossFn,
                   with_profusion: bool, device: torch.device, on_progress: ProgressFn | None = None
                   ) -> CrossValidation:
    """Step 4: one model per fold, trained on the other folds (augmented) and evaluated on its own."""
    present = y[:, 0].numpy()
    n = len(groups)
    cv = CrossValidation(np.zeros(n), np.zeros((n, PROFUSION_CATEGORIES)), [], [], [], "scratch")
    for k, (train_idx, val_idx) in enumerate(folds, start=1):
        check_no_leakage(train_idx, val_idx, groups)
        generator = seed_everything(args.seed + k)
        model = PneumoconiosisNet.create(imagenet_weights=args.imagenet_weights)
        cv.init = model.init
        cfg = FitConfig(epochs=args.epochs, lr=args.lr, patience=args.patience, device=args.device,
                        seed=args.seed + k, out_dir=args.out / f"fold{k:02d}", progress=not args.no_progress)

        def train_batches(epoch: int, t: np.ndarray = train_idx, k: int = k) -> Iterable[Batch]:
            if on_progress is not None:  # fit asks for each epoch's batches at its start
                on_progress(f"fold {k}/{len(folds)} epoch {epoch + 1}/{args.epochs}",
                            ((k - 1) * args.epochs + epoch) / ((len(folds) + 1) * args.epochs))
            return batches(x, y, t, args.batch_size, args.seed + epoch, levels)

        def val_batches(v: np.ndarray = val_idx) -> Iterable[Batch]:
            return batches(x, y, v, 64, None)

        history = fit(
            model, train_batches=train_batches, val_batches=val_batches,
            loss_fn=loss_fn, score_fn=auc_score, cfg=cfg, accuracy_fn=binary_accuracy,
            train_transform=random_brightness(generator) if args.augment == "random" else None,
        )
        prob, cat = predict(model, x, val_idx, device)
        cv.prob[val_idx], cv.category[val_idx] = prob, cat
        if args.discard_checkpoints:
            discard_checkpoints(cfg.out_dir)
        row = {"fold": k, "best_epoch": history.best_epoch, **binary_summary(present[val_idx], prob, 0.5)}
        known = y[val_idx, 1].numpy() >= 0
        if with_profusion and known.any():
            mc = multiclass_metrics(y[val_idx, 1].numpy()[known], cat[known])
            row.update(profusion_accuracy=mc["accuracy"], qwk=mc["qwk"])
        cv.per_fold.append(row)
        cv.histories.append(history.epochs)
        if 0 < present[val_idx].sum() < len(val_idx):
            fpr, tpr, _ = roc_curve(present[val_idx], prob)
            cv.curves.append((fpr, tpr, f"fold {k}", row["auc"]))
    return cv


def pooled_results(args: argparse.Namespace, cv: CrossValidation, y: torch.Tensor, names: list[str],
                   with_profusion: bool) -> tuple[dict, float]:
    """Step 5: the pooled out-of-fold metrics at the chosen threshold, the figures and oof.npz (images named by
    ``names``)."""
    present = y[:, 0].numpy()
    threshold = choose_threshold(args.threshold_rule, present, cv.prob)
    pooled = {"fold": "pooled", **binary_summary(present, cv.prob, threshold)}
    fpr, tpr, _ = roc_curve(present, cv.prob)
    plot_roc(cv.curves + [(fpr, tpr, "pooled out-of-fold", pooled["auc"])], args.out / "roc.png")
    plot_confusion(pooled["confusion"], ["absent", "present"], args.out / "confusion.png")
    plot_history(cv.histories, args.out / "history.png", labels=[f"fold {k}" for k in range(1, len(cv.histories) + 1)])
    known = y[:, 1].numpy() >= 0
    if with_profusion and known.any():
        mc = multiclass_metrics(y[:, 1].numpy()[known], cv.category[known])
        pooled.update(profusion_accuracy=mc["accuracy"], qwk=mc["qwk"])
        plot_confusion(mc["confusion"], ["0", "1", "2", "3"], args.out / "confusion_profusion.png")
    np.savez(args.out / "oof.npz", prob=cv.prob, category=cv.category, present=present, files=np.array(names))
    return pooled, threshold


def run_summary(args: argparse.Namespace, items: list[Item], pooled: dict, threshold: float, init: str,
                with_profusion: bool, device: torch.device, data: str) -> dict:
    """The report's summary: data (``data`` says what they are), protocol settings and the pooled result."""
    return {
        "title": "Classifier cross-validation", "pooled": pooled, "class_names": ["absent", "present"],
        "images": len(items), "groups": len({i.group for i in items}), "positives": sum(i.present for i in items),
        "folds": args.folds, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "size": args.size, "margin": args.margin, "suppress_outside": args.suppress_outside,
        "augmentation": args.augment, "focal_binary": [args.focal_alpha, args.focal_gamma],
        "focal_profusion": [args.profusion_alpha, args.profusion_gamma] if with_profusion else None,
        "initialisation": init, "threshold_rule": args.threshold_rule, "threshold": threshold,
        "device": str(device), "seed": args.seed, "data": data,
    }


def train_final(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, per_fold: list[dict],
                levels: list[float] | None, loss_fn: LossFn, on_progress: ProgressFn | None = None
                ) -> tuple[PneumoconiosisNet, int]:
    """Step 6: a model on all data for the median best epoch of the folds (no early stopping)."""
    epochs = max(1, int(statistics.median(r["best_epoch"] for r in per_fold)))
    model = PneumoconiosisNet.create(imagenet_weights=args.imagenet_weights)
    everything = np.arange(len(x))
    generator = seed_everything(args.seed)
    done_before = len(per_fold) / (len(per_fold) + 1)

    def train_batches(epoch: int) -> Iterable[Batch]:
        if on_progress is not None:
            on_progress(f"final model epoch {epoch + 1}/{epochs}", done_before + epoch / epochs / (len(per_fold) + 1))
        return batches(x, y, everything, args.batch_size, args.seed + epoch, levels)

    fit(model, train_batches=train_batches,
        val_batches=lambda: batches(x, y, everything[:64], 64, None), loss_fn=loss_fn, score_fn=auc_score,
        cfg=FitConfig(epochs=epochs, lr=args.lr, patience=epochs + 1, device=args.device, seed=args.seed,
                      out_dir=args.out / "final", progress=not args.no_progress),
        train_transform=random_brightness(generator) if args.augment == "random" else None)
    if args.discard_checkpoints:
        discard_checkpoints(args.out / "final")
    return model, epochs


def discard_checkpoints(folder: Path) -> None:
    """Remove a finished model's training checkpoints (its history.json stays)."""
    for name in ("best.pt", "last.pt"):
        (folder / name).unlink(missing_ok=True)


@dataclass
class ProtocolOutcome:
    """What ``run_protocol`` found: the cross-validation, its pooled metrics and threshold, the report's summary,
    and the final model (None unless asked for)."""

    cv: CrossValidation
    pooled: dict
    threshold: float
    summary: dict
    model: PneumoconiosisNet | None = None
    final_epochs: int | None = None


def run_protocol(args: argparse.Namespace, items: list[Item], x: torch.Tensor, *, names: list[str], data: str,
                 final: bool, on_progress: ProgressFn | None = None) -> ProtocolOutcome:
    """Steps 3-6 on prepared inputs ``x`` (one row per item): patient-grouped stratified folds, one model per
    fold, pooled out-of-fold metrics and figures (images named by ``names`` in oof.npz), the threshold from the
    pooled out-of-fold predictions and, with ``final``, the model trained on all items."""
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    with_profusion = any(i.category >= 0 for i in items)
    y = torch.tensor([[i.present, i.category] for i in items], dtype=torch.long)
    groups = [i.group for i in items]

    # 3. Folds, grouped by patient, stratified by the label
    strata = [f"{i.present}/{i.category}" for i in items]
    folds = stratified_group_kfold(strata, groups, k=args.folds, seed=args.seed)
    levels = brightness_levels(8) if args.augment == "copies" else None

    # 4. One model per fold
    loss_fn = make_loss(args.focal_alpha, args.focal_gamma, args.profusion_alpha, args.profusion_gamma,
                        with_profusion)
    cv = cross_validate(args, x, y, groups, folds, levels, loss_fn, with_profusion, device, on_progress)

    # 5. Pooled out-of-fold results, threshold, figures
    pooled, threshold = pooled_results(args, cv, y, names, with_profusion)
    outcome = ProtocolOutcome(cv, pooled, threshold,
                              run_summary(args, items, pooled, threshold, cv.init, with_profusion, device, data))

    # 6. Final model on all data
    if final:
        outcome.model, outcome.final_epochs = train_final(args, x, y, cv.per_fold, levels, loss_fn, on_progress)
        outcome.summary["final_epochs"] = outcome.final_epochs
    if on_progress is not None:
        on_progress("protocol done", 1.0)
    return outcome


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1-2. Data and inputs
    items = read_items(args.data)
    if args.limit:
        items = items[:args.limit]
    x = prepare_inputs(items, args.size, args.margin, args.suppress_outside).x

    # 3-6. The protocol
    outcome = run_protocol(args, items, x, names=[str(i.image) for i in items], data=str(args.data),
                           final=args.final)
    if outcome.model is not None and outcome.final_epochs is not None:
        export_classifier(outcome.model, args.out / "classifier.pt", args, outcome.threshold, outcome.cv.init,
                          outcome.final_epochs, outcome.pooled)
    outcome.summary["seconds"] = round(time.perf_counter() - started, 1)
    write_report(args.out, outcome.summary, outcome.cv.per_fold)
    pooled = outcome.pooled
    print(json.dumps({k: pooled[k] for k in ("accuracy", "auc", "auc_ci", "sensitivity", "specificity")}))
    return 0


def classifier_fields(args: argparse.Namespace, threshold: float, init: str, epochs: int, pooled: dict
                      ) -> dict[str, Any]:
    """The model file's fields (``ai.checkpoint``): everything inference and the model card need."""
    return {
        "name": MODEL_NAME, "version": args.version, "threshold": threshold,
        "threshold_rule": args.threshold_rule, "input_size": args.size, "margin": args.margin,
        "suppress_outside": args.suppress_outside, "initialisation": init, "epochs": epochs,
        "trained_on": args.trained_on, "notice": args.notice,
        "cross_validation": {k: pooled.get(k) for k in ("accuracy", "auc", "auc_ci", "sensitivity", "specificity",
                                                        "qwk")},
    }


def export_classifier(model: PneumoconiosisNet, path: Path, args: argparse.Namespace, threshold: float, init: str,
                      epochs: int, pooled: dict, extra: Mapping[str, Any] | None = None) -> None:
    """The model file: half-precision weights with ``classifier_fields`` and ``extra`` (which may override
    them)."""
    checkpoint.save(path, model.state_dict(), {**classifier_fields(args, threshold, init, epochs, pooled),
                                               **(extra or {})}, required=checkpoint.CLASSIFIER_FIELDS)


if __name__ == "__main__":
    raise SystemExit(main())
