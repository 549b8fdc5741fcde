"""Image-based input check: does the image look like a frontal chest radiograph with two plausible lung fields?

The header can say CHEST and PA while the pixels show a hand, a lateral view or a dog: the classifier must only
ever see frontal chests. The U-Net's lung fields are judged for count, area, balance, the model's own confidence,
position and shape; the thresholds are deliberately loose for real chests, including the sickest (the public chest
sets, synthetic dense disease and the DICOM chest samples pass, see the measured ranges below and
tests/test_dense_lungs.py) and tight enough that other anatomy fails at least one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .lungs import LEFT_LUNG, RIGHT_LUNG

# Measured with lung U-Net 1.1.0 on its training filter's input (python -m train.evaluate_segmenter, runs/seg-eval3,
# docs/analysis.md): "chests" are the 704 shared films, the 781 held-out films with synthetic dense disease, the 781
# of the input-check set (category 2-3 small opacities; large opacities A-C on both lungs and on each side) and the
# 4 Philips CR encodings: 2,270 images, all accepted. The only real non-chest radiographs that reach these rules are
# a hand and a lower leg. The closest chest to a limit is named where it is one film.
MIN_SIDE_PIXELS = 256
AREA_FRACTION = (0.06, 0.60)  # both lungs together, of the whole image; chests 0.092-0.415
BALANCE_MIN = 0.12  # smaller / larger lung area; chests >= 0.150 (CHNCXR_0603, a largely opaque left lung whose
# true mask is as small: Dice 0.948); the hand 0.52
HEIGHT_FRACTION_MIN = 0.22  # each lung's height, of the image height; chests >= 0.238 (CHNCXR_0603 again)
ASPECT = (0.9, 4.5)  # each lung's bounding-box height / width; chests 1.11-3.59
CENTRE_ROWS = (0.15, 0.80)  # each lung's centre, as a fraction of the image height; chests 0.199-0.622
MIN_MEAN_PROBABILITY = 0.90  # chests >= 0.940 (the lowest: large opacities C on an apical lordotic film); hand 0.850
MAX_UNCERTAIN_RATIO = 0.6  # chests <= 0.349; the hand 1.12
MAX_BOX_FILL = 0.74  # mean of the two fields' area / bounding-box area; chests 0.450-0.699; the lower leg 0.790
"""Lung fields are curved (narrow apex, wide base): they fill at most ~0.7 of their bounding boxes. A limb between
collimator edges gives straight-sided, nearly rectangular fields. Since the U-Net learnt that opaque lung is still
lung (1.1.0), it is confident on the lower leg (mean probability 0.962, inside the chests' range), and this rule is
what refuses it."""

REASONS = {
    "image_too_small": "image smaller than a chest radiograph",
    "no_lung_fields": "no lung field found",
    "single_lung_field": "only one lung field found",
    "lung_area_implausible": "lung fields too small or too large for a chest radiograph",
    "lung_fields_unbalanced": "the two lung fields differ too much in size",
    "lung_position_implausible": "lung fields not where a frontal chest has them",
    "lung_shape_implausible": "lung fields not shaped like lungs",
    "lung_fields_uncertain": "the lung-field model is not confident that this is a chest radiograph",
}


@dataclass
class InputCheck:
    accepted: bool
    reason: str  # "in_scope" when accepted, else one of REASONS
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def explanation(self) -> str:
        return "frontal chest radiograph with two lung fields" if self.accepted else REASONS[self.reason]


def _refuse(reason: str, measurements: dict[str, float]) -> InputCheck:
    return InputCheck(False, reason, measurements)


MEASURE_SIDE = 512  # fractions and centres are scale-free: measure on a subsampled grid of about this size


def check_lung_fields(labels: np.ndarray, confidence: dict[str, float] | None = None) -> InputCheck:
    """``confidence``: the segmenter's ``mean_probability`` and ``uncertain_ratio`` (ai.segment.confidence)."""
    m: dict[str, float] = dict(confidence or {})
    if min(labels.shape) < MIN_SIDE_PIXELS:
        return _refuse("image_too_small", m)
    step = max(1, min(labels.shape) // MEASURE_SIDE)
    labels = labels[::step, ::step]
    rows, cols = labels.shape
    areas = np.bincount(labels.ravel(), minlength=3).astype(float)
    right, left = areas[RIGHT_LUNG], areas[LEFT_LUNG]
    m["right_area_fraction"] = right / labels.size
    m["left_area_fraction"] = left / labels.size
    if right == 0 and left == 0:
        return _refuse("no_lung_fields", m)
    if right == 0 or left == 0:
        return _refuse("single_lung_field", m)
    total = (right + left) / labels.size
    m["area_fraction"] = total
    if not AREA_FRACTION[0] <= total <= AREA_FRACTION[1]:
        return _refuse("lung_area_implausible", m)
    m["balance"] = min(right, left) / max(right, left)
    if m["balance"] < BALANCE_MIN:
        return _refuse("lung_fields_unbalanced", m)
    boxes = ndimage.find_objects(labels, max_label=2)
    fills = []
    for name, value, box in (("right", RIGHT_LUNG, boxes[0]), ("left", LEFT_LUNG, boxes[1])):
        fills.append(float(np.mean(labels[box] == value)))
        height = (box[0].stop - box[0].start) / rows
        aspect = (box[0].stop - box[0].start) / max(box[1].stop - box[1].start, 1)
        centre_row, centre_col = ndimage.center_of_mass(labels == value)
        m[f"{name}_height_fraction"] = height
        m[f"{name}_aspect"] = aspect
        m[f"{name}_centre_row"] = centre_row / rows
        m[f"{name}_centre_col"] = centre_col / cols
    m["box_fill"] = float(np.mean(fills))
    if confidence is not None and (confidence["mean_probability"] < MIN_MEAN_PROBABILITY
                                   or confidence["uncertain_ratio"] > MAX_UNCERTAIN_RATIO):
        return _refuse("lung_fields_uncertain", m)
    if not (m["right_centre_col"] < 0.5 < m["left_centre_col"]):
        return _refuse("lung_position_implausible", m)
    for name in ("right", "left"):
        if not CENTRE_ROWS[0] <= m[f"{name}_centre_row"] <= CENTRE_ROWS[1]:
            return _refuse("lung_position_implausible", m)
        if m[f"{name}_height_fraction"] < HEIGHT_FRACTION_MIN or not ASPECT[0] <= m[f"{name}_aspect"] <= ASPECT[1]:
            return _refuse("lung_shape_implausible", m)
    if m["box_fill"] > MAX_BOX_FILL:
        return _refuse("lung_shape_implausible", m)
    return InputCheck(True, "in_scope", m)
