"""The secondary capture's picture (dicom_node/results/overlay.py): the blend on the lungs' box and the contours by
array shifts give the same pixels as the whole-grid blend and scipy's erosion they replaced."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ai.lungs import LEFT_LUNG, RIGHT_LUNG
from dicom_node.results.overlay import (
    CONTOUR_COLOURS,
    HEAT_ALPHA,
    HEAT_LEVELS,
    composite,
    grey_levels,
    heat_colours,
    inner_edge,
)


def whole_grid_composite(grey: np.ndarray, labels: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """The picture as it was made before: every step on the whole grid, contours by ``ndimage.binary_erosion``."""
    picture = Image.fromarray(grey_levels(grey), mode="L").convert("RGB")
    lungs = labels > 0
    if heat is not None and lungs.any():
        heat8 = np.rint(np.clip(heat, 0.0, 1.0) * (HEAT_LEVELS - 1)).astype(np.uint8)
        scale = np.linspace(0.0, 1.0, HEAT_LEVELS)
        colours = Image.fromarray(heat8, mode="P")
        colours.putpalette(np.clip(np.rint(heat_colours(scale)), 0, 255).astype(np.uint8).ravel().tobytes())
        weight = np.where(lungs, np.rint(255.0 * HEAT_ALPHA * scale).astype(np.uint8)[heat8], np.uint8(0))
        picture = Image.composite(colours.convert("RGB"), picture, Image.fromarray(weight, mode="L"))
    rgb = np.array(picture, dtype=np.uint8)
    width = max(1, round(max(labels.shape) / 600))
    for value, colour in CONTOUR_COLOURS.items():
        field = labels == value
        rgb[field & ~ndimage.binary_erosion(field, iterations=width, border_value=0)] = colour
    return rgb


def lung_labels(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Two blobby fields, left and right, touching the array's border now and then."""
    labels = np.zeros((rows, cols), dtype=np.uint8)
    blobs = ndimage.gaussian_filter(rng.random((rows, cols)), 2) > 0.5
    labels[:, : cols // 2][blobs[:, : cols // 2]] = RIGHT_LUNG
    labels[:, cols // 2:][blobs[:, cols // 2:]] = LEFT_LUNG
    return labels


@pytest.mark.parametrize("seed", range(12))
def test_composite_equals_the_whole_grid_blend(seed):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(8, 1400, 2)  # up to 1400: contours 1-2 px wide
    labels = lung_labels(rng, int(rows), int(cols))
    grey = rng.random((rows, cols), dtype=np.float32)
    heat = ndimage.gaussian_filter(rng.random((rows, cols), dtype=np.float32), 4) * 2
    for h in (heat, None):
        assert np.array_equal(composite(grey, labels, h), whole_grid_composite(grey, labels, h))


def test_composite_without_lungs_is_the_grey_radiograph():
    grey = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    rgb = composite(grey, np.zeros((20, 30), dtype=np.uint8), np.ones((20, 30), dtype=np.float32))
    assert np.array_equal(rgb, np.repeat(grey_levels(grey)[..., None], 3, axis=2))


@pytest.mark.parametrize("width", [1, 2, 3, 6])
def test_inner_edge_equals_scipys_erosion(width):
    rng = np.random.default_rng(width)
    for shape in ((1, 1), (1, 9), (7, 1), (40, 33), (301, 257)):
        field = rng.random(shape) < 0.8
        field[0] = True  # a field touching the border: the outside counts as background
        expected = field & ~ndimage.binary_erosion(field, iterations=width, border_value=0)
        assert np.array_equal(inner_edge(field, width), expected)
