"""The lung-mask post-processing's fast parts against the library functions they replace, and its native-grid
labels on a synthetic probability map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ai.geometry import Letterbox
from ai.lungs import LEFT_LUNG, RIGHT_LUNG, fill_holes, labels_on_source, postprocess_probability, repeat_nearest


def blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random smooth blobs: masks with holes, several components and pixels on the edges."""
    return ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3)) > rng.uniform(0.45, 0.55)


@pytest.mark.parametrize("seed", range(40))
def test_fill_holes_is_scipys_binary_fill_holes(seed):
    rng = np.random.default_rng(seed)
    mask = blobs(rng, tuple(rng.integers(3, 90, 2)))
    assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_fill_holes_of_empty_full_and_ring_masks():
    empty = np.zeros((9, 9), bool)
    assert not fill_holes(empty).any()
    assert fill_holes(~empty).all()
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes(ring)[4, 4] and fill_holes(ring).sum() == 25
    open_ring = ring.copy()
    open_ring[4, 2:5] = False  # the hole reaches the outside: not a hole
    assert np.array_equal(fill_holes(open_ring), open_ring)


@pytest.mark.parametrize("seed", range(40))
def test_repeat_nearest_is_torchs_nearest_interpolation(seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 3, tuple(rng.integers(2, 300, 2))).astype(np.uint8)
    shape = tuple(int(n) for n in rng.integers(2, 3000, 2))
    expected = F.interpolate(torch.from_numpy(small)[None, None], size=shape, mode="nearest")[0, 0].numpy()
    assert np.array_equal(repeat_nearest(small, shape), expected)


def two_lungs(size: int = 256) -> np.ndarray:
    rows, cols = np.ogrid[:size, :size]
    right = ((rows - 0.5 * size) / (0.3 * size)) ** 2 + ((cols - 0.3 * size) / (0.12 * size)) ** 2 <= 1
    left = ((rows - 0.5 * size) / (0.3 * size)) ** 2 + ((cols - 0.7 * size) / (0.12 * size)) ** 2 <= 1
    return ndimage.gaussian_filter((right | left).astype(np.float32), 2)


def test_native_labels_keep_the_fields_sides_and_size():
    box = Letterbox.fit((1955, 1841), 256)
    prob = np.zeros((256, 256), np.float32)
    top, left = box.offset
    rows, cols = box.content_shape
    prob[top:top + rows, left:left + cols] = F.interpolate(torch.from_numpy(two_lungs())[None, None],
                                                           size=(rows, cols), mode="bilinear")[0, 0].numpy()
    hole = (rows // 2, int(0.3 * cols))  # a 3 x 3 hole in the right lung, in content coordinates: filled
    prob[top + hole[0] - 1:top + hole[0] + 2, left + hole[1] - 1:left + hole[1] + 2] = 0.0
    labels = labels_on_source(prob, box)
    assert labels.shape == (1955, 1841) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
    right_cols = np.nonzero((labels == RIGHT_LUNG).any(axis=0))[0]
    left_cols = np.nonzero((labels == LEFT_LUNG).any(axis=0))[0]
    assert right_cols.max() < left_cols.min()  # the patient's right lung is on the image's left
    small = postprocess_probability(prob[top:top + rows, left:left + cols])
    native_share = np.count_nonzero(labels) / labels.size
    assert native_share == pytest.approx(np.count_nonzero(small) / small.size, rel=0.02)
    native_hole = tuple(int((h + 0.5) * n / c) for h, n, c in zip(hole, (1955, 1841), (rows, cols), strict=True))
    assert labels[native_hole] == RIGHT_LUNG  # the hole is filled on the native grid too
