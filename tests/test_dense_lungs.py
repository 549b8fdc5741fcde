"""The shipped lung U-Net and input check on dense disease: the sickest lungs are segmented whole and analysed.

Held-out films of the segmenter's test split (never trained on) with synthetic dense disease painted inside their
true lung masks (train/dense_disease.py), through the node's own segmentation path at the films' 512 px. The
refusals of real non-chest radiographs are tested in tests/test_analyse.py and must hold with the same model.
"""

from __future__ import annotations

import numpy as np
import pytest

from ai.input_check import check_lung_fields
from ai.lungs import LEFT_LUNG, RIGHT_LUNG
from ai.models import lung_segmenter
from ai.normalise import NormalisedImage, normalise
from train.datasets import data_dir, load_mask, read_lung_masks, stratified_split
from train.dense_disease import DenseSpec, paint_dense_disease
from train.losses import dice_iou
from train.synthetic_opacities import OpacitySpec, insert_opacities

SPECS = (
    DenseSpec("large_opacity", "both", "C", seed=11),
    DenseSpec("large_opacity", "right", "B", seed=12),
    DenseSpec("consolidation", "right", "extensive", seed=13),
    DenseSpec("consolidation", "left", "lower", seed=14),
    DenseSpec("pleural", "both", "effusion", seed=15),
    DenseSpec("reticulation", "both", "3", seed=16),
)
MIN_DICE = 0.90  # per painted film; the evaluation's mean over 781 such films is in ai/models/lung_unet.md


@pytest.fixture(scope="module")
def held_out_films():
    root = data_dir() / "cxr-lung-masks"
    if not (root / "labels.csv").exists():
        pytest.fail(f"no lung-mask data under {root}: set PNEUMO_DATA_DIR to the shared data folder")
    test = stratified_split(read_lung_masks(root), 2026)["test"]
    chosen = [next(s for s in test if s.source == source and s.finding == "normal")
              for source in ("montgomery", "shenzhen")]
    return [(s.file, normalise(s.image_path).pixels, load_mask(s.mask_path) > 0.5) for s in chosen]


def segment(images):
    return lung_segmenter("cpu").segment([NormalisedImage(p, None, "png", ["picture"]) for p in images])


def test_dense_disease_is_segmented_whole_and_accepted(held_out_films):
    cases = [(file, spec, paint_dense_disease(image, truth, spec).image, truth)
             for file, image, truth in held_out_films for spec in SPECS]
    failures = []
    for (file, spec, _, truth), seg in zip(cases, segment([c[2] for c in cases]), strict=True):
        check = check_lung_fields(seg.labels, seg.confidence)
        dice = dice_iou(seg.labels > 0, truth)[0]
        both = (seg.labels == RIGHT_LUNG).any() and (seg.labels == LEFT_LUNG).any()
        if not (check.accepted and both and dice >= MIN_DICE):
            failures.append((file, spec.kind, spec.grade, spec.side, check.reason, round(dice, 3)))
    assert not failures, failures


def test_high_profusion_small_opacities_are_accepted(held_out_films):
    images = [insert_opacities(image, truth, OpacitySpec(category, seed=category))[0]
              for _, image, truth in held_out_films for category in (2, 3)]
    reasons = [check_lung_fields(s.labels, s.confidence).reason for s in segment(images)]
    assert reasons == ["in_scope"] * len(images)


def test_the_predicted_fields_leave_the_heart_out(held_out_films):
    """The masks' convention: the lung field is the aerated lung outside the heart and mediastinum (the
    retrocardiac lung is not part of it). Between the two true lungs, in their lower half, the prediction must
    stay (almost) empty, also when the left lower lobe next to the heart is consolidated."""
    from train.evaluate_segmenter import cardiac_band, truth_sides

    spec = DenseSpec("consolidation", "left", "lower", seed=21)
    images, truths = [], []
    for _, image, truth in held_out_films:
        images += [image, paint_dense_disease(image, truth, spec).image]
        truths += [truth, truth]
    for seg, truth in zip(segment(images), truths, strict=True):
        band = cardiac_band(*truth_sides(truth))
        predicted = seg.labels > 0
        assert np.count_nonzero(predicted & band) / predicted.sum() < 0.03
