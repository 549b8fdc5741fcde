"""Train and evaluate the lung-field U-Net on the public Montgomery + Shenzhen masks.

    python -m train.segmenter --out runs/seg128 --size 128 --epochs 40 --dense-fraction 0
    python -m train.segmenter --out runs/seg256 --size 256 --epochs 10 --init runs/seg128/best.pt \
        --dense-fraction 0 --export ai/models/lung_unet.pt
    python -m train.segmenter --out runs/dense256 --size 256 --epochs 14 --init ai/models/lung_unet.pt \
        --lr 3e-4 --patience 5 --dense-fraction 0.5 --export ai/models/lung_unet.pt --version 1.1.0
    python -m train.segmenter --out runs/cos256 --size 256 --epochs 8 --init ai/models/lung_unet.pt \
        --lr 3e-4 --lr-schedule cosine --patience 99 --dense-fraction 0.5

A seeded split stratified by source (train / validation / test = 80 / 10 / 10 %); Dice + BCE loss; intensity and
small geometric augmentation (no left-right flips); synthetic dense disease painted inside the true lung mask on a
fraction of the training images of every batch (``train.dense_disease``, ``--dense-fraction``), so that opaque lung
is still lung; checkpoints and resume in --out. A fully convolutional U-Net
can be trained cheaply at 128 px first and fine-tuned at 256 px, which is how the shipped weights were made on two
CPU cores (see ai/models/lung_unet.md). The test split is only touched by the final report.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ai import checkpoint
from ai.geometry import Letterbox
from ai.lungs import labels_on_source
from ai.normalise import stretch_contrast
from ai.unet import UNet

from .augment import AugmentConfig, augment_pair
from .datasets import LungSample, load_gray, load_mask, read_lung_masks, stratified_split
from .dense_disease import paint_batch, paint_dense_disease, random_spec
from .engine import PRECISIONS, FitConfig, History, fit, resolve_device, seed_everything, tensor_batches
from .losses import SEGMENTATION_LOSSES, batch_dice, dice_iou
from .mask_convention import film_and_mask, includes_heart
from .synthetic_opacities import DEFAULT_PIXEL_SPACING_MM

MODEL_NAME = "lung-field-unet"
FILM_WIDTH_MM = DEFAULT_PIXEL_SPACING_MM * 512  # the side of the 512 x 512 PNGs, about 43 cm


def _stack(samples: list[LungSample], size: int, stretch: bool = True,
           soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([load_gray(s.image_path, size) for s in samples])
    if stretch:
        images = np.stack([stretch_contrast(x) for x in images])
    masks = np.stack([load_mask(s.mask_path, size, soft) for s in samples])[:, None]
    return torch.from_numpy(images[:, None]), torch.from_numpy(masks)


def dense_validation(samples: list[LungSample], size: int, seed: int,
                     soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images again, each with one seeded random dense disease: model selection then rewards
    whole lungs on opaque films as much as on clear ones."""
    rng = np.random.default_rng([seed, 0xDE5E])
    spacing = FILM_WIDTH_MM / size
    images, masks = [], []
    for s in samples:
        mask = load_mask(s.mask_path, size, soft)
        painted = paint_dense_disease(load_gray(s.image_path, size), mask > 0.5, random_spec(rng, spacing)).image
        images.append(stretch_contrast(painted))
        masks.append(mask)
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(masks)[:, None])


def dense_then_stretch(images: torch.Tensor, masks: torch.Tensor, fraction: float,
                       rng: np.random.Generator, size: int) -> torch.Tensor:
    """Training-time preparation of raw (unstretched) images: dense disease on ``fraction`` of them, then the model
    input's contrast standardisation (as inference does: the disease is in the film before the stretch)."""
    raw = images[:, 0].cpu().numpy()
    if fraction > 0:
        raw = paint_batch(raw, masks[:, 0].cpu().numpy(), fraction, rng, FILM_WIDTH_MM / size)
    stretched = np.stack([stretch_contrast(x) for x in raw])[:, None]
    return torch.from_numpy(stretched).to(images.device)


@torch.no_grad()
def test_report(model: UNet, samples: list[LungSample], size: int, device: torch.device) -> dict:
    """Dice and IoU per image on the masks' own 512 x 512 grid, raw threshold and after post-processing."""
    model.eval()
    per_source: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        image = torch.from_numpy(stretch_contrast(load_gray(s.image_path, size)))[None, None].to(device)
        prob_small = torch.sigmoid(model(image)).float()
        truth = load_mask(s.mask_path) > 0.5
        prob = F.interpolate(prob_small, size=truth.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        # The same path as inference (ai.segment): post-processing at model size, then resampled to the mask's grid.
        labels = labels_on_source(prob_small[0, 0].cpu().numpy(), Letterbox.fit(truth.shape, size))
        d_raw, i_raw = dice_iou(prob > 0.5, truth)
        d_pp, i_pp = dice_iou(labels > 0, truth)
        entry: dict[str, list[Any]] = per_source.setdefault(
            s.source, {"dice_raw": [], "iou_raw": [], "dice": [], "iou": [], "files": []})
        entry["dice_raw"].append(d_raw)
        entry["iou_raw"].append(i_raw)
        entry["dice"].append(d_pp)
        entry["iou"].append(i_pp)
        entry["files"].append(s.file)
    report = {}
    for source, e in sorted(per_source.items()):
        worst = int(np.argmin(e["dice"]))
        report[source] = {
            "n": len(e["dice"]),
            "dice_mean": float(np.mean(e["dice"])), "dice_worst": float(np.min(e["dice"])),
            "iou_mean": float(np.mean(e["iou"])), "iou_worst": float(np.min(e["iou"])),
            "dice_mean_before_postprocessing": float(np.mean(e["dice_raw"])),
            "worst_file": e["files"][worst],
        }
    all_dice = [d for e in per_source.values() for d in e["dice"]]
    all_iou = [d for e in per_source.values() for d in e["iou"]]
    report["all"] = {"n": len(all_dice), "dice_mean": float(np.mean(all_dice)), "dice_worst": float(np.min(all_dice)),
                     "iou_mean": float(np.mean(all_iou)), "iou_worst": float(np.min(all_iou))}
    return report


def export_weights(model: UNet, path: Path, size: int, version: str, metrics: dict, split_seed: int) -> None:
    """The shipped file (``ai.checkpoint``): half-precision weights plus what is needed to rebuild and describe
    the model."""
    checkpoint.save(path, model.state_dict(), {
        "name": MODEL_NAME, "version": version, "architecture": "unet", "base_width": model.base_width,
        "depth": model.depth, "input_size": size, "split_seed": split_seed, "test_metrics": metrics,
    }, required=checkpoint.SEGMENTER_FIELDS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="cxr-lung-masks folder (default: shared data)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, history, report")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--base-width", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="learning rate per epoch: constant, or half a cosine from --lr down to 2 %% of it")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--init", type=Path, help="start from this checkpoint (e.g. a lower-resolution run)")
    parser.add_argument("--limit", type=int, default=0, help="use only this many images per split (smoke runs)")
    parser.add_argument("--export", type=Path, help="write the shipped weights file here")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--dense-fraction", type=float, default=0.5,
                        help="share of training images per batch painted with synthetic dense disease (0 = none)")
    parser.add_argument("--soft-masks", action="store_true",
                        help="train on the masks' resized grey level instead of thresholded 0/1 masks, so that "
                             "the boundary keeps its sub-pixel position (validation still scores Dice at 0.5)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: float16 autocast on CUDA, float32 on CPU; bf16: bfloat16 autocast "
                             "(fast on CPUs with AMX or AVX-512 BF16)")
    parser.add_argument("--loss", choices=sorted(SEGMENTATION_LOSSES), default="dice_bce",
                        help="dice_bce (how the shipped weights were trained), or the per-image Lovasz hinge, alone "
                             "or + 0.5 BCE, to fine-tune for per-image overlap")
    parser.add_argument("--exclude-heart-masks", action="store_true",
                        help="leave out of training and validation the films whose mask holds the heart shadow "
                             "(train.mask_convention: the other convention); the test split is kept whole")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def prepare_split(data: Path | None, seed: int, limit: int, out: Path,
                  exclude_heart_masks: bool = False) -> dict[str, list[LungSample]]:
    """The seeded train / validation / test split (``limit`` images per part at most), recorded in split.json;
    with ``exclude_heart_masks`` the training and validation films whose mask follows the other convention behind
    the heart are left out (listed under "excluded"), the test split stays whole and comparable."""
    split = stratified_split(read_lung_masks(data), seed)
    if limit:
        split = {k: v[:limit] for k, v in split.items()}
    record: dict[str, list[str]] = {}
    if exclude_heart_masks:
        holds = {s.file for part in ("train", "val") for s in split[part]
                 if includes_heart(*film_and_mask(s.image_path, s.mask_path))}
        record["excluded"] = sorted(holds)
        split = {k: (v if k == "test" else [s for s in v if s.file not in holds]) for k, v in split.items()}
    out.mkdir(parents=True, exist_ok=True)
    record = {**{k: [s.file for s in v] for k, v in split.items()}, **record}
    (out / "split.json").write_text(json.dumps(record, indent=1))
    return split


def initial_model(base_width: int, init: Path | None) -> UNet:
    """A new U-Net, or one starting from ``init``: a training run's best.pt / last.pt or a shipped model file."""
    model = UNet(base_width=base_width)
    if init:
        state = checkpoint.read(init)
        model.load_state_dict(checkpoint.to_float(state.get("state_dict") or state["model"]))
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = seed_everything(args.seed)
    split = prepare_split(args.data, args.seed, args.limit, args.out, args.exclude_heart_masks)
    train_x, train_y = _stack(split["train"], args.size, stretch=False, soft=args.soft_masks)
    val_x, val_y = _stack(split["val"], args.size, soft=args.soft_masks)
    if args.dense_fraction > 0:
        dense_x, dense_y = dense_validation(split["val"], args.size, args.seed, args.soft_masks)
        val_x, val_y = torch.cat([val_x, dense_x]), torch.cat([val_y, dense_y])
    dense_rng = np.random.default_rng([args.seed, 0xD7A1])

    def train_transform(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dense_then_stretch(x, y, args.dense_fraction, dense_rng, args.size)
        return augment_pair(x, y, aug, generator if x.device.type == "cpu" else None,
                            mask_mode="bilinear" if args.soft_masks else "nearest")
    model = initial_model(args.base_width, args.init)
    aug = AugmentConfig()
    cfg = FitConfig(epochs=args.epochs, lr=args.lr, patience=args.patience, device=args.device, seed=args.seed,
                    out_dir=args.out, progress=not args.no_progress, lr_schedule=args.lr_schedule,
                    precision=args.precision)
    started = time.perf_counter()
    history = fit(
        model,
        train_batches=lambda epoch: tensor_batches(train_x, train_y, args.batch_size, shuffle_seed=args.seed + epoch),
        val_batches=lambda: tensor_batches(val_x, val_y, 16),
        loss_fn=SEGMENTATION_LOSSES[args.loss],
        score_fn=batch_dice,
        cfg=cfg,
        train_transform=train_transform,
        extra_state={"base_width": args.base_width, "input_size": args.size},
    )
    train_seconds = round(time.perf_counter() - started, 1)
    report = run_report(model, args, split, history, aug, train_seconds)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["test"], indent=2))
    if args.export:
        export_weights(model.cpu(), args.export, args.size, args.version, report["test"], args.seed)
        print(f"weights written to {args.export}")
    return 0


def run_report(model: UNet, args: argparse.Namespace, split: dict[str, list[LungSample]], history: History,
               aug: AugmentConfig, train_seconds: float) -> dict:
    """report.json: the run's settings, its training outcome and the test split's Dice and IoU."""
    return {
        "model": MODEL_NAME, "version": args.version, "input_size": args.size, "base_width": args.base_width,
        "seed": args.seed, "split_sizes": {k: len(v) for k, v in split.items()},
        "best_epoch": history.best_epoch, "val_dice": history.best_score, "epochs_run": len(history.epochs),
        "train_seconds": train_seconds, "device": str(resolve_device(args.device)),
        "augmentation": asdict(aug), "dense_fraction": args.dense_fraction,
        "validation": "clean + dense copies" if args.dense_fraction > 0 else "clean",
        "init": str(args.init) if args.init else None,
        "lr": args.lr, "lr_schedule": args.lr_schedule, "precision": args.precision,
        "soft_masks": args.soft_masks, "loss": args.loss, "exclude_heart_masks": args.exclude_heart_masks,
        "test": test_report(model, split["test"], args.size, resolve_device(args.device)),
    }


if __name__ == "__main__":
    raise SystemExit(main())
