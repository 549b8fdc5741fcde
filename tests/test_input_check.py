"""The image-based input check on synthetic lung-field masks: one case per refusal reason."""

from __future__ import annotations

import numpy as np
import pytest

from ai.input_check import check_lung_fields

CONFIDENT = {"mean_probability": 0.98, "uncertain_ratio": 0.1}


def ellipse(shape, centre, radii):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def chest(shape=(1000, 900), right=(0.42, 0.30), left=(0.42, 0.70), radii=(0.28, 0.12), left_radii=None):
    labels = np.zeros(shape, dtype=np.uint8)
    h, w = shape
    labels[ellipse(shape, (right[0] * h, right[1] * w), (radii[0] * h, radii[1] * w))] = 1
    lr = left_radii or radii
    labels[ellipse(shape, (left[0] * h, left[1] * w), (lr[0] * h, lr[1] * w))] = 2
    return labels


def test_a_plausible_frontal_chest_is_accepted():
    check = check_lung_fields(chest(), CONFIDENT)
    assert check.accepted and check.reason == "in_scope", check.measurements


@pytest.mark.parametrize(("labels", "confidence", "reason"), [
    (np.zeros((100, 100), np.uint8), CONFIDENT, "image_too_small"),
    (np.zeros((1000, 900), np.uint8), CONFIDENT, "no_lung_fields"),
    (np.where(chest() == 2, 0, chest()).astype(np.uint8), CONFIDENT, "single_lung_field"),
    (chest(radii=(0.05, 0.03)), CONFIDENT, "lung_area_implausible"),
    (chest(left_radii=(0.10, 0.05)), CONFIDENT, "lung_fields_unbalanced"),
    (chest(), {"mean_probability": 0.90, "uncertain_ratio": 0.1}, "lung_fields_uncertain"),
    (chest(), {"mean_probability": 0.98, "uncertain_ratio": 0.9}, "lung_fields_uncertain"),
    (chest(right=(0.42, 0.60), left=(0.42, 0.40)), CONFIDENT, "lung_position_implausible"),
    (chest(right=(0.85, 0.30), left=(0.85, 0.70), radii=(0.12, 0.12)), CONFIDENT, "lung_position_implausible"),
    (chest(radii=(0.10, 0.2)), CONFIDENT, "lung_shape_implausible"),
])
def test_each_refusal_reason(labels, confidence, reason):
    check = check_lung_fields(labels, confidence)
    assert not check.accepted and check.reason == reason, (check.reason, check.measurements)
    assert check.explanation
