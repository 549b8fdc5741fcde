"""Synthetic ILO-like small opacities inserted into real normal chest radiographs, for the DEMO classifier.

No pneumoconiosis radiographs are public, so the demo classifier is trained on normal radiographs of the public
lung-mask set (Montgomery + Shenzhen) with small opacities painted into their lung fields. This is a demonstration
device, not a model of real pneumoconiosis: a classifier trained on it detects *these* synthetic dots, and its
output says nothing about real dust disease.

ILO facts encoded here (ILO International Classification of Radiographs of Pneumoconioses, 2011 revision)
------------------------------------------------------------------------------------------------------------
* Small opacities are rounded or irregular, classified by size:
  - rounded: ``p`` diameter < 1.5 mm, ``q`` 1.5-3 mm, ``r`` 3-10 mm;
  - irregular (by width): ``s`` < 1.5 mm, ``t`` 1.5-3 mm, ``u`` 3-10 mm.
* Profusion (concentration of small opacities), major categories 0-3 (the 12-point scale 0/-...3/+ refines them):
  - 0: no small opacities, or fewer than category 1;
  - 1: small opacities definitely present but few; the normal lung markings are generally visible;
  - 2: numerous small opacities; the normal lung markings are partly obscured;
  - 3: very numerous small opacities; the normal lung markings are usually totally obscured.
* Zones: each lung is divided into upper, middle and lower zones (thirds of its vertical extent). In coal workers'
  pneumoconiosis and silicosis rounded opacities predominate in the upper zones.

What the generator does
-----------------------
``insert_opacities(image, lung_mask, spec)`` for ``spec.category`` >= 1:

1. **Number**: Poisson with mean ``density x lung area``. The density (opacities per cm² of lung as projected on the
   film) is drawn log-uniformly per image from a category range (``DENSITY_PER_CM2``, for ``q``; ranges of the three
   categories do not overlap, so on the same image and seed the number grows with the category: they stand for the
   1/0-1/2, 2/1-2/3, 3/2-3/+ spread inside a major category), times a size factor (``SIZE_DENSITY_FACTOR``): larger
   opacities reach the same profusion with fewer of them, tiny ``p`` ones need more to be noticed. With the
   default 0.84 mm pixels a pair of lungs projects ~400 cm² (5th-95th percentile ~220-670 cm² over normal films of
   both sets), i.e. typically ~280 (category 1), ~850 (2) and ~2500 (3) ``q`` opacities.
2. **Positions**: lung-mask pixels drawn with a weight that falls linearly from the apex to the base of each lung
   (each connected component of the mask has its own vertical extent): ``w(t) = 4.2 - 3.9 t`` with ``t`` in [0, 1]
   from top to bottom. The zones are thirds of that extent; because the apex is narrow and the base is cut by the
   diaphragm, the mean weight per unit area of the upper : middle : lower zones comes out 3.0 : 2.0 : 1 on average
   (2.8-3.4 : 1.85-2.2 : 1 over 60 normal films of both sets); plus a sub-pixel jitter.
3. **Shape and size**: a rounded opacity is a ball whose diameter is drawn log-uniformly from its class range
   (``SIZE_RANGE_MM``; ``p`` from 0.8 mm, smaller would be invisible); its projected thickness ``2 sqrt(R² - r²)`` is
   rendered with 5x5 super-sampling, so a ``p`` ball (sub-pixel at 0.84 mm/px; the footprint is clamped to at least
   one pixel) keeps its true integrated thickness and shows as a faint blurred dot. Irregular ``s`` and ``t``
   opacities are short (3-8 mm) cylinders of the class width along a jagged 3-segment path (turns up to +-50°),
   i.e. fine linear streaks, not a true reticular pattern; ``u`` is not implemented. Each opacity's attenuation is
   varied by a log-normal factor (sigma 0.25).
4. **Blur**: the thickness map is Gaussian-blurred with the image's own blur, estimated from how much the gradient
   energy inside the lungs drops under a known extra blur (``estimate_blur_px``: exact for a 1/f amplitude spectrum,
   roughly 30% high on these films when they are re-blurred by known amounts, hence the 1/1.3 calibration), clamped
   to 0.5-1.5 px; on the training PNGs it gives ~0.51-0.61 px (Shenzhen) and ~0.69-0.83 px (Montgomery), i.e.
   ~0.45-0.7 mm, comparable to a fixed physical blur of ~0.5 mm.
5. **Contrast**: the added brightness is ``GAIN_PER_MM x CONSPICUITY[size] x thickness (mm) x s(x)``, where
   ``s(x)`` is the local contrast of the lung's own structures: the standard deviation of the high-passed image
   (minus a 6 mm Gaussian background) in a 20 mm Gaussian window, computed inside the lung only (normalised
   convolution, so mediastinal and rib-cage edges do not inflate it), clamped to 0.5-1.5x its median over the lung.
   The opacities' contrast thus scales with that of the film's own lung markings: faint on flat films, stronger on
   contrasty ones, never absurd on dark or bright films. ``GAIN_PER_MM`` (1.6) and the per-size ``CONSPICUITY``
   (p 4, q 1, r 0.45, s 2, t 0.8) were tuned by eye on the documentation figure: with contrast proportional to
   thickness alone, ``p`` stays invisible even at category 3 and ``r`` looks like white cannon balls. Opacities
   brighten (they are radio-opaque; lungs are dark in this display), and the brightening saturates softly towards
   white, ``out = I + h (1 - exp(-delta / h))`` with ``h = 1 - I``, so the output stays in [0, 1] and is exactly
   the input wherever nothing was added.
6. **Mask**: the brightening is multiplied by the lung mask softened inwards (mask x Gaussian(mask, 1 px)): pixels
   outside the mask never change.

Category 0 returns the image unchanged (an exact copy) and an empty list: this generator does not produce "0/1"
near-threshold films.

Everything random comes from ``numpy.random.default_rng`` seeded by ``spec.seed``: the same inputs and seed give
identical output. The size type, when not given, is drawn from the seed alone, so the same seed gives the same
size type for every category (matched sets across categories).

Data hygiene
------------
``make_synthetic_dataset`` uses only the samples it is given whose ``finding`` is ``normal`` (tuberculosis films are
skipped: their own opacities would contaminate the labels). The caller decides which samples those are: pass only
the training part of ``train.datasets.stratified_split`` so that held-out normal films are never used to make
training data.

Command line (writes the documentation figure; use a Montgomery film, which is U.S. public-domain NLM data)::

    python -m train.synthetic_opacities figure docs/figures/synthetic_opacities.png --file MCUCXR_0001_0.png
    python -m train.synthetic_opacities dataset OUT_DIR --split-seed 0 [--part train]
"""

from __future__ import annotations

import argparse
import csv
import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from train.datasets import LungSample, load_gray, load_mask

log = logging.getLogger(__name__)

DEFAULT_PIXEL_SPACING_MM = 430.0 / 512.0
"""The 512 x 512 training PNGs cover about 43 cm (Montgomery: 4020 x 4892 at 0.0875 mm, longest side to 512)."""

ROUNDED, IRREGULAR = ("p", "q", "r"), ("s", "t")
SIZE_TYPES = ROUNDED + IRREGULAR
SIZE_RANGE_MM: dict[str, tuple[float, float]] = {
    "p": (0.8, 1.5), "q": (1.5, 3.0), "r": (3.0, 10.0),  # rounded: diameter
    "s": (0.8, 1.5), "t": (1.5, 3.0),                    # irregular: width
}
STREAK_LENGTH_MM = (3.0, 8.0)
SIZE_DENSITY_FACTOR = {"p": 2.5, "q": 1.0, "r": 0.22, "s": 0.9, "t": 0.45}
DENSITY_PER_CM2: dict[int, tuple[float, float]] = {1: (0.5, 1.0), 2: (1.6, 2.8), 3: (5.0, 8.0)}
"""Opacities per cm² of projected lung for size ``q`` (log-uniform within the range), per profusion category."""
ZONE_WEIGHT_TOP, ZONE_WEIGHT_SLOPE = 4.2, 3.9  # w(t) = 4.2 - 3.9 t: ~3 : 2 : 1 per unit area by zone
GAIN_PER_MM = 1.6
"""Added brightness per mm of projected opacity thickness, in units of the local structure contrast s(x)."""
CONSPICUITY = {"p": 4.0, "q": 1.0, "r": 0.45, "s": 2.0, "t": 0.8}
"""Per-size attenuation factors, tuned by eye: with contrast proportional to thickness alone, p is invisible even
at category 3 and r looks like white cannon balls (metastases or calcified granulomas, not silicotic nodules)."""
ATTENUATION_SIGMA = 0.25
BLUR_CLAMP_PX = (0.5, 1.5)
BLUR_CALIBRATION = 1.3
SUPERSAMPLE = 5


@dataclass(frozen=True)
class OpacitySpec:
    """What to insert. ``size_type`` None draws one of p/q/r from the seed (irregular s/t only on request)."""

    category: int
    size_type: str | None = None
    pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM
    seed: int = 0

    def __post_init__(self) -> None:
        if self.category not in (0, 1, 2, 3):
            raise ValueError(f"ILO profusion category must be 0-3, got {self.category!r}")
        if self.size_type is None:
            rng = np.random.default_rng([self.seed, 0x5123])
            object.__setattr__(self, "size_type", str(rng.choice(ROUNDED)))
        elif self.size_type not in SIZE_TYPES:
            raise ValueError(f"size type must be one of {SIZE_TYPES} (u is not implemented), got {self.size_type!r}")
        if not self.pixel_spacing_mm > 0:
            raise ValueError("pixel_spacing_mm must be positive")

    @property
    def kind(self) -> str:
        """The size type, given or drawn (set by ``__post_init__``)."""
        assert self.size_type is not None
        return self.size_type


@dataclass(frozen=True)
class Opacity:
    y: float  # centre, pixels (row)
    x: float  # centre, pixels (column)
    size_mm: float  # diameter (rounded) or width (irregular)
    kind: str  # p q r s t
    lung: int  # connected component of the mask, 1-based, numbered by its leftmost image column
    zone: str  # upper | middle | lower (thirds of that lung's vertical extent)
    length_mm: float = 0.0  # irregular streaks only
    path: tuple[tuple[float, float], ...] = field(default=(), repr=False)  # streak vertices (y, x), pixels


# ---------------------------------------------------------------------------------------------------------------
# Image measurements


def lung_components(lung_mask: np.ndarray, min_fraction: float = 0.02) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Label image of the mask's components (specks below ``min_fraction`` of the mask dropped), numbered left to
    right, and each component's (top row, bottom row)."""
    mask = np.asarray(lung_mask, dtype=bool)
    comps, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, np.int32), []
    sizes = ndimage.sum_labels(mask, comps, index=np.arange(1, count + 1))
    keep = [k + 1 for k in range(count) if sizes[k] >= min_fraction * mask.sum()]
    keep.sort(key=lambda k: np.nonzero(comps == k)[1].min())
    out = np.zeros(mask.shape, np.int32)
    extents = []
    for new, k in enumerate(keep, start=1):
        sel = comps == k
        out[sel] = new
        rows = np.nonzero(sel.any(axis=1))[0]
        extents.append((int(rows[0]), int(rows[-1])))
    return out, extents


def relative_height(labels: np.ndarray, extents: list[tuple[int, int]]) -> np.ndarray:
    """t in [0, 1] from the top to the bottom of each pixel's own lung (0 outside)."""
    rows = np.arange(labels.shape[0], dtype=np.float64)[:, None]
    t = np.zeros(labels.shape, np.float64)
    for k, (top, bottom) in enumerate(extents, start=1):
        tk = (rows - top) / max(bottom - top, 1)
        t = np.where(labels == k, np.broadcast_to(tk, labels.shape), t)
    return np.clip(t, 0.0, 1.0)


def zone_name(t: float) -> str:
    return "upper" if t < 1 / 3 else "middle" if t < 2 / 3 else "lower"


def estimate_blur_px(image: np.ndarray, lung_mask: np.ndarray, probe_px: float = 1.0) -> float:
    """Gaussian sigma (pixels) of the film's own blur, from the drop of gradient energy in the lungs under a known
    extra blur: for a 1/f amplitude spectrum the energy scales as 1/sigma², so sigma0 = b sqrt(r / (1 - r)).
    Heuristic: monotone in the true blur, ~30% high on the training films (divided by ``BLUR_CALIBRATION``),
    clamped to ``BLUR_CLAMP_PX``."""
    img = np.asarray(image, np.float64)
    inner = ndimage.binary_erosion(np.asarray(lung_mask, bool), iterations=4)
    if inner.sum() < 100:
        return float(np.mean(BLUR_CLAMP_PX))

    def energy(a: np.ndarray) -> float:
        gy, gx = np.gradient(a)
        return float((gx * gx + gy * gy)[inner].mean())

    e0 = energy(img)
    if e0 <= 0:
        return BLUR_CLAMP_PX[1]
    r = min(energy(ndimage.gaussian_filter(img, probe_px)) / e0, 0.999)
    sigma = probe_px * np.sqrt(r / (1 - r)) / BLUR_CALIBRATION
    return float(np.clip(sigma, *BLUR_CLAMP_PX))


def local_contrast(image: np.ndarray, lung_mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """s(x): standard deviation of the high-passed image in a 20 mm window, inside the lung only, clamped to
    0.5-1.5x its lung median."""
    img = np.asarray(image, np.float64)
    m = np.asarray(lung_mask, np.float64)
    hp = img - ndimage.gaussian_filter(img, 6.0 / spacing_mm)
    w = 20.0 / spacing_mm
    norm = ndimage.gaussian_filter(m, w)
    var = ndimage.gaussian_filter(hp * hp * m, w) / np.maximum(norm, 1e-6)
    s = np.sqrt(np.maximum(var, 0))
    inside = m > 0
    med = float(np.median(s[inside])) if inside.any() else 0.02
    med = max(med, 1e-3)
    return np.clip(s, 0.5 * med, 1.5 * med)


# ---------------------------------------------------------------------------------------------------------------
# Placement and rendering


def sample_opacities(lung_mask: np.ndarray, spec: OpacitySpec) -> list[Opacity]:
    """Where and how large the opacities are (deterministic for ``spec.seed``); empty for category 0."""
    if spec.category == 0:
        return []
    labels, extents = lung_components(lung_mask)
    if not extents:
        return []
    rng = np.random.default_rng([spec.seed, 0x0BAC])
    kind = spec.kind
    lo, hi = DENSITY_PER_CM2[spec.category]
    u = rng.random()  # same draw for every category with this seed: the density grows with the category
    density = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))) * SIZE_DENSITY_FACTOR[kind]
    area_cm2 = float((labels > 0).sum()) * spec.pixel_spacing_mm ** 2 / 100.0
    n = int(rng.poisson(density * area_cm2))
    if n == 0:
        return []

    t = relative_height(labels, extents)
    ys, xs = np.nonzero(labels)
    weight = ZONE_WEIGHT_TOP - ZONE_WEIGHT_SLOPE * t[ys, xs]
    pick = rng.choice(len(ys), size=n, p=weight / weight.sum())
    jitter = rng.uniform(-0.5, 0.5, size=(n, 2))
    lo_mm, hi_mm = SIZE_RANGE_MM[kind]
    sizes = np.exp(rng.uniform(np.log(lo_mm), np.log(hi_mm), size=n))
    out = []
    for i, j in enumerate(pick):
        y, x = ys[j] + jitter[i, 0], xs[j] + jitter[i, 1]
        common: dict[str, Any] = dict(y=float(y), x=float(x), size_mm=float(sizes[i]), kind=kind,
                                      lung=int(labels[ys[j], xs[j]]), zone=zone_name(float(t[ys[j], xs[j]])))
        if kind in IRREGULAR:
            length = float(rng.uniform(*STREAK_LENGTH_MM))
            step = length / 3 / spec.pixel_spacing_mm
            angle = rng.uniform(0, np.pi)
            pts = [(0.0, 0.0)]
            for _ in range(3):
                pts.append((pts[-1][0] + step * np.sin(angle), pts[-1][1] + step * np.cos(angle)))
                angle += rng.uniform(-np.radians(50), np.radians(50))
            cy, cx = np.mean(pts, axis=0)
            path = tuple((float(y + py - cy), float(x + px - cx)) for py, px in pts)
            out.append(Opacity(**common, length_mm=length, path=path))
        else:
            out.append(Opacity(**common))
    return out


def _subpixel_grid(cy: float, cx: float, radius_px: float, shape: tuple[int, int]):
    """Pixel window around (cy, cx) and super-sampled coordinates of its pixels (centres at integers)."""
    r = int(np.ceil(radius_px)) + 1
    y0, y1 = max(int(np.floor(cy)) - r, 0), min(int(np.floor(cy)) + r + 2, shape[0])
    x0, x1 = max(int(np.floor(cx)) - r, 0), min(int(np.floor(cx)) + r + 2, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    yy = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel()
    xx = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel()
    return y0, y1, x0, x1, yy[:, None], xx[None, :]


def _pool(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return a.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))


def render_thickness(opacities: Iterable[Opacity], shape: tuple[int, int], spacing_mm: float,
                     attenuation: np.ndarray | None = None) -> np.ndarray:
    """Projected opacity thickness (mm, pixel means) before any blur."""
    thick = np.zeros(shape, np.float64)
    opacities = list(opacities)
    if attenuation is None:
        attenuation = np.ones(len(opacities))
    for op, att in zip(opacities, attenuation, strict=True):
        radius_mm = op.size_mm / 2
        radius_px = max(radius_mm / spacing_mm, 0.5)  # footprint at least one pixel across
        if op.kind in IRREGULAR:
            pts = np.asarray(op.path)
            extent = np.abs(pts - pts.mean(axis=0)).max() + radius_px
            grid = _subpixel_grid(float(pts[:, 0].mean()), float(pts[:, 1].mean()), extent, shape)
            if grid is None:
                continue
            y0, y1, x0, x1, yy, xx = grid
            dist = np.full((yy.size, xx.size), np.inf)
            for (ay, ax), (by, bx) in pairwise(pts):
                dy, dx = by - ay, bx - ax
                seg2 = dy * dy + dx * dx
                tt = np.clip(((yy - ay) * dy + (xx - ax) * dx) / max(seg2, 1e-12), 0, 1)
                dist = np.minimum(dist, np.hypot(yy - (ay + tt * dy), xx - (ax + tt * dx)))
            r_mm = dist * spacing_mm
        else:
            grid = _subpixel_grid(op.y, op.x, radius_px, shape)
            if grid is None:
                continue
            y0, y1, x0, x1, yy, xx = grid
            r_mm = np.hypot(yy - op.y, xx - op.x) * spacing_mm
        # clamp the ball to at least a pixel across but keep its true volume (integrated thickness)
        r_eff = max(radius_mm, 0.5 * spacing_mm)
        profile = 2.0 * np.sqrt(np.maximum(r_eff ** 2 - r_mm ** 2, 0.0)) * (radius_mm / r_eff) ** 3 * att
        thick[y0:y1, x0:x1] += _pool(profile, y1 - y0, x1 - x0)
    return thick


def insert_opacities(image: np.ndarray, lung_mask: np.ndarray, spec: OpacitySpec, *,
                     return_opacities: bool = False):
    """Insert small opacities into ``image`` (float in [0, 1], lungs dark) inside ``lung_mask`` (bool, same shape).

    Returns ``(image_out, opacity_map)``: the float32 image in [0, 1] and the float32 brightness added (zero outside
    the mask); with ``return_opacities`` also the list of ``Opacity`` placed. Category 0 returns an exact copy.
    """
    img = np.asarray(image, np.float64)
    mask = np.asarray(lung_mask, bool)
    if img.shape != mask.shape or img.ndim != 2:
        raise ValueError(f"image {img.shape} and lung mask {mask.shape} must be the same 2-D shape")
    opacities = sample_opacities(mask, spec)
    if not opacities:
        unchanged = (img.astype(np.float32), np.zeros(img.shape, np.float32))
        return (*unchanged, opacities) if return_opacities else unchanged

    rng = np.random.default_rng([spec.seed, 0xA77E])
    attenuation = np.exp(rng.normal(0.0, ATTENUATION_SIGMA, size=len(opacities))) * CONSPICUITY[spec.kind]
    thick = render_thickness(opacities, img.shape, spec.pixel_spacing_mm, attenuation)
    thick = ndimage.gaussian_filter(thick, estimate_blur_px(img, mask))
    soft = ndimage.gaussian_filter(mask.astype(np.float64), 1.0) * mask
    delta = GAIN_PER_MM * thick * local_contrast(img, mask, spec.pixel_spacing_mm) * soft
    clipped = np.clip(img, 0.0, 1.0)
    head = np.maximum(1.0 - clipped, 1e-6)
    added = np.where(delta > 0, head * -np.expm1(-delta / head), 0.0)
    out = np.clip(clipped + added, 0.0, 1.0)
    out = np.where(mask, out, img)  # bit-exact outside the lungs
    result = (out.astype(np.float32), (out - img).astype(np.float32))
    return (*result, opacities) if return_opacities else result


# ---------------------------------------------------------------------------------------------------------------
# Data set and figure


def _sample_seed(seed: int, file: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(file.encode())]).generate_state(1)[0])


LABEL_FIELDS = ("file", "source_file", "category", "present", "size_type", "n_opacities")


def make_synthetic_dataset(samples: Sequence[LungSample], out_dir: Path, categories_per_image: int | Sequence[int]
                           = (0, 1, 2, 3), seed: int = 0, size_types: Sequence[str] = ROUNDED,
                           pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM) -> list[dict[str, str]]:
    """Write ``out_dir/images/<stem>_c<category>.png`` and ``out_dir/labels.csv`` from the NORMAL samples given.

    Only samples with ``finding == "normal"`` are used; others are skipped (and counted in a log message). The
    caller chooses the samples: pass the training part of ``stratified_split`` only, so held-out normals are never
    turned into training data. ``categories_per_image``: a sequence renders every listed category for each image
    (default 0-3: matched sets); an int k renders k distinct categories drawn at random per image. The size type
    of each image is drawn from ``size_types`` by its seed (derived from ``seed`` and the file name, so a file's
    images do not depend on which other samples are passed). Returns the label rows written.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    normals = [s for s in samples if s.finding == "normal"]
    if len(normals) < len(samples):
        log.warning("skipped %d non-normal sample(s): only normal radiographs receive synthetic opacities",
                    len(samples) - len(normals))
    rows: list[dict[str, str]] = []
    for sample in sorted(normals, key=lambda s: s.file):
        image = load_gray(sample.image_path)
        mask = load_mask(sample.mask_path) > 0
        sseed = _sample_seed(seed, sample.file)
        rng = np.random.default_rng(sseed)
        if isinstance(categories_per_image, int):
            cats = sorted(rng.choice(4, size=categories_per_image, replace=False).tolist())
        else:
            cats = list(categories_per_image)
        size_type = str(rng.choice(list(size_types)))
        stem = Path(sample.file).stem
        for cat in cats:
            spec = OpacitySpec(category=int(cat), size_type=size_type, pixel_spacing_mm=pixel_spacing_mm, seed=sseed)
            out, _, ops = insert_opacities(image, mask, spec, return_opacities=True)
            name = f"{stem}_c{cat}.png"
            Image.fromarray(np.round(out * 255).astype(np.uint8)).save(out_dir / "images" / name)
            rows.append({"file": name, "source_file": sample.file, "category": str(cat),
                         "present": str(int(cat >= 1)), "size_type": size_type if cat >= 1 else "",
                         "n_opacities": str(len(ops))})
    with (out_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def figure_categories(sample: LungSample, out_png: Path, size_type: str = "q", extra_sizes: Sequence[str] = ("p", "r"),
                      seed: int = 0, pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM, zoom_px: int = 128,
                      dpi: int = 100) -> Path:
    """One normal radiograph with categories 0-3 side by side (top row, size ``size_type``), the same images zoomed
    into the right upper zone (the image's left lung, upper part), and one zoomed row per size in ``extra_sizes``.
    Saved with matplotlib's Agg backend, then reduced to a 256-colour palette PNG to keep the file small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = load_gray(sample.image_path)
    mask = load_mask(sample.mask_path) > 0
    labels, extents = lung_components(mask)
    if not extents:
        raise ValueError(f"{sample.file}: empty lung mask")
    top, bottom = extents[0]  # image-left lung = patient's right lung
    cols = np.nonzero((labels == 1).any(axis=0))[0]
    cy = top + (bottom - top) / 4
    cx = (cols[0] + cols[-1]) / 2
    y0 = int(np.clip(cy - zoom_px / 2, 0, image.shape[0] - zoom_px))
    x0 = int(np.clip(cx - zoom_px / 2, 0, image.shape[1] - zoom_px))
    side_cm = zoom_px * pixel_spacing_mm / 10

    rows = 2 + len(extra_sizes)
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.5 * rows + 0.55))
    fig.subplots_adjust(left=0.004, right=0.996, bottom=0.002, top=1 - 0.55 / (2.5 * rows + 0.55), wspace=0.02,
                        hspace=0.02)
    texts = {0: "none", 1: "few; markings visible", 2: "numerous; markings\npartly obscured",
             3: "very numerous; markings\nobscured"}
    for cat in range(4):
        for row, kind in enumerate((size_type, size_type, *extra_sizes)):
            spec = OpacitySpec(category=cat, size_type=kind, pixel_spacing_mm=pixel_spacing_mm, seed=seed)
            out, _, ops = insert_opacities(image, mask, spec, return_opacities=True)
            ax = axes[row, cat]
            if row == 0:
                ax.imshow(out, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
                ax.add_patch(Rectangle((x0, y0), zoom_px, zoom_px, fill=False, edgecolor="orange", linewidth=1))
                ax.set_title(f"category {cat}: {texts[cat]}", fontsize=8, pad=2)
            else:
                ax.imshow(out[y0:y0 + zoom_px, x0:x0 + zoom_px], cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            if row > 0 or cat > 0:
                note = f"size {kind}: {len(ops)} opacities" if cat else "no opacities"
                if row > 0:
                    note = f"{note}; zoom {side_cm:.0f} cm" if cat else f"zoom: right upper zone, {side_cm:.0f} cm"
                ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7, color="yellow", va="bottom",
                        bbox=dict(facecolor="black", alpha=0.6, pad=1, linewidth=0))
            ax.axis("off")
    fig.suptitle(f"Synthetic ILO-like small opacities: DEMO data, not real pneumoconiosis ({sample.file}, "
                 f"seed {seed})", fontsize=9, y=0.998, va="top")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    with Image.open(out_png) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(out_png, optimize=True)
    return out_png


def main(argv: list[str] | None = None) -> int:
    from train.datasets import read_lung_masks, stratified_split

    parser = argparse.ArgumentParser(description="Synthetic ILO-like small opacities (demo data).")
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figure", help="categories 0-3 side by side on one normal film")
    fig.add_argument("out", type=Path)
    fig.add_argument("--file", default="MCUCXR_0001_0.png")
    fig.add_argument("--size-type", default="q", choices=SIZE_TYPES)
    fig.add_argument("--seed", type=int, default=0)
    ds = sub.add_parser("dataset", help="synthetic images + labels.csv from one part of the seeded split")
    ds.add_argument("out", type=Path)
    ds.add_argument("--split-seed", type=int, default=0)
    ds.add_argument("--part", default="train", choices=("train", "val", "test"))
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--categories-per-image", type=int, default=0,
                    help="k > 0: k distinct categories drawn per film; 0 (default): all four per film")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    samples = read_lung_masks()
    if args.command == "figure":
        sample = next(s for s in samples if s.file == args.file)
        if sample.finding != "normal":
            parser.error(f"{sample.file} is not a normal radiograph")
        figure_categories(sample, args.out, size_type=args.size_type, seed=args.seed)
    else:
        part = stratified_split(samples, args.split_seed)[args.part]
        per_image = args.categories_per_image or (0, 1, 2, 3)
        rows = make_synthetic_dataset(part, args.out, per_image, seed=args.seed)
        log.info("wrote %d images to %s", len(rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
