"""Synthetic ILO-like small opacities on real normal radiographs of the public lung-mask set (fast)."""

from __future__ import annotations

import csv
from itertools import pairwise

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from train.datasets import data_dir, load_gray, load_mask, read_lung_masks
from train.synthetic_opacities import (
    OpacitySpec,
    estimate_blur_px,
    insert_opacities,
    lung_components,
    make_synthetic_dataset,
    relative_height,
    sample_opacities,
    zone_name,
)

FILES = ("MCUCXR_0001_0.png", "CHNCXR_0001_0.png")


@pytest.fixture(scope="module")
def samples():
    root = data_dir() / "cxr-lung-masks"
    if not (root / "labels.csv").exists():
        pytest.fail(f"no lung-mask data under {root}: set PNEUMO_DATA_DIR to the shared data folder")
    return {s.file: s for s in read_lung_masks(root)}


@pytest.fixture(scope="module")
def films(samples):
    out = []
    for name in FILES:
        s = samples[name]
        assert s.finding == "normal"
        out.append((load_gray(s.image_path), load_mask(s.mask_path) > 0))
    return out


def test_category_0_leaves_the_image_unchanged(films):
    for image, mask in films:
        out, added, ops = insert_opacities(image, mask, OpacitySpec(0, seed=3), return_opacities=True)
        assert ops == []
        assert np.array_equal(out, image)
        assert not added.any()


def test_number_and_intensity_grow_strictly_with_category(films):
    for image, mask in films:
        counts, means = [], []
        for cat in range(4):
            out, added, ops = insert_opacities(image, mask, OpacitySpec(cat, "q", seed=7), return_opacities=True)
            counts.append(len(ops))
            means.append(float(added[mask].mean()))
            assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
            assert np.array_equal(out[~mask], image[~mask]), "a pixel outside the lungs changed"
            assert not added[~mask].any()
        assert counts[0] == 0 and all(a < b for a, b in pairwise(counts)), counts
        assert means[0] == 0 and all(a < b for a, b in pairwise(means)), means


def test_every_size_type_stays_inside_the_lungs(films):
    image, mask = films[0]
    for kind in ("p", "r", "s", "t"):
        out, added, ops = insert_opacities(image, mask, OpacitySpec(1, kind, seed=1), return_opacities=True)
        assert ops and all(op.kind == kind for op in ops)
        assert all(mask[int(np.floor(op.y + 0.5)), int(np.floor(op.x + 0.5))] for op in ops)  # centres
        assert added[mask].max() > 0.01, f"{kind} opacities invisible"
        assert np.array_equal(out[~mask], image[~mask])


def test_output_stays_in_range_on_a_nearly_white_film(films):
    image, mask = films[1]
    bright = (0.9 + 0.1 * image).astype(np.float32)
    out, added = insert_opacities(bright, mask, OpacitySpec(3, "r", seed=2))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert added[mask].max() > 0  # still brighter, softly saturated below white


def test_upper_zones_get_more_opacities_than_lower_zones(films):
    image, mask = films[0]
    labels, extents = lung_components(mask)
    assert len(extents) == 2
    t = relative_height(labels, extents)
    zone_area = {z: int(((labels > 0) & (np.vectorize(zone_name)(t) == z)).sum()) for z in ("upper", "lower")}
    counts = {"upper": 0, "middle": 0, "lower": 0}
    for seed in range(8):
        for op in sample_opacities(mask, OpacitySpec(2, "q", seed=seed)):
            counts[op.zone] += 1
    assert counts["upper"] > counts["middle"] > counts["lower"] > 0, counts
    ratio = (counts["upper"] / zone_area["upper"]) / (counts["lower"] / zone_area["lower"])
    assert 2.2 < ratio < 4.2, ratio  # ~3:1 per unit area by design


def test_same_seed_same_output_different_seed_different(films):
    image, mask = films[0]
    a, _ = insert_opacities(image, mask, OpacitySpec(2, seed=11))
    b, _ = insert_opacities(image, mask, OpacitySpec(2, seed=11))
    c, _ = insert_opacities(image, mask, OpacitySpec(2, "q", seed=12))
    d, _ = insert_opacities(image, mask, OpacitySpec(2, "q", seed=13))
    assert np.array_equal(a, b)
    assert not np.array_equal(c, d)
    assert OpacitySpec(1, seed=11).size_type == OpacitySpec(3, seed=11).size_type in ("p", "q", "r")


def test_spec_validation():
    with pytest.raises(ValueError):
        OpacitySpec(4)
    with pytest.raises(ValueError):
        OpacitySpec(1, "u")
    with pytest.raises(ValueError):
        OpacitySpec(1, pixel_spacing_mm=0)


def test_blur_estimate_follows_the_film(films):
    image, mask = films[1]
    sharp = estimate_blur_px(image, mask)
    blurred = estimate_blur_px(ndimage.gaussian_filter(image, 1.0), mask)
    assert 0.5 <= sharp < blurred <= 1.5


def test_dataset_uses_only_normal_samples_and_writes_consistent_labels(samples, tmp_path):
    normal = samples[FILES[0]]
    tb = next(s for s in samples.values() if s.finding == "tuberculosis" and s.source == "montgomery")
    rows = make_synthetic_dataset([tb, normal], tmp_path, categories_per_image=(0, 2), seed=5)
    with (tmp_path / "labels.csv").open(newline="") as fh:
        written = list(csv.DictReader(fh))
    assert written == rows and len(rows) == 2
    assert list(written[0]) == ["file", "source_file", "category", "present", "size_type", "n_opacities"]
    for row in written:
        assert row["source_file"] == normal.file  # the tuberculosis film was skipped
        cat = int(row["category"])
        assert row["present"] == str(int(cat >= 1))
        assert (int(row["n_opacities"]) > 0) == (cat >= 1)
        assert (row["size_type"] in ("p", "q", "r")) == (cat >= 1) and (row["size_type"] == "") == (cat == 0)
        with Image.open(tmp_path / "images" / row["file"]) as img:
            pixels = np.asarray(img)
        assert pixels.shape == (512, 512) and pixels.dtype == np.uint8
        if cat == 0:
            with Image.open(normal.image_path) as img:
                assert np.array_equal(pixels, np.asarray(img.convert("L")))
    assert sorted((tmp_path / "images").iterdir()) == sorted(tmp_path / "images" / r["file"] for r in rows)
