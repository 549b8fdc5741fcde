"""Which convention a lung mask follows behind the heart: a model-free test on the film and its mask.

The node's lung fields exclude the lung behind the heart (docs/analysis.md, "What a lung field is"), as most of the
Montgomery and Shenzhen masks do: the left field's medial border follows the heart border. About one Shenzhen mask
in ten does not: it runs the left field's medial border straight down beside the spine, so the heart shadow lies
inside the mask. Scored against such a mask, a model that follows the convention loses 0.1-0.3 of Dice on that film,
and a ranking by "opaque fraction inside the true mask" (``train.dense_disease.opaque_fraction``) takes the heart
shadow for disease, so those masks crowd the densest decile (docs/analysis.md gives the counts).

The test: in the lower part of the mask's left field (patient's left, the image's right), the medial strip of each
row is as bright as the film's soft tissue when the mask holds the heart, and clearly darker (aerated lung beside
the heart border) when it follows the border. ``heart_in_mask`` is that strip's mean brightness on the scale from
aerated lung (0: the 20th percentile inside the mask) to soft tissue (1: ``soft_tissue_level``). Over the 704
shared masks (``python -m train.mask_convention``) its distribution has two modes, around 0.25 for the masks that
follow the border and around 0.85 for those that hold the heart, with no mask between 0.65 and 0.70;
``HEART_INCLUDED`` sits at that gap's lower edge. Near it the test is not exact: 33 masks score 0.45-0.65, of both
kinds by eye. Dense disease in the left lower lobe's medial part can also light the strip; the test is for
evaluating and training on the public masks, not for the node's input. A site that labels its own archive can run
it on its masks before retraining (``--data`` a folder laid out as ``cxr-lung-masks``): two annotators who draw
the heart differently teach the model both conventions.

    python -m train.mask_convention [--data DIR] --out runs/mask-convention [--figure docs/figures/mask_convention.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ai.lungs import LEFT_LUNG, postprocess_probability

from .dense_disease import soft_tissue_level

HEART_INCLUDED = 0.65  # strip brightness above which the mask is taken to hold the heart shadow (see above)
LOWER_PART = (0.5, 0.9)  # rows of the left field, as fractions of its height from the apex
MEDIAL_SHARE = 0.15  # the strip: this share of the field's width in each row, from its medial edge
MIN_ROW_WIDTH = 10  # pixels; narrower rows (the costophrenic tip) are skipped


def left_field(mask: np.ndarray) -> np.ndarray:
    """The mask's left lung, told apart from the right one as the node tells its own fields apart
    (``ai.lungs.postprocess_probability``: the two largest components, named by side)."""
    return postprocess_probability(np.asarray(mask, np.float32)) == LEFT_LUNG


def strip_rows(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, first column, last column + 1) of each medial strip that ``heart_in_mask`` measures."""
    left = left_field(mask)
    rows = np.nonzero(left.any(axis=1))[0]
    if rows.size == 0:
        return []
    top, height = rows[0], rows[-1] - rows[0]
    out = []
    for r in range(int(top + LOWER_PART[0] * height), int(top + LOWER_PART[1] * height)):
        cols = np.nonzero(left[r])[0]
        if cols.size >= MIN_ROW_WIDTH:
            out.append((r, int(cols[0]), int(cols[0]) + max(3, int(MEDIAL_SHARE * cols.size))))
    return out


def heart_in_mask(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Brightness of the left field's lower medial strip, 0 = aerated lung, 1 = soft tissue; None without a field."""
    mask = np.asarray(mask, bool)
    img = np.asarray(image, np.float64)
    strips = [img[r, c0:c1].mean() for r, c0, c1 in strip_rows(mask)]
    if not strips:
        return None
    aerated = float(np.percentile(img[mask], 20))
    soft = soft_tissue_level(img, mask)
    if soft - aerated <= 1e-6:
        return None
    return float((np.mean(strips) - aerated) / (soft - aerated))


def holds_heart(score: float | None) -> bool:
    """The rule on a ``heart_in_mask`` score: above ``HEART_INCLUDED`` the mask holds the heart shadow."""
    return score is not None and score > HEART_INCLUDED


def includes_heart(image: np.ndarray, mask: np.ndarray) -> bool:
    """True when the mask's left field holds the heart shadow (the other convention)."""
    return holds_heart(heart_in_mask(image, mask))


def film_and_mask(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The normalised film and its mask on the film's grid (a site's masks need not share the film's size)."""
    from ai.normalise import normalise

    from .datasets import load_mask

    image = normalise(image_path).pixels
    return image, load_mask(mask_path, shape=image.shape) > 0.5


def score_masks(data: Path | None) -> dict[str, dict]:
    """Per film of a ``cxr-lung-masks`` folder: source, finding, ``heart_in_mask`` and whether it holds the heart."""
    from .datasets import read_lung_masks

    out: dict[str, dict] = {}
    for s in read_lung_masks(data):
        try:
            image, mask = film_and_mask(s.image_path, s.mask_path)
        except Exception as exc:  # noqa: BLE001 - one unreadable film or mask is reported, not fatal
            out[s.file] = {"source": s.source, "finding": s.finding, "heart_in_mask": None, "holds_heart": False,
                           "error": f"cannot read the film or its mask ({type(exc).__name__})"}
            continue
        score = heart_in_mask(image, mask)
        out[s.file] = {"source": s.source, "finding": s.finding,
                       "heart_in_mask": None if score is None else round(score, 4),
                       "holds_heart": holds_heart(score)}
    return out


def summary(scores: dict[str, dict]) -> dict:
    """Counts per source and the score's histogram (0.05 wide bins), to see the two modes and the gap."""
    sources = sorted({v["source"] for v in scores.values()})
    edges = np.round(np.arange(-0.4, 1.45, 0.05), 2)
    out: dict = {"rule": f"heart_in_mask > {HEART_INCLUDED}", "sources": {}}
    for source in sources:
        values = [v["heart_in_mask"] for v in scores.values()
                  if v["source"] == source and v["heart_in_mask"] is not None]
        out["sources"][source] = {
            "films": sum(v["source"] == source for v in scores.values()),
            "unreadable": sum("error" in v for v in scores.values() if v["source"] == source),
            "holds_heart": sum(v["holds_heart"] for v in scores.values() if v["source"] == source),
            "histogram": {f"{lo + 0.0:.2f}": int(n) for lo, n in zip(edges[:-1], np.histogram(values, bins=edges)[0],
                                                                 strict=True) if n}}
    return out


def figure(scores: dict[str, dict], data: Path | None, out_png: Path, per_row: int = 4) -> None:
    """The masks that score highest and lowest among the normal films, with the measured strips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ai.normalise import stretch_contrast

    from .datasets import read_lung_masks

    samples = {s.file: s for s in read_lung_masks(data)}
    normal = sorted((f for f, v in scores.items() if v["finding"] == "normal" and v["heart_in_mask"] is not None),
                    key=lambda f: scores[f]["heart_in_mask"])
    chosen = list(dict.fromkeys(normal[::-1][:per_row] + normal[len(normal) // 2:len(normal) // 2 + per_row]))
    fig, axes = plt.subplots(2, per_row, figsize=(2.6 * per_row, 6.6))
    for ax in axes.ravel()[len(chosen):]:
        ax.axis("off")  # a small folder: fewer films than panels
    for ax, file in zip(axes.ravel(), chosen, strict=False):
        image, mask = film_and_mask(samples[file].image_path, samples[file].mask_path)
        strip = np.zeros(mask.shape, bool)
        for r, c0, c1 in strip_rows(mask):
            strip[r, c0:c1] = True
        ax.imshow(stretch_contrast(image), cmap="gray", vmin=0, vmax=1)
        ax.contour(mask, levels=[0.5], colors="orange", linewidths=0.8)
        ax.contour(strip, levels=[0.5], colors="tab:cyan", linewidths=0.8)
        verdict = "holds the heart" if scores[file]["holds_heart"] else "follows the heart border"
        ax.set_title(f"{file}\n{scores[file]['heart_in_mask']:.2f}: {verdict}", fontsize=7)
        ax.axis("off")
    fig.suptitle("Lung masks behind the heart. Orange: the mask; cyan: the medial strip measured "
                 f"(soft tissue = 1, aerated lung = 0; > {HEART_INCLUDED}: holds the heart)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="cxr-lung-masks folder (default: shared data)")
    parser.add_argument("--out", type=Path, required=True, help="writes mask_convention.json here")
    parser.add_argument("--figure", type=Path, help="also draw examples of both conventions into this PNG")
    args = parser.parse_args(argv)
    scores = score_masks(args.data)
    report = {**summary(scores), "films": scores}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask_convention.json").write_text(json.dumps(report, indent=1))
    if args.figure:
        figure(scores, args.data, args.figure)
    for file, entry in scores.items():
        if "error" in entry:
            print(f"{file}: {entry['error']}; left out")
    for source, counts in report["sources"].items():
        print(f"{source}: {counts['holds_heart']} of {counts['films']} masks hold the heart shadow")
        print("  heart_in_mask histogram (bin start: films): "
              + ", ".join(f"{k}: {n}" for k, n in counts["histogram"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
