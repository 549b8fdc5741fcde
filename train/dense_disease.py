"""Synthetic DENSE disease painted inside the true lung fields: for training and testing the lung U-Net.

The lung U-Net learnt from Montgomery and Shenzhen films, most of them normal or mildly diseased, and treated opaque
lung as "not lung". Complicated pneumoconiosis (ILO categories 2-3, large opacities A/B/C = progressive massive
fibrosis), consolidation, pleural disease and dense reticulation make parts of the lungs as white as the heart. The
lung field is still the lung: a mask that drops the opacity drops exactly the region that carries the disease. This
module paints such disease into real films, always inside the true lung mask, so that the mask stays the whole
lung and is the segmentation target (``train.segmenter --dense-fraction``) and the test truth
(``train.evaluate_segmenter``).

Kinds (``DENSE_KINDS``) and grades
----------------------------------
* ``large_opacity`` (ILO 2011 large opacities, any dimension > 10 mm), upper-zone predominant, unilateral or
  bilateral, on a background of category 2-3 small opacities (``train.synthetic_opacities``), as in complicated
  pneumoconiosis:

  - ``A``: one to three opacities, greatest diameter > 10 mm, their greatest diameters summing to <= 50 mm;
  - ``B``: one or two opacities larger than A whose combined area does not exceed the equivalent of the right upper
    zone (the upper third of the right lung field on this film);
  - ``C``: combined area larger than the right upper zone (1.2-2.2x here).

  Each is an ellipse (aspect 1-1.8, any orientation) with a lobulated outline (radius modulated by harmonics 2-5)
  and a dense core fading over its outer tenth; centres drawn in the upper and middle zones (relative height
  0.12-0.55 of the lung, weighted towards the top).
* ``consolidation``: a lobar or segmental airspace opacity of one or both lungs: ``upper``, ``middle`` (a band),
  ``lower`` or ``extensive`` (all but the apex) part of the lung, bounded by a tilted, wavy fissure-like line with
  a 2-6 mm soft edge and the lung's own edge elsewhere; homogeneous (density 0.8-1.1).
* ``pleural``: ``thickening`` (a 4-15 mm band along the lateral and basal edge of the lower 40-70 % of the lung,
  medial edge spared) or ``effusion`` (a fluid level filling the base, 15-40 % of the lung height, its meniscus
  rising towards the lateral chest wall: the costophrenic angle blunted), with a thin lateral band above it.
* ``reticulation``: diffuse irregular opacities at high profusion, ``2`` or ``3``: a net of lines (zero crossings
  of 3-8 mm band-passed noise, 0.8-1.5 mm wide) over a ground-glass haze, lower-zone predominant or uniform.

Rendering
---------
Each kind yields a density map ``a(x)`` in [0, ~1.1], 1 meaning "as dense as this film's soft tissue". The added
brightness is ``a(x) (T - L(x)) (1 + n(x))`` where ``T`` is the film's soft-tissue level (the median of
the pixels inside the lungs' bounding box but outside the lungs: heart, mediastinum, diaphragm), ``L(x)`` the
local lung brightness (a 15 mm normalised-convolution mean inside the lung), and ``n(x)`` mottling: smooth noise
(3 mm, +/-12 %) plus fine grain scaled by the film's own local structure contrast (``local_contrast``, as for the
small opacities). Because the brightness is added, not pasted, ribs and vessels stay visible through the opacity
as they do on a real film. ``a`` is blurred with the film's own blur (``estimate_blur_px``) and multiplied by the
lung mask softened inwards; what is added saturates softly towards white above 0.88 (``_soft_white``), and pixels
outside the mask, or where nothing is added, never change.

Everything random comes from ``numpy.random.default_rng`` seeded by ``spec.seed``: the same inputs and seed give
identical output.

Command line (documentation figure, Montgomery films only: U.S. public-domain NLM data)::

    python -m train.dense_disease figure docs/figures/dense_disease.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ai.normalise import stretch_contrast

from .synthetic_opacities import (
    DEFAULT_PIXEL_SPACING_MM,
    OpacitySpec,
    estimate_blur_px,
    insert_opacities,
    local_contrast,
    lung_components,
    relative_height,
)

DENSE_KINDS = ("large_opacity", "consolidation", "pleural", "reticulation")
GRADES: dict[str, tuple[str, ...]] = {
    "large_opacity": ("A", "B", "C"),
    "consolidation": ("upper", "middle", "lower", "extensive"),
    "pleural": ("thickening", "effusion"),
    "reticulation": ("2", "3"),
}
SIDES = ("both", "right", "left")  # the patient's sides: right lung = image left in a PA display
LARGE_A_MAX_SUM_MM = 50.0
LARGE_A_MIN_MM = 10.0
SOFT_TISSUE_PERCENTILE = 50.0
LOCAL_MEAN_MM = 15.0
MOTTLE_MM, MOTTLE_AMPLITUDE = 3.0, 0.12
GRAIN_GAIN = 0.4
SATURATION_KNEE = 0.88
MIN_STEP = 0.12  # the added brightness at a = 1 is at least this (films whose soft tissue is nearly as dark as lung)


@dataclass(frozen=True)
class DenseSpec:
    """What to paint. ``grade`` None draws one of the kind's grades from the seed."""

    kind: str
    side: str = "both"
    grade: str | None = None
    with_small_opacities: bool = True  # large opacities only: a category 2-3 background
    pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DENSE_KINDS:
            raise ValueError(f"dense disease kind must be one of {DENSE_KINDS}, got {self.kind!r}")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if self.grade is None:
            rng = np.random.default_rng([self.seed, 0xD15E])
            object.__setattr__(self, "grade", str(rng.choice(GRADES[self.kind])))
        elif self.grade not in GRADES[self.kind]:
            raise ValueError(f"grade of {self.kind} must be one of {GRADES[self.kind]}, got {self.grade!r}")
        if not self.pixel_spacing_mm > 0:
            raise ValueError("pixel_spacing_mm must be positive")


@dataclass(frozen=True)
class DenseResult:
    image: np.ndarray  # float32 in [0, 1]
    density: np.ndarray  # float32 a(x) after masking: 1 = as dense as the film's soft tissue
    opaque_fraction: float  # share of the lung mask with a > 0.5


def random_spec(rng: np.random.Generator, pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM) -> DenseSpec:
    """A spec drawn for augmentation: kinds equally likely, both lungs half of the time, each side a quarter."""
    kind = str(rng.choice(DENSE_KINDS))
    side = str(rng.choice(SIDES, p=[0.5, 0.25, 0.25]))
    return DenseSpec(kind, side, str(rng.choice(GRADES[kind])), with_small_opacities=bool(rng.random() < 0.5),
                     pixel_spacing_mm=pixel_spacing_mm, seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------------------------
# Film measurements


def soft_tissue_level(image: np.ndarray, lung_mask: np.ndarray) -> float:
    """The film's soft-tissue brightness: a percentile of the pixels between and below the lungs (inside the lungs'
    bounding box, outside the lungs)."""
    rows, cols = np.nonzero(lung_mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    outside = ~ndimage.binary_dilation(lung_mask, iterations=2)[box]
    values = np.asarray(image)[box][outside]
    return float(np.percentile(values, SOFT_TISSUE_PERCENTILE)) if values.size else 0.8


def local_lung_mean(image: np.ndarray, lung_mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    m = lung_mask.astype(np.float64)
    sigma = LOCAL_MEAN_MM / spacing_mm
    return ndimage.gaussian_filter(image * m, sigma) / np.maximum(ndimage.gaussian_filter(m, sigma), 1e-6)


def opaque_fraction(image: np.ndarray, lung_mask: np.ndarray, spacing_mm: float = DEFAULT_PIXEL_SPACING_MM) -> float:
    """How much of the true lung is opaque, the rule used to rank real films by density: the share of lung pixels
    (the mask eroded by 2 mm) whose brightness, smoothed over 2 mm, lies above the midpoint between the aerated lung
    (the 20th percentile inside the lung) and the film's soft tissue (``soft_tissue_level``)."""
    mask = np.asarray(lung_mask, bool)
    inner = ndimage.binary_erosion(mask, iterations=max(1, round(2.0 / spacing_mm)))
    if inner.sum() < 50:
        return 0.0
    img = np.asarray(image, np.float64)
    smooth = ndimage.gaussian_filter(img, 2.0 / spacing_mm)
    aerated = float(np.percentile(img[inner], 20))
    threshold = 0.5 * (aerated + soft_tissue_level(img, mask))
    return float(np.mean(smooth[inner] > threshold))


# ---------------------------------------------------------------------------------------------------------------
# Density maps, one per kind


def _chosen_lungs(components: np.ndarray, count: int, side: str) -> list[int]:
    """The mask components to paint: 1 is the patient's right lung (image left), ``count`` the left one."""
    if count == 0:
        return []
    return {"right": [1], "left": [count], "both": sorted({1, count})}[side]


def _smooth_noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma_px, 0.5))
    return n / max(float(n.std()), 1e-9)


def _blob(shape: tuple[int, int], centre: tuple[float, float], area_px: float, rng: np.random.Generator) -> np.ndarray:
    """A lobulated ellipse's density: 1 in the core, fading to 0 over its outer quarter."""
    aspect = rng.uniform(1.0, 1.8)
    a = np.sqrt(area_px * aspect / np.pi)  # semi-axes a (long) and b with pi a b = area
    b = a / aspect
    angle = rng.uniform(0, np.pi)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    dy, dx = rows - centre[0], cols - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0.03, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    return np.clip((1.0 - rho) / 0.2 + 0.5, 0.0, 1.0) ** 0.7


def _upper_centre(components: np.ndarray, t: np.ndarray, lung: int, rng: np.random.Generator) -> tuple[float, float]:
    rows, cols = np.nonzero((components == lung) & (t > 0.12) & (t < 0.55))
    if rows.size == 0:
        rows, cols = np.nonzero(components == lung)
    weight = 1.3 - t[rows, cols]
    k = rng.choice(rows.size, p=weight / weight.sum())
    return float(rows[k]), float(cols[k])


def large_opacity_density(mask: np.ndarray, spec: DenseSpec, rng: np.random.Generator) -> np.ndarray:
    components, extents = lung_components(mask)
    lungs = _chosen_lungs(components, int(components.max()), spec.side)
    t = relative_height(components, extents)
    px_mm2 = spec.pixel_spacing_mm ** 2
    right_upper = float(np.count_nonzero((components == 1) & (t < 1 / 3))) * px_mm2
    if spec.grade == "A":
        n = int(rng.integers(1, 4))
        diameters = rng.uniform(LARGE_A_MIN_MM + 1, 25.0, size=n)
        diameters *= min(1.0, LARGE_A_MAX_SUM_MM / diameters.sum())
        diameters = np.maximum(diameters, LARGE_A_MIN_MM + 0.5)
        areas_mm2 = list(np.pi * (diameters / 2) ** 2)
    else:
        a_max = np.pi * (LARGE_A_MAX_SUM_MM / 2) ** 2
        if spec.grade == "B":
            total = rng.uniform(max(a_max, 0.35 * right_upper), max(a_max * 1.05, right_upper))
        else:
            total = rng.uniform(1.2, 2.2) * max(right_upper, a_max)
        n = max(len(lungs), int(rng.integers(1, 3)))
        shares = rng.dirichlet(np.full(n, 3.0))
        areas_mm2 = list(total * shares)
    density = np.zeros(mask.shape)
    for i, area in enumerate(areas_mm2):
        lung = lungs[i % len(lungs)]
        blob = _blob(mask.shape, _upper_centre(components, t, lung, rng), area / px_mm2, rng)
        density = np.maximum(density, blob * (components == lung))  # a big blob must not spill into the other lung
    return density * rng.uniform(0.9, 1.15)


def consolidation_density(mask: np.ndarray, spec: DenseSpec, rng: np.random.Generator) -> np.ndarray:
    components, extents = lung_components(mask)
    lungs = _chosen_lungs(components, int(components.max()), spec.side)
    t = relative_height(components, extents)
    cols = np.arange(mask.shape[1], dtype=np.float64)[None, :] / mask.shape[1]
    edge_px = rng.uniform(2.0, 6.0) / spec.pixel_spacing_mm
    density = np.zeros(mask.shape)
    for lung in lungs:
        wave = _smooth_noise((1, mask.shape[1]), mask.shape[1] / 12, rng) * 0.03
        tilt = rng.uniform(-0.15, 0.15)
        teff = t + tilt * (cols - 0.5) + wave
        if spec.grade == "upper":
            signed = rng.uniform(0.35, 0.6) - teff
        elif spec.grade == "lower":
            signed = teff - rng.uniform(0.3, 0.65)
        elif spec.grade == "middle":
            centre, half = rng.uniform(0.35, 0.65), rng.uniform(0.1, 0.2)
            signed = half - np.abs(teff - centre)
        else:  # extensive: all but the apex
            signed = teff - rng.uniform(0.08, 0.2)
        height_px = max(extents[lung - 1][1] - extents[lung - 1][0], 1)
        ramp = np.clip(signed * height_px / edge_px + 0.5, 0.0, 1.0)
        density = np.maximum(density, ramp * (components == lung))
    return density * rng.uniform(0.8, 1.1)


def _lateral_basal_distance_mm(components: np.ndarray, lung: int, centre_col: float, spacing_mm: float,
                               lateral_is_left: bool) -> np.ndarray:
    """Distance to the lung's lateral and basal edges only (the medial and apical edges do not count)."""
    rows, cols = np.indices(components.shape)
    sel = components == lung
    lung_rows = np.nonzero(sel.any(axis=1))[0]
    middle_row = 0.5 * (lung_rows[0] + lung_rows[-1])
    lateral = cols < centre_col if lateral_is_left else cols > centre_col
    boundary = ~sel & (lateral | (rows > middle_row))
    return ndimage.distance_transform_edt(~boundary) * spacing_mm


def pleural_density(mask: np.ndarray, spec: DenseSpec, rng: np.random.Generator) -> np.ndarray:
    components, extents = lung_components(mask)
    count = int(components.max())
    lungs = _chosen_lungs(components, count, spec.side)
    t = relative_height(components, extents)
    density = np.zeros(mask.shape)
    rows, cols = np.indices(mask.shape)
    for lung in lungs:
        sel = components == lung
        lung_cols = np.nonzero(sel)[1]
        centre = float(lung_cols.mean())
        lateral_is_left = lung == 1  # the patient's right lung lies on the image's left
        dist = _lateral_basal_distance_mm(components, lung, centre, spec.pixel_spacing_mm, lateral_is_left)
        thick = rng.uniform(4.0, 15.0) if spec.grade == "thickening" else rng.uniform(3.0, 6.0)
        start = rng.uniform(0.3, 0.6)
        band = np.clip((thick - dist) / 2.0, 0.0, 1.0) * np.clip((t - start) / 0.15, 0.0, 1.0)
        layer = band
        if spec.grade == "effusion":
            top, bottom = extents[lung - 1]
            height = bottom - top
            level = bottom - rng.uniform(0.15, 0.4) * height
            half_width = max(float(lung_cols.max() - lung_cols.min()) / 2, 1.0)
            lateral_offset = (centre - cols) if lateral_is_left else (cols - centre)
            meniscus = level - rng.uniform(0.05, 0.15) * height * np.clip(lateral_offset / half_width, 0, 1.5) ** 2
            fluid = np.clip((rows - meniscus) / (3.0 / spec.pixel_spacing_mm), 0.0, 1.0)
            layer = np.maximum(band * 0.8, fluid)
        density = np.maximum(density, layer * sel)
    return density * rng.uniform(0.9, 1.15)


def reticulation_density(mask: np.ndarray, spec: DenseSpec, rng: np.random.Generator) -> np.ndarray:
    components, extents = lung_components(mask)
    lungs = _chosen_lungs(components, int(components.max()), spec.side)
    t = relative_height(components, extents)
    cell_px = rng.uniform(3.0, 8.0) / spec.pixel_spacing_mm
    noise = _smooth_noise(mask.shape, cell_px / 2.5, rng) - _smooth_noise(mask.shape, cell_px * 1.5, rng) * 0.3
    width = rng.uniform(0.8, 1.5) / spec.pixel_spacing_mm
    gradient = np.hypot(*np.gradient(noise))
    lines = np.exp(-((noise / np.maximum(gradient * width, 1e-6)) ** 2))
    strength, haze = (0.35, 0.2) if spec.grade == "2" else (0.55, 0.35)
    weight = (0.35 + 0.65 * t) if rng.random() < 0.6 else np.ones(mask.shape)
    chosen = np.isin(components, lungs)
    return (strength * lines + haze * rng.uniform(0.7, 1.3)) * weight * chosen


DENSITY_MAKERS = {
    "large_opacity": large_opacity_density,
    "consolidation": consolidation_density,
    "pleural": pleural_density,
    "reticulation": reticulation_density,
}


# ---------------------------------------------------------------------------------------------------------------
# Painting


def _soft_white(x: np.ndarray, knee: float = SATURATION_KNEE) -> np.ndarray:
    """Identity below ``knee``; above it, an exponential approach to white (continuous slope 1 at the knee)."""
    room = 1.0 - knee
    return np.where(x <= knee, x, knee + room * -np.expm1(-(x - knee) / room))


def paint_dense_disease(image: np.ndarray, lung_mask: np.ndarray, spec: DenseSpec) -> DenseResult:
    """Paint ``spec`` into ``image`` (float in [0, 1], lungs dark) inside ``lung_mask`` (bool, same 2-D shape)."""
    img = np.asarray(image, np.float64)
    mask = np.asarray(lung_mask, bool)
    if img.shape != mask.shape or img.ndim != 2:
        raise ValueError(f"image {img.shape} and lung mask {mask.shape} must be the same 2-D shape")
    if not mask.any():
        return DenseResult(img.astype(np.float32), np.zeros(img.shape, np.float32), 0.0)
    rng = np.random.default_rng([spec.seed, 0xDE45])
    spacing = spec.pixel_spacing_mm
    if spec.kind == "large_opacity" and spec.with_small_opacities:
        category = 2 if rng.random() < 0.5 else 3
        img = np.asarray(insert_opacities(img, mask, OpacitySpec(category, pixel_spacing_mm=spacing,
                                                                 seed=spec.seed))[0], np.float64)
    density = DENSITY_MAKERS[spec.kind](mask, spec, rng)
    density = ndimage.gaussian_filter(density, estimate_blur_px(img, mask))
    soft = ndimage.gaussian_filter(mask.astype(np.float64), 1.0) * mask
    density = density * soft
    step = np.maximum(soft_tissue_level(img, mask) - local_lung_mean(img, mask, spacing), MIN_STEP)
    mottle = MOTTLE_AMPLITUDE * _smooth_noise(img.shape, MOTTLE_MM / spacing, rng)
    grain = GRAIN_GAIN * local_contrast(img, mask, spacing) * rng.standard_normal(img.shape) * (density > 0.05)
    delta = np.maximum(density * step * (1.0 + mottle) + grain * np.minimum(density, 1.0), 0.0)
    clipped = np.clip(img, 0.0, 1.0)
    out = np.clip(clipped + _soft_white(clipped + delta) - _soft_white(clipped), 0.0, 1.0)
    out = np.where(mask, out, np.asarray(image, np.float64))  # bit-exact outside the lungs
    return DenseResult(out.astype(np.float32), density.astype(np.float32),
                       float(np.mean(density[mask] > 0.5)))


def paint_batch(images: np.ndarray, masks: np.ndarray, fraction: float, rng: np.random.Generator,
                pixel_spacing_mm: float) -> np.ndarray:
    """Training augmentation: each (H, W) image of the (N, H, W) batch receives random dense disease with
    probability ``fraction``; the masks are unchanged (they are the whole lung)."""
    out = np.array(images, dtype=np.float32, copy=True)
    for i in np.nonzero(rng.random(len(out)) < fraction)[0]:
        out[i] = paint_dense_disease(out[i], masks[i] > 0.5, random_spec(rng, pixel_spacing_mm)).image
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figure


FIGURE_SPECS = (
    DenseSpec("large_opacity", "both", "A", seed=3), DenseSpec("large_opacity", "both", "B", seed=4),
    DenseSpec("large_opacity", "right", "C", seed=5), DenseSpec("consolidation", "left", "lower", seed=6),
    DenseSpec("consolidation", "right", "extensive", seed=7), DenseSpec("pleural", "both", "effusion", seed=8),
    DenseSpec("pleural", "left", "thickening", seed=9), DenseSpec("reticulation", "both", "3", seed=10),
)


def figure(out_png: Path, files: tuple[str, ...] = ("MCUCXR_0001_0.png", "MCUCXR_0005_0.png"),
           data: Path | None = None) -> None:
    """Each dense-disease grade on Montgomery normals, with the true lung mask (the segmentation target) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .datasets import data_dir, load_gray, load_mask

    root = (data or data_dir() / "cxr-lung-masks")
    fig, axes = plt.subplots(2, 5, figsize=(15, 7.4))
    panels = [(files[0], None)] + [(files[i % len(files)], s) for i, s in enumerate(FIGURE_SPECS)] + [(files[1], None)]
    for ax, (file, spec) in zip(axes.ravel(), panels, strict=True):
        image = load_gray(root / "images" / file)
        mask = load_mask(root / "masks" / file) > 0
        if spec is None:
            shown, title = image, f"{file}: unchanged"
        else:
            result = paint_dense_disease(image, mask, spec)
            shown = result.image
            title = f"{spec.kind} {spec.grade}, {spec.side}\nopaque {100 * result.opaque_fraction:.0f} % of the lung"
        ax.imshow(stretch_contrast(shown), cmap="gray", vmin=0, vmax=1)
        ax.contour(mask, levels=[0.5], colors="orange", linewidths=0.7)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle("Synthetic dense disease inside the true lung mask (orange: the segmentation target stays the whole "
                 "lung); Montgomery films, public domain", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figure", help="write the documentation figure")
    fig.add_argument("out", type=Path)
    fig.add_argument("--data", type=Path, default=None, help="cxr-lung-masks folder (default: shared data)")
    args = parser.parse_args(argv)
    figure(args.out, data=args.data)
    print(f"figure written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
