"""The image-based input check on synthetic lung-field masks: one case per refusal reason."""

from __future__ import annotations

import numpy as np
import pytest

from ai.input_check import check_lung_fields

CONFIDENT = {"mean_probability": 0.98, "uncertain_ratio": 0.1}


def ellipse(shape, centre, radii):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def lung(shape, centre, radii, lateral_is_left):
    """An ellipse with its upper lateral part cut away along a diagonal: narrow apex, wide base, filling about 0.65
    of its bounding box like a real lung field (an ellipse fills pi/4 = 0.785)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    lateral = (centre[1] - cols) if lateral_is_left else (cols - centre[1])
    below_diagonal = (rows - (centre[0] - radii[0])) >= 1.2 * radii[0] * (lateral / radii[1])
    return ellipse(shape, centre, radii) & below_diagonal


def chest(shape=(1000, 900), right=(0.42, 0.30), left=(0.42, 0.70), radii=(0.28, 0.12), left_radii=None):
    labels = np.zeros(shape, dtype=np.uint8)
    h, w = shape
    labels[lung(shape, (right[0] * h, right[1] * w), (radii[0] * h, radii[1] * w), True)] = 1
    lr = left_radii or radii
    labels[lung(shape, (left[0] * h, left[1] * w), (lr[0] * h, lr[1] * w), False)] = 2
    return labels


def rectangles(shape=(1000, 900)):
    """Two straight-sided fields, as the U-Net finds them on a limb between collimator edges."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[200:800, 150:400] = 1
    labels[200:800, 500:750] = 2
    return labels


def test_a_plausible_frontal_chest_is_accepted():
    check = check_lung_fields(chest(), CONFIDENT)
    assert check.accepted and check.reason == "in_scope", check.measurements


@pytest.mark.parametrize(("labels", "confidence", "reason"), [
    (np.zeros((100, 100), np.uint8), CONFIDENT, "image_too_small"),
    (np.zeros((1000, 900), np.uint8), CONFIDENT, "no_lung_fields"),
    (np.where(chest() == 2, 0, chest()).astype(np.uint8), CONFIDENT, "single_lung_field"),
    (chest(radii=(0.05, 0.03)), CONFIDENT, "lung_area_implausible"),
    (chest(left_radii=(0.08, 0.05)), CONFIDENT, "lung_fields_unbalanced"),
    (chest(), {"mean_probability": 0.85, "uncertain_ratio": 0.1}, "lung_fields_uncertain"),
    (chest(), {"mean_probability": 0.98, "uncertain_ratio": 0.9}, "lung_fields_uncertain"),
    (chest(right=(0.42, 0.60), left=(0.42, 0.40)), CONFIDENT, "lung_position_implausible"),
    (chest(right=(0.85, 0.30), left=(0.85, 0.70), radii=(0.12, 0.12)), CONFIDENT, "lung_position_implausible"),
    (chest(radii=(0.10, 0.2)), CONFIDENT, "lung_shape_implausible"),
    (rectangles(), CONFIDENT, "lung_shape_implausible"),
])
def test_each_refusal_reason(labels, confidence, reason):
    check = check_lung_fields(labels, confidence)
    assert not check.accepted and check.reason == reason, (check.reason, check.measurements)
    assert check.explanation


def test_lung_like_fields_fill_about_two_thirds_of_their_box():
    check = check_lung_fields(chest(), CONFIDENT)
    assert 0.55 < check.measurements["box_fill"] < 0.70
    assert check_lung_fields(rectangles(), CONFIDENT).measurements["box_fill"] == 1.0


def test_lungs_joined_at_the_apices_are_split_into_two_fields():
    from ai.lungs import postprocess_probability

    labels = chest(shape=(256, 256))
    joined = (labels > 0).astype(np.float32)
    joined[60:64, 40:216] = 1.0  # a thin bridge across the mediastinum, touching both apices
    split = postprocess_probability(joined)
    assert set(np.unique(split)) == {0, 1, 2}
    assert check_lung_fields(np.kron(split, np.ones((4, 4), np.uint8)), CONFIDENT).accepted


def test_a_single_lung_is_not_split():
    from ai.lungs import postprocess_probability

    labels = chest(shape=(256, 256))
    one = (labels == 1).astype(np.float32)
    assert set(np.unique(postprocess_probability(one))) == {0, 1}
