"""``ai.analyse`` and ``dicom-node analyse`` with the bundled lung U-Net on real radiographs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from ai import analyse
from ai.analysis import analyse_batch
from ai.lungs import LEFT_LUNG, RIGHT_LUNG
from train.datasets import read_lung_masks, stratified_split

from .conftest import REPO, SAMPLES, sample_files


def test_every_chest_sample_is_analysed_with_two_lungs_on_the_native_grid():
    for path in sample_files("chest"):
        record = analyse(path, device="cpu")
        assert record.in_scope, (path.name, record.reason, record.input_check)
        ds = dcmread(path, stop_before_pixels=True)
        assert record.labels.shape == (ds.Rows, ds.Columns) and record.labels.dtype == np.uint8
        assert set(np.unique(record.labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
        cols = np.nonzero(record.labels)[1]
        right_centre = np.nonzero(record.labels == RIGHT_LUNG)[1].mean()
        left_centre = np.nonzero(record.labels == LEFT_LUNG)[1].mean()
        assert right_centre < ds.Columns / 2 < left_centre, "patient's right lung is on the image's left in PA"
        assert cols.min() > 0.03 * ds.Columns and cols.max() < 0.97 * ds.Columns
        assert record.lung_area_px["right"] > 0.05 * record.labels.size
        assert record.pixel_spacing_mm is None and record.lung_area_mm2 is None  # spacing "0.000\0.000"
        assert record.models and record.models[0]["name"] == "lung-field-unet"
        for stage in ("decode", "normalise", "segment", "postprocess", "total"):
            assert record.timings[stage] >= 0


def test_transfer_syntaxes_give_the_same_lung_fields():
    masks = [analyse(p, device="cpu").labels for p in sample_files("chest")]
    for mask in masks[1:]:
        agreement = np.mean((mask > 0) == (masks[0] > 0))
        assert agreement > 0.995


def test_every_not_chest_sample_is_refused_by_the_header_and_by_the_image():
    for path in sample_files("not-chest"):
        assert not analyse(path, device="cpu").in_scope
        # Now hide what the header says: the pixels alone must still be refused.
        ds = dcmread(path)
        for keyword in ("BodyPartExamined", "ViewPosition", "ImageType"):
            if keyword in ds:
                delattr(ds, keyword)
        record = analyse(ds, device="cpu")
        assert not record.in_scope, (path.name, record.input_check)
        assert record.reason not in ("body_part_not_chest", "view_not_frontal", "not_original_image", "in_scope")


def test_half_a_chest_is_refused_like_a_lateral_view():
    """A crop holding one lung field: the image check must not accept a single or off-centre lung field."""
    ds = dcmread(sample_files("chest")[-1])  # RG1_UNCR, uncompressed
    pixels = ds.pixel_array[:, : ds.Columns // 2].copy()
    half = copy.deepcopy(ds)
    half.Columns = pixels.shape[1]
    half.PixelData = pixels.tobytes()
    record = analyse(half, device="cpu")
    assert not record.in_scope and record.reason.startswith(("single_lung", "lung_")), record.reason


def test_held_out_public_chests_are_accepted():
    split = stratified_split(read_lung_masks(), seed=2026)
    test_images = [s.image_path for s in split["test"]][:30]
    records = analyse_batch(test_images, device="cpu")
    refused = [(r.source, r.reason) for r in records if not r.in_scope]
    assert len(refused) <= 1, refused


def test_pixel_spacing_gives_areas_in_square_millimetres():
    ds = dcmread(sample_files("chest")[-1])
    ds.PixelSpacing = [0.2, 0.25]
    record = analyse(ds, device="cpu")
    assert record.lung_area_mm2["right"] == pytest.approx(record.lung_area_px["right"] * 0.05, abs=0.05)


def test_cli_json_lines_in_input_order_with_errors_and_masks(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    png_source = read_lung_masks()[0].image_path
    chest = SAMPLES / "chest" / "RG1_UNCR.dcm"
    hand = SAMPLES / "not-chest" / "Kodak_CR500_hand_J2KR.dcm"
    files = [chest, broken, hand, text, png_source, tmp_path / "missing.dcm"]
    proc = subprocess.run([sys.executable, "-m", "dicom_node.cli", "analyse", "--json", "--mask-out",
                           str(tmp_path / "masks"), *map(str, files)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["source"] for line in lines] == [str(f) for f in files]
    assert proc.returncode == 1  # some inputs could not be read
    chest_line, broken_line, hand_line, text_line, png_line, missing_line = lines
    assert chest_line["analysed"] and chest_line["lung_area_px"]["right"] > 0
    assert chest_line["models"][0]["name"] == "lung-field-unet" and chest_line["models"][0]["version"]
    # The bundled demo classifier answers with the keys, and its notice travels with every result.
    p = chest_line["pneumoconiosis"]
    assert 0 <= p["probability"] <= 1 and p["present"] == (p["probability"] >= p["threshold"])
    cats = chest_line["profusion_category"]
    assert len(cats["probabilities"]) == 4 and abs(sum(cats["probabilities"]) - 1) < 1e-3
    assert cats["most_likely"] == int(np.argmax(cats["probabilities"]))
    assert set(chest_line["zones"]) == {f"{side}_{zone}" for side in ("right", "left")
                                        for zone in ("upper", "middle", "lower")}
    assert all(0 <= v <= 1 for v in chest_line["zones"].values())
    classifier = chest_line["models"][1]
    assert classifier["name"] and classifier["version"] and classifier["model_card"].startswith("classifier.md")
    assert classifier["notice"].startswith("DEMO") and "not for clinical use" in classifier["notice"]
    assert hand_line["pneumoconiosis"] is None  # not analysed: no probability at all
    for bad in (broken_line, text_line, missing_line):
        assert not bad["analysed"] and bad["error"]
    assert not hand_line["analysed"] and hand_line["reason"] == "body_part_not_chest"
    assert png_line["analysed"]
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == sorted([f"{chest.stem}.png", f"{png_source.stem}.png"])
    mask = np.asarray(Image.open(tmp_path / "masks" / f"{chest.stem}.png"))
    assert mask.shape == (1955, 1841) and set(np.unique(mask)) == {0, 1, 2}
    assert np.array_equal(mask, analyse(chest, device="cpu").labels)


def test_bundled_classifier_card_says_demo_in_its_first_line_and_matches_the_weights():
    import hashlib

    from ai.models import BUNDLED_DIR, pneumoconiosis_classifier

    card = (BUNDLED_DIR / "classifier.md").read_text()
    first = card.splitlines()[0].lower()
    assert "demo" in first and "synthetic" in first and "not for clinical use" in first
    weights = (BUNDLED_DIR / "classifier.pt").read_bytes()
    assert hashlib.sha256(weights).hexdigest() in card
    classifier = pneumoconiosis_classifier("cpu")
    assert classifier.notice and classifier.notice in card
    assert classifier.input_size in (384, 512)
