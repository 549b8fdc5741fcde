"""Synthetic dense disease inside the true lung mask (train/dense_disease.py), on real public films at 256 px."""

from __future__ import annotations

import numpy as np
import pytest

from train.datasets import data_dir, load_gray, load_mask
from train.dense_disease import (
    DENSE_KINDS,
    GRADES,
    DenseSpec,
    opaque_fraction,
    paint_batch,
    paint_dense_disease,
    random_spec,
)
from train.synthetic_opacities import lung_components, relative_height

SIZE = 256
SPACING = 430.0 / SIZE


@pytest.fixture(scope="module")
def film():
    root = data_dir() / "cxr-lung-masks"
    if not (root / "labels.csv").exists():
        pytest.fail(f"no lung-mask data under {root}: set PNEUMO_DATA_DIR to the shared data folder")
    name = "MCUCXR_0001_0.png"
    return load_gray(root / "images" / name, SIZE), load_mask(root / "masks" / name, SIZE) > 0.5


def paint(film, kind, grade, side="both", seed=1, **kw):
    image, mask = film
    return paint_dense_disease(image, mask, DenseSpec(kind, side, grade, pixel_spacing_mm=SPACING, seed=seed, **kw))


@pytest.mark.parametrize(("kind", "grade"), [(k, g) for k in DENSE_KINDS for g in GRADES[k]])
def test_every_grade_brightens_inside_the_lungs_only_and_is_reproducible(film, kind, grade):
    image, mask = film
    result = paint(film, kind, grade)
    assert result.image.dtype == np.float32 and 0.0 <= result.image.min() and result.image.max() <= 1.0
    assert np.array_equal(result.image[~mask], image[~mask]), "pixels outside the true lung changed"
    assert not result.density[~mask].any()
    added = result.image[mask] - image[mask]
    assert added.mean() > 0.005 and added.min() > -0.1, "dense disease must brighten the lung"
    assert np.array_equal(paint(film, kind, grade).image, result.image), "same seed, same picture"
    assert not np.array_equal(paint(film, kind, grade, seed=2).image, result.image)


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_one_side_leaves_the_other_lung_untouched(film, kind):
    image, mask = film
    components, _ = lung_components(mask)
    for side, other in (("right", components == components.max()), ("left", components == 1)):
        result = paint(film, kind, GRADES[kind][-1], side=side, with_small_opacities=False)
        assert np.array_equal(result.image[other], image[other]), (kind, side)
        assert (result.image[mask & ~other] != image[mask & ~other]).any()


def test_large_opacity_grades_follow_the_ilo_sizes(film):
    """A: small (their diameters sum to <= 50 mm, so at most ~2000 mm² of core); C: more than the right upper zone."""
    _, mask = film
    components, extents = lung_components(mask)
    t = relative_height(components, extents)
    right_upper_mm2 = np.count_nonzero((components == 1) & (t < 1 / 3)) * SPACING ** 2
    for seed in range(4):
        a = paint(film, "large_opacity", "A", seed=seed, with_small_opacities=False)
        c = paint(film, "large_opacity", "C", seed=seed, with_small_opacities=False)
        assert 0 < np.count_nonzero(a.density > 0.5) * SPACING ** 2 <= np.pi * 25 ** 2 * 1.3
        assert np.count_nonzero(c.density > 0.5) * SPACING ** 2 > 0.8 * right_upper_mm2
        upper = t < 0.5
        assert c.density[upper & mask].sum() > c.density[~upper & mask].sum(), "upper-zone predominant"


def test_opaque_fraction_ranks_dense_films_above_clear_ones(film):
    image, mask = film
    clear = opaque_fraction(image, mask, SPACING)
    for kind, grade in (("consolidation", "extensive"), ("large_opacity", "C"), ("pleural", "effusion")):
        assert opaque_fraction(paint(film, kind, grade).image, mask, SPACING) > clear + 0.05, (kind, grade)


def test_paint_batch_paints_the_requested_share_and_never_the_masks(film):
    image, mask = film
    images = np.stack([image] * 6)
    masks = np.stack([mask.astype(np.float32)] * 6)
    assert np.array_equal(paint_batch(images, masks, 0.0, np.random.default_rng(0), SPACING), images)
    painted = paint_batch(images, masks, 1.0, np.random.default_rng(0), SPACING)
    assert all(not np.array_equal(p, image) for p in painted)
    assert np.array_equal(masks, np.stack([mask.astype(np.float32)] * 6))


def test_random_specs_cover_every_kind_and_side():
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(200)]
    assert {s.kind for s in specs} == set(DENSE_KINDS)
    assert {s.side for s in specs} == {"both", "right", "left"}


@pytest.mark.parametrize("bad", [dict(kind="nodules"), dict(kind="pleural", side="middle"),
                                 dict(kind="large_opacity", grade="D"), dict(kind="pleural", pixel_spacing_mm=0)])
def test_invalid_specs_are_refused(bad):
    with pytest.raises(ValueError):
        DenseSpec(**bad)
