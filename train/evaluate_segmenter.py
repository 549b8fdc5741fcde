"""Held-out evaluation of lung-field U-Nets through the node's own inference path, on clear and dense lungs.

    python -m train.evaluate_segmenter --model ai/models/lung_unet.pt [--model OTHER.pt ...] --out runs/seg-eval

For each model file (``ai.segment.LungSegmenter``: letterbox, contrast standardisation, U-Net, post-processing,
labels on the 512 x 512 mask grid) and the seeded test split of ``train.segmenter`` (seed 2026, never trained on):

1. ``clean``: Dice per source on the test films as they are.
2. ``dense``: every test film with each of the 11 dense-disease grades of ``train.dense_disease`` (the side cycling
   both / right / left), Dice against the WHOLE true lung, and whether the input check (``ai.input_check``) accepts
   the chest.
3. ``input_check``: every test film with small opacities of category 2 and 3 (``train.synthetic_opacities``) and
   with large opacities A, B and C on both lungs and on each side alone: the share accepted (goal: all).
4. ``films``: all 704 films of the shared set as they are (most were trained on): the input check's acceptance;
   and the tuberculosis films among them (held-out ones flagged) ranked by ``train.dense_disease.opaque_fraction``,
   Dice per decile of that fraction, the top decile being the densest 10 %.
5. ``retrocardiac``: the share of the predicted lung area lying in the cardiac and mediastinal band of the truth
   (between the two true lungs, row by row, in the lower half of their extent), for the clean and the dense films.
   The training masks follow the convention "lung field = aerated lung outside the heart and mediastinum" (the
   retrocardiac lung is excluded), so that share is 0 in the truth and should stay near 0 in the prediction.
6. ``mask_convention``: which masks hold the heart shadow (``train.mask_convention``, the other convention behind
   the heart; about one Shenzhen mask in ten), and every clean and densest-decile Dice again on the masks that
   follow the node's convention and on those that do not, so that a model is not read as missing lung where the
   truth drew the heart.
7. ``dicom_samples``: the real DICOM chests and non-chests of the shared samples (``dicom-samples/chest`` and
   ``not-chest``) through the image check alone, with their measurements; ``measurement_ranges`` gives each input
   check measurement's range over every chest above, for re-deriving the thresholds (``ai/input_check.py``).

Every mean Dice comes with its bootstrap 95 % interval (``dice_ci95``). With several models, each one after the first
also gets its paired per-image Dice differences from the first, with their interval (``against_<first>``): the
test split holds 71 films and the densest decile 34, so a difference of a few thousandths can be the draw of films.

Writes ``report.json`` and ``rows.json`` in --out and prints a Markdown table. Each image is painted once and
segmented by every model given; the ~2,000 images take about 20 minutes for two models on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.input_check import check_lung_fields
from ai.lungs import LEFT_LUNG, RIGHT_LUNG, postprocess_probability
from ai.normalise import NormalisedImage, normalise
from ai.segment import LungSegmenter

from .datasets import LungSample, data_dir, load_mask, read_lung_masks, stratified_split
from .dense_disease import DENSE_KINDS, GRADES, SIDES, DenseSpec, opaque_fraction, paint_dense_disease
from .losses import dice_iou
from .mask_convention import HEART_INCLUDED, heart_in_mask, holds_heart
from .metrics import mean_interval
from .synthetic_opacities import DEFAULT_PIXEL_SPACING_MM, OpacitySpec, insert_opacities

SPLIT_SEED = 2026
DENSE_GRADES = tuple((kind, grade) for kind in DENSE_KINDS for grade in GRADES[kind])
CHECK_CASES = (("small", "2", "both"), ("small", "3", "both")) + tuple(
    ("large_opacity", grade, side) for grade in GRADES["large_opacity"] for side in SIDES)


@dataclass(frozen=True)
class Case:
    """One image to segment: where it came from, what was painted, and its true (whole-lung) mask."""

    file: str
    source: str
    finding: str  # normal | tuberculosis; "" for the DICOM samples
    part: str  # train | val | test
    variant: str  # "clean", "<kind> <grade> <side>" or "small <category> both"
    pixels: np.ndarray
    truth: np.ndarray | None  # None: a DICOM sample without a mask (judged by the input check only)
    opaque: float  # train.dense_disease.opaque_fraction of the (painted) film
    heart_in_mask: float | None = None  # train.mask_convention.heart_in_mask of the clean film and its mask


def _seed(file: str, k: int) -> int:
    return int(np.random.SeedSequence([SPLIT_SEED, k, *file.encode()]).generate_state(1)[0])


def _film(sample: LungSample) -> tuple[np.ndarray, np.ndarray]:
    image = normalise(sample.image_path).pixels
    return image, load_mask(sample.mask_path) > 0.5


def clean_cases(samples: Iterable[LungSample], parts: dict[str, str]) -> Iterator[Case]:
    for s in samples:
        image, truth = _film(s)
        yield Case(s.file, s.source, s.finding, parts[s.file], "clean", image, truth, opaque_fraction(image, truth),
                   heart_in_mask(image, truth))


def dense_cases(samples: Iterable[LungSample]) -> Iterator[Case]:
    for s in samples:
        image, truth = _film(s)
        heart = heart_in_mask(image, truth)
        for k, (kind, grade) in enumerate(DENSE_GRADES):
            side = SIDES[k % len(SIDES)]
            painted = paint_dense_disease(image, truth, DenseSpec(kind, side, grade, seed=_seed(s.file, k))).image
            yield Case(s.file, s.source, s.finding, "test", f"{kind} {grade} {side}", painted, truth,
                       opaque_fraction(painted, truth), heart)


def check_cases(samples: Iterable[LungSample]) -> Iterator[Case]:
    for s in samples:
        image, truth = _film(s)
        for k, (kind, grade, side) in enumerate(CHECK_CASES):
            seed = _seed(s.file, 100 + k)
            if kind == "small":
                painted = insert_opacities(image, truth, OpacitySpec(int(grade), seed=seed))[0]
            else:
                painted = paint_dense_disease(image, truth, DenseSpec(kind, side, grade, seed=seed)).image
            yield Case(s.file, s.source, s.finding, "test", f"{kind} {grade} {side}", painted, truth,
                       opaque_fraction(painted, truth))


def dicom_cases(folder: Path, group: str) -> Iterator[Case]:
    """The DICOM samples of a folder, as the node decodes and normalises them; no mask."""
    for path in sorted(folder.glob("*.dcm")):
        yield Case(path.name, group, "", "sample", "clean", normalise(path).pixels, None, 0.0)


def cardiac_band(truth_right: np.ndarray, truth_left: np.ndarray) -> np.ndarray:
    """Row by row, the columns strictly between the two true lungs, in the lower half of their joint extent."""
    band = np.zeros(truth_right.shape, bool)
    rows = np.nonzero(truth_right.any(axis=1) | truth_left.any(axis=1))[0]
    if rows.size == 0:
        return band
    middle = (rows[0] + rows[-1]) // 2
    for r in range(middle, rows[-1] + 1):
        right_cols, left_cols = np.nonzero(truth_right[r])[0], np.nonzero(truth_left[r])[0]
        if right_cols.size and left_cols.size and right_cols.max() + 1 < left_cols.min():
            band[r, right_cols.max() + 1:left_cols.min()] = True
    return band


def truth_sides(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true mask's right and left lung, told apart as the node's post-processing tells its own fields apart."""
    labels = postprocess_probability(truth.astype(np.float32))
    return labels == RIGHT_LUNG, labels == LEFT_LUNG


def segment_cases(segmenters: dict[str, LungSegmenter], cases: Iterable[Case], batch: int = 8) -> dict[str, list]:
    """Per model: Dice, input check and retrocardiac share per case (each case is painted once for all models, and
    dropped once measured)."""
    rows: dict[str, list[dict]] = {name: [] for name in segmenters}
    pending: list[Case] = []

    def flush() -> None:
        images = [NormalisedImage(c.pixels, None, "png", ["picture"]) for c in pending]
        bands = [None if c.truth is None else cardiac_band(*truth_sides(c.truth)) for c in pending]
        for name, segmenter in segmenters.items():
            for case, band, seg in zip(pending, bands, segmenter.segment(images), strict=True):
                predicted = seg.labels > 0
                check = check_lung_fields(seg.labels, seg.confidence)
                row = {"file": case.file, "source": case.source, "finding": case.finding, "part": case.part,
                       "variant": case.variant,
                       "opaque": round(case.opaque, 4), "accepted": check.accepted, "reason": check.reason,
                       "heart_in_mask": None if case.heart_in_mask is None else round(case.heart_in_mask, 4),
                       "measurements": {k: round(float(v), 4) for k, v in check.measurements.items()}}
                if case.truth is not None and band is not None:
                    row["dice"] = round(dice_iou(predicted, case.truth)[0], 4)
                    row["retrocardiac"] = round(float(np.count_nonzero(predicted & band))
                                                / max(int(predicted.sum()), 1), 4)
                rows[name].append(row)
        pending.clear()

    for case in cases:
        pending.append(case)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return rows


def summarise(rows: list[dict]) -> dict:
    def stats(sel: list[dict]) -> dict:
        dice = [r["dice"] for r in sel]
        return {"n": len(sel), "dice_mean": round(float(np.mean(dice)), 4) if dice else None,
                "dice_ci95": [round(v, 4) for v in mean_interval(dice)[1:]] if dice else None,
                "dice_worst": round(float(np.min(dice)), 4) if dice else None,
                "accepted": sum(r["accepted"] for r in sel),
                "retrocardiac_mean": round(float(np.mean([r["retrocardiac"] for r in sel])), 4) if sel else None}

    out: dict[str, Any] = {}
    clean = [r for r in rows if r["group"] == "clean"]
    out["clean"] = {source: stats([r for r in clean if r["source"] == source]) for source in ("montgomery", "shenzhen")}
    out["clean"]["all"] = stats(clean)
    out["clean"].update(by_convention(clean, stats))
    dense = [r for r in rows if r["group"] == "dense"]
    out["dense"] = {f"{k} {g}": stats([r for r in dense if r["variant"].startswith(f"{k} {g} ")])
                    for k, g in DENSE_GRADES}
    out["dense"]["all"] = stats(dense)
    checks = [r for r in rows if r["group"] == "input_check"]
    out["input_check"] = {" ".join(c): stats([r for r in checks if r["variant"] == " ".join(c)]) for c in CHECK_CASES}
    out["input_check"]["all"] = stats(checks)
    out["input_check"]["refused"] = [f'{r["file"]} {r["variant"]}: {r["reason"]}' for r in checks if not r["accepted"]]
    films = [r for r in rows if r["group"] == "films"]
    out["films"] = {"n": len(films), "accepted": sum(r["accepted"] for r in films),
                    "refused": [f'{r["file"]}: {r["reason"]}' for r in films if not r["accepted"]]}
    tb = sorted((r for r in films if r["finding"] == "tuberculosis"), key=lambda r: r["opaque"])
    deciles = np.array_split(np.arange(len(tb)), 10) if tb else []
    out["tuberculosis"] = {
        "rule": "train.dense_disease.opaque_fraction; deciles of all tuberculosis films, 10 = densest",
        "deciles": [dict(stats([tb[i] for i in idx]), decile=d + 1,
                         opaque_range=[tb[idx[0]]["opaque"], tb[idx[-1]]["opaque"]],
                         held_out=sum(tb[i]["part"] != "train" for i in idx))
                    for d, idx in enumerate(deciles) if len(idx)],
        "densest_held_out": stats([tb[i] for i in deciles[-1] if tb[i]["part"] != "train"]) if tb else {},
        "densest_by_convention": by_convention([tb[i] for i in deciles[-1]], stats) if tb else {},
        "heart_included_per_decile": [sum(_holds_heart(tb[i]) for i in idx) for idx in deciles if len(idx)],
        # the densest tenth drawn again among the films whose mask follows the convention alone
        "densest_of_heart_excluded": stats(densest_tenth([r for r in tb if not _holds_heart(r)])) if tb else {},
        "densest_files": [tb[i]["file"] for i in deciles[-1]] if tb else [],
    }
    out["held_out_files"] = sorted({r["file"] for r in films if r["part"] != "train"})
    out["mask_convention"] = {
        "rule": f"train.mask_convention.heart_in_mask > {HEART_INCLUDED}: the mask holds the heart shadow",
        "heart_included": {source: sum(_holds_heart(r) for r in films if r["source"] == source)
                           for source in ("montgomery", "shenzhen")},
        "films": {source: sum(r["source"] == source for r in films) for source in ("montgomery", "shenzhen")}}
    samples = [r for r in rows if r["group"] in ("dicom_chest", "not_chest")]
    out["dicom_samples"] = {f'{r["group"]} {r["file"]}': {"accepted": r["accepted"], "reason": r["reason"],
                                                          **r["measurements"]} for r in samples}
    chests = [r for r in rows if r["group"] in ("clean", "dense", "input_check", "films", "dicom_chest")]
    keys = sorted({k for r in chests for k in r["measurements"]})
    out["measurement_ranges"] = {k: [min(r["measurements"][k] for r in chests if k in r["measurements"]),
                                     max(r["measurements"][k] for r in chests if k in r["measurements"])]
                                 for k in keys}
    return out


def densest_tenth(ranked: list[dict]) -> list[dict]:
    """The last of ten near-equal parts of rows sorted by opaque fraction, as the deciles are cut."""
    return [ranked[i] for i in np.array_split(np.arange(len(ranked)), 10)[-1]] if ranked else []


def _holds_heart(row: dict) -> bool:
    return holds_heart(row.get("heart_in_mask"))


def by_convention(rows: list[dict], stats) -> dict:  # noqa: ANN001
    """The same statistics on the films whose mask follows the node's convention behind the heart and on those
    whose mask holds the heart shadow (``train.mask_convention``): a model that follows the convention is scored
    against the other one on the second group."""
    return {"heart_excluded": stats([r for r in rows if not _holds_heart(r)]),
            "heart_included": stats([r for r in rows if _holds_heart(r)])}


def evaluate(models: dict[str, Path], data: Path | None, limit: int = 0) -> tuple[dict, dict[str, list]]:
    segmenters = {name: LungSegmenter(path, torch.device("cpu")) for name, path in models.items()}
    samples = read_lung_masks(data)
    split = stratified_split(samples, SPLIT_SEED)
    parts = {s.file: part for part, members in split.items() for s in members}
    test = split["test"][:limit] if limit else split["test"]
    films = samples[::max(1, len(samples) // limit)] if limit else samples
    dicom = (data or data_dir() / "cxr-lung-masks").parent / "dicom-samples"
    rows: dict[str, list[dict]] = {name: [] for name in models}
    started = time.perf_counter()
    for group, cases in (("clean", clean_cases(test, parts)), ("dense", dense_cases(test)),
                         ("input_check", check_cases(test)), ("films", clean_cases(films, parts)),
                         ("dicom_chest", dicom_cases(dicom / "chest", "dicom_chest")),
                         ("not_chest", dicom_cases(dicom / "not-chest", "not_chest"))):
        for name, measured in segment_cases(segmenters, cases).items():
            rows[name] += [dict(row, group=group) for row in measured]
    seconds = round(time.perf_counter() - started, 1)
    reports = {name: {"model": str(models[name]), "version": segmenters[name].info.version,
                      "split_seed": SPLIT_SEED, "pixel_spacing_mm": DEFAULT_PIXEL_SPACING_MM, "seconds": seconds,
                      **summarise(rows[name])} for name in models}
    names = list(models)
    for name in names[1:]:
        reports[name]["against_" + names[0]] = paired_differences(
            rows[name], rows[names[0]], reports[names[0]]["tuberculosis"]["densest_files"])
    return reports, rows


def paired_differences(rows: list[dict], reference: list[dict], densest_files: list[str]) -> dict:
    """Mean per-image Dice difference of one model from another on the same cases (this one minus the reference),
    with its bootstrap 95 % interval: on the clean test films, the painted dense ones and the densest tuberculosis
    decile. A goal missed by less than the interval's half-width is not shown to be missed by the model rather than
    by the draw of held-out films, and a gain inside it is not shown either."""
    def differences(keep) -> list[float]:  # noqa: ANN001
        pairs = [(a, b) for a, b in zip(rows, reference, strict=True) if keep(b)]
        for a, b in pairs:
            if (a["group"], a["file"], a.get("variant")) != (b["group"], b["file"], b.get("variant")):
                raise ValueError("the two models' rows are not the same cases")
        return [a["dice"] - b["dice"] for a, b in pairs]

    densest = set(densest_files)
    out = {}
    for key, keep in (("clean", lambda r: r["group"] == "clean"), ("dense", lambda r: r["group"] == "dense"),
                      ("densest_decile", lambda r: r["group"] == "films" and r["file"] in densest),
                      ("clean_heart_excluded", lambda r: r["group"] == "clean" and not _holds_heart(r)),
                      ("densest_decile_heart_excluded",
                       lambda r: r["group"] == "films" and r["file"] in densest and not _holds_heart(r))):
        diffs = differences(keep)
        if diffs:
            mean, low, high = mean_interval(diffs)
            out[key] = {"n": len(diffs), "mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
    return out


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(reports: dict[str, dict]) -> str:
    names = list(reports)
    lines = ["| measure | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]

    def row(label: str, get) -> None:
        lines.append(f"| {label} | " + " | ".join(get(reports[n]) for n in names) + " |")

    for source in ("montgomery", "shenzhen", "all"):
        row(f"clean {source}: mean / worst Dice (n)", lambda r, s=source: (
            f'{_f(r["clean"][s]["dice_mean"])} / {_f(r["clean"][s]["dice_worst"])} ({r["clean"][s]["n"]})'))
    for key in [f"{k} {g}" for k, g in DENSE_GRADES] + ["all"]:
        row(f"dense {key}: mean / worst Dice, accepted", lambda r, k=key: (
            f'{_f(r["dense"][k]["dice_mean"])} / {_f(r["dense"][k]["dice_worst"])}, '
            f'{r["dense"][k]["accepted"]}/{r["dense"][k]["n"]}'))
    for key in [" ".join(c) for c in CHECK_CASES] + ["all"]:
        row(f"input check {key}: accepted", lambda r, k=key: f'{r["input_check"][k]["accepted"]}/'
                                                              f'{r["input_check"][k]["n"]}')
    for d in range(10):
        row(f"tuberculosis decile {d + 1}: opaque range, mean Dice (held out)", lambda r, d=d: (
            "{0[0]:.2f}-{0[1]:.2f}, {1:.3f} ({2})".format(r["tuberculosis"]["deciles"][d]["opaque_range"],
                                                      r["tuberculosis"]["deciles"][d]["dice_mean"],
                                                      r["tuberculosis"]["deciles"][d]["held_out"])
            if d < len(r["tuberculosis"]["deciles"]) else "-"))
    for key, label in (("heart_excluded", "masks that follow the convention behind the heart"),
                       ("heart_included", "masks that hold the heart shadow")):
        row(f"clean, {label}: mean Dice (n)", lambda r, k=key: (
            f'{_f(r["clean"][k]["dice_mean"])} ({r["clean"][k]["n"]})'))
        row(f"densest decile, {label}: mean Dice (n)", lambda r, k=key: (
            f'{_f(r["tuberculosis"]["densest_by_convention"][k]["dice_mean"])} '
            f'({r["tuberculosis"]["densest_by_convention"][k]["n"]})' if r["tuberculosis"]["deciles"] else "-"))
    row("densest tenth of the tuberculosis films whose mask follows the convention: mean Dice (n)", lambda r: (
        f'{_f(r["tuberculosis"]["densest_of_heart_excluded"]["dice_mean"])} '
        f'({r["tuberculosis"]["densest_of_heart_excluded"]["n"]})' if r["tuberculosis"]["deciles"] else "-"))
    row("tuberculosis deciles 1-10: masks holding the heart shadow", lambda r: " ".join(
        str(n) for n in r["tuberculosis"]["heart_included_per_decile"]))
    row("clean all: 95 % interval of the mean Dice (bootstrap)", lambda r: "{:.4f}-{:.4f}".format(
        *r["clean"]["all"]["dice_ci95"]))
    row("densest decile: 95 % interval of the mean Dice (bootstrap)", lambda r: "{:.4f}-{:.4f}".format(
        *r["tuberculosis"]["deciles"][-1]["dice_ci95"]) if r["tuberculosis"]["deciles"] else "-")
    first = names[0]
    for key in ("clean", "dense", "densest_decile", "clean_heart_excluded", "densest_decile_heart_excluded"):
        row(f"{key}: paired Dice difference from {first} (95 % interval)", lambda r, k=key: (
            "{mean:+.4f} ({ci95[0]:+.4f} to {ci95[1]:+.4f})".format(**r[f"against_{first}"][k])
            if k in r.get(f"against_{first}", {}) else "-"))
    row("densest decile, held-out films only: mean Dice (n)", lambda r: (
        f'{r["tuberculosis"]["densest_held_out"].get("dice_mean") or 0:.3f} '
        f'({r["tuberculosis"]["densest_held_out"].get("n", 0)})'))
    row("all 704 shared films (mostly trained on): accepted by the input check", lambda r: (
        f'{r["films"]["accepted"]}/{r["films"]["n"]}'))
    row("DICOM samples: accepted chests / refused non-chests", lambda r: "{}/{} / {}/{}".format(
        sum(v["accepted"] for k, v in r["dicom_samples"].items() if k.startswith("dicom_chest")),
        sum(k.startswith("dicom_chest") for k in r["dicom_samples"]),
        sum(not v["accepted"] for k, v in r["dicom_samples"].items() if k.startswith("not_chest")),
        sum(k.startswith("not_chest") for k in r["dicom_samples"])))
    row("retrocardiac share of predicted lung: clean / dense", lambda r: (
        f'{100 * r["clean"]["all"]["retrocardiac_mean"]:.2f} % / {100 * r["dense"]["all"]["retrocardiac_mean"]:.2f} %'))
    return "\n".join(lines)


FIGURE_SPECS = (DenseSpec("large_opacity", "both", "C", seed=31), DenseSpec("consolidation", "right", "extensive",
                                                                          seed=32),
                DenseSpec("pleural", "left", "effusion", seed=33))
COLOURS = ("tab:red", "tab:cyan", "tab:green")


def figure(models: dict[str, Path], report: dict, data: Path | None, out_png: Path) -> None:
    """Truth (orange, dashed) and each model's fields on painted held-out films and the densest held-out
    tuberculosis films."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ai.normalise import stretch_contrast

    samples = {s.file: s for s in read_lung_masks(data)}
    test = [s for s in stratified_split(list(samples.values()), SPLIT_SEED)["test"] if s.finding == "normal"]
    panels = []
    for spec, sample in zip(FIGURE_SPECS, test[::7], strict=False):
        image, truth = _film(sample)
        panels.append((f"{sample.file}\n{spec.kind} {spec.grade}, {spec.side}",
                       paint_dense_disease(image, truth, spec).image, truth))
    first = next(iter(report.values()))
    held_out_dense = [f for f in first["tuberculosis"]["densest_files"] if f in set(first["held_out_files"])]
    for file in held_out_dense[:3]:
        image, truth = _film(samples[file])
        panels.append((f"{file}\ntuberculosis, densest decile", image, truth))
    segmenters = {name: LungSegmenter(path, torch.device("cpu")) for name, path in models.items()}
    predictions = {name: seg.segment([NormalisedImage(p[1], None, "png", ["picture"]) for p in panels])
                   for name, seg in segmenters.items()}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.6))
    for i, (ax, (title, image, truth)) in enumerate(zip(np.atleast_1d(axes), panels, strict=True)):
        ax.imshow(stretch_contrast(image), cmap="gray", vmin=0, vmax=1)
        ax.contour(truth, levels=[0.5], colors="orange", linewidths=1.0, linestyles="dashed")
        dice = []
        for colour, name in zip(COLOURS, models, strict=False):
            predicted = predictions[name][i].labels > 0
            ax.contour(predicted, levels=[0.5], colors=colour, linewidths=0.9)
            dice.append(f"{name} {dice_iou(predicted, truth)[0]:.3f}")
        ax.set_title(f"{title}\nDice " + ", ".join(dice), fontsize=7)
        ax.axis("off")
    legend = ", ".join(f"{c.split(':')[1]}: {n}" for c, n in zip(COLOURS, models, strict=False))
    fig.suptitle(f"Lung fields on dense lungs. Orange dashed: the true lung; {legend}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="a lung U-Net file (repeatable)")
    parser.add_argument("--name", action="append", default=[], help="column name per --model (default: file name)")
    parser.add_argument("--data", type=Path, default=None, help="cxr-lung-masks folder (default: shared data)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=0, help="only this many test and tuberculosis films (smoke)")
    parser.add_argument("--figure", type=Path, help="also draw the models' fields on dense films into this PNG")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [args.name[i] if i < len(args.name) else m.name for i, m in enumerate(args.model)]
    reports, rows = evaluate(dict(zip(names, args.model, strict=True)), args.data, args.limit)
    (args.out / "rows.json").write_text(json.dumps(rows))
    (args.out / "report.json").write_text(json.dumps(reports, indent=1, default=str))
    if args.figure:
        figure(dict(zip(names, args.model, strict=True)), reports, args.data, args.figure)
    print(markdown(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
