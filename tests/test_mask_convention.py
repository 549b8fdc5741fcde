"""Which convention a lung mask follows behind the heart (train.mask_convention), and how the segmentation
evaluation and the trainer use it."""

from __future__ import annotations

import numpy as np
import pytest

from train.mask_convention import HEART_INCLUDED, heart_in_mask, includes_heart, left_field

SOFT, LUNG = 0.8, 0.25


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def _chest(noise_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 512 px film: soft tissue, two aerated lungs, and a heart overlapping the left lung's lower medial part.
    Returns the film, the lungs as drawn to the spine (the heart inside) and the lungs outside the heart."""
    shape = (512, 512)
    right = _ellipse(shape, (250, 150), (170, 80))
    left = _ellipse(shape, (250, 362), (170, 80))
    heart = _ellipse(shape, (350, 290), (90, 85))
    image = np.full(shape, SOFT)
    image[right | left] = LUNG
    image[heart] = SOFT
    image += np.random.default_rng(noise_seed).normal(0, 0.02, shape)
    whole = right | left
    return image.astype(np.float32), whole, whole & ~heart


def test_a_mask_holding_the_heart_shadow_scores_as_soft_tissue_and_one_beside_it_as_lung():
    image, whole, beside = _chest()
    held, followed = heart_in_mask(image, whole), heart_in_mask(image, beside)
    assert held is not None and followed is not None
    assert held > 0.9 and followed < 0.1
    assert includes_heart(image, whole) and not includes_heart(image, beside)


def test_dense_disease_outside_the_medial_strip_does_not_make_a_mask_hold_the_heart():
    image, _, beside = _chest(1)
    lateral = _ellipse(image.shape, (300, 400), (60, 30)) & beside
    image[lateral] = SOFT  # a dense consolidation in the lateral left lower zone
    score = heart_in_mask(image, beside)
    assert score is not None and score < HEART_INCLUDED


def test_the_left_field_is_the_component_on_the_image_right_and_a_lone_right_lung_has_none():
    _, whole, _ = _chest()
    left = left_field(whole)
    assert left.any() and np.nonzero(left)[1].min() > 256
    right_only = whole.copy()
    right_only[:, 256:] = False
    assert not left_field(right_only).any()
    assert heart_in_mask(np.zeros((512, 512), np.float32), right_only) is None
    assert heart_in_mask(np.zeros((512, 512), np.float32), np.zeros((512, 512), bool)) is None


def test_the_evaluation_splits_clean_and_densest_dice_by_mask_convention():
    from train.evaluate_segmenter import summarise

    def row(file, group, finding, opaque, dice, heart):
        return {"file": file, "source": "shenzhen", "finding": finding, "part": "test", "variant": "clean",
                "group": group, "opaque": opaque, "accepted": True, "reason": "", "measurements": {}, "dice": dice,
                "retrocardiac": 0.0, "heart_in_mask": heart}

    rows = [row("a", "clean", "normal", 0.1, 0.97, 0.2), row("b", "clean", "normal", 0.2, 0.85, 0.9)]
    rows += [row(f"tb{i}", "films", "tuberculosis", i / 20, 0.95 if i % 2 else 0.88, 0.2 if i % 2 else 0.9)
             for i in range(20)]
    report = summarise(rows)
    assert report["clean"]["heart_excluded"]["dice_mean"] == pytest.approx(0.97)
    assert report["clean"]["heart_included"]["dice_mean"] == pytest.approx(0.85)
    densest = report["tuberculosis"]["densest_by_convention"]
    assert densest["heart_excluded"]["n"] == 1 and densest["heart_included"]["n"] == 1
    assert report["tuberculosis"]["heart_included_per_decile"] == [1] * 10
    # the densest tenth of the ten films with a conforming mask is the densest of them alone
    assert report["tuberculosis"]["densest_of_heart_excluded"]["n"] == 1
    assert report["tuberculosis"]["densest_of_heart_excluded"]["dice_mean"] == pytest.approx(0.95)
    assert report["mask_convention"]["heart_included"]["shenzhen"] == 10


def test_the_trainer_leaves_heart_masks_out_of_training_and_validation_but_keeps_the_test_split(tmp_path):
    import json

    from train.segmenter import prepare_split

    whole = prepare_split(None, 2026, 30, tmp_path / "all")  # 30 films per part: the early Shenzhen numbers,
    kept = prepare_split(None, 2026, 30, tmp_path / "kept", exclude_heart_masks=True)  # rich in heart masks
    recorded = json.loads((tmp_path / "kept" / "split.json").read_text())
    excluded = set(recorded["excluded"])
    assert len(excluded) >= 5
    assert [s.file for s in kept["test"]] == [s.file for s in whole["test"]]
    for part in ("train", "val"):
        assert {s.file for s in kept[part]} == {s.file for s in whole[part]} - excluded


def test_the_convention_summary_counts_heart_masks_per_source_and_bins_the_scores():
    from train.mask_convention import summary

    scores = {"a": {"source": "shenzhen", "finding": "normal", "heart_in_mask": 0.22, "holds_heart": False},
              "b": {"source": "shenzhen", "finding": "normal", "heart_in_mask": 0.86, "holds_heart": True},
              "c": {"source": "montgomery", "finding": "normal", "heart_in_mask": -0.01, "holds_heart": False},
              "d": {"source": "montgomery", "finding": "normal", "heart_in_mask": None, "holds_heart": False}}
    report = summary(scores)
    assert report["sources"]["shenzhen"] == {"films": 2, "unreadable": 0, "holds_heart": 1,
                                                 "histogram": {"0.20": 1, "0.85": 1}}
    assert report["sources"]["montgomery"] == {"films": 2, "unreadable": 0, "holds_heart": 0,
                                                   "histogram": {"-0.05": 1}}


def test_a_site_folder_with_masks_of_another_size_and_a_missing_film_is_scored_and_reported(tmp_path, capsys):
    from PIL import Image

    from train.mask_convention import main

    image, whole, beside = _chest()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, mask in (("held.png", whole), ("beside.png", beside)):
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(tmp_path / "images" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).resize((256, 256)).save(tmp_path / "masks" / name)  # half size
    (tmp_path / "labels.csv").write_text("file,source,finding\nheld.png,site,normal\nbeside.png,site,normal\n"
                                         "gone.png,site,normal\n")
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--figure", str(tmp_path / "out" / "figure.png")]) == 0
    import json

    report = json.loads((tmp_path / "out" / "mask_convention.json").read_text())
    films = report["films"]
    assert films["held.png"]["holds_heart"] and not films["beside.png"]["holds_heart"]
    assert "cannot read" in films["gone.png"]["error"]
    assert report["sources"]["site"]["unreadable"] == 1 and report["sources"]["site"]["holds_heart"] == 1
    assert (tmp_path / "out" / "figure.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "gone.png: cannot read" in out and "site: 1 of 3 masks hold the heart shadow" in out
