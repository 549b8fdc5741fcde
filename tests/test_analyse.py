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
        assert record.models and record.models[0].name == "lung-field-unet"
        assert record.models[0] is record.segmenter
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
    assert classifier.info.notice and classifier.info.notice in card
    assert classifier.input_size in (384, 512)


# --- model files (ai.checkpoint) and a site's model folder (models.directory) --------------------------------------


def test_bundled_model_files_load_weights_only_and_name_their_card_and_digest():
    import hashlib

    import torch

    from ai import checkpoint
    from ai.models import BUNDLED_DIR, CLASSIFIER, LUNG_UNET, lung_segmenter, pneumoconiosis_classifier

    for name, required in ((LUNG_UNET, checkpoint.SEGMENTER_FIELDS), (CLASSIFIER, checkpoint.CLASSIFIER_FIELDS)):
        path = BUNDLED_DIR / name
        model_file = checkpoint.load(path, required)  # torch.load(weights_only=True): no object may need code
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        info = model_file.info()
        assert info.sha256 == digest and digest in path.with_suffix(".md").read_text()
        assert info.card_id == f"{path.with_suffix('.md').name} (weights sha256 {digest[:16]})"
        assert info.input_size == model_file["input_size"] and info.version == model_file["version"]
        floats = [v for v in model_file.state_dict.values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 for v in floats)  # half precision on disk
    segmenter, classifier = lung_segmenter("cpu").info, pneumoconiosis_classifier("cpu").info
    assert segmenter.threshold is None and segmenter.notice == "" and segmenter.to_json() == {
        "name": "lung-field-unet", "version": segmenter.version, "model_card": segmenter.card_id}
    assert 0 < classifier.threshold < 1 and classifier.notice.startswith("DEMO") and classifier.trained_on
    assert list(classifier.to_json()) == ["name", "version", "model_card", "trained_on", "notice"]


class _RunsCode:
    """Unpickling this would call ``os.mkdir(marker)``: what a hostile model file can do without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_model_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    import torch

    from ai import checkpoint
    from ai.segment import LungSegmenter

    marker = tmp_path / "code-ran"
    path = tmp_path / "lung_unet.pt"
    torch.save({"name": "lung-field-unet", "version": "6.6.6", "input_size": 256, "base_width": 12, "depth": 4,
                "state_dict": {}, "extra": _RunsCode(marker)}, path)
    with pytest.raises(checkpoint.ModelFileError, match="lung_unet.pt cannot be read as weights only"):
        LungSegmenter(path, torch.device("cpu"))
    assert not marker.exists()
    torch.save({"name": "lung-field-unet", "state_dict": {}}, path)
    with pytest.raises(checkpoint.ModelFileError, match="lacks version, input_size, base_width, depth"):
        checkpoint.load(path, checkpoint.SEGMENTER_FIELDS)


def test_saved_model_files_hold_plain_values_and_load_again(tmp_path):
    import torch

    from ai import checkpoint

    weights = {"w": torch.tensor([0.1, 0.25], dtype=torch.float32), "n": torch.tensor(3)}
    checkpoint.save(tmp_path / "m.pt", weights, {"name": "m", "version": "1", "input_size": np.int64(64),
                                                 "cross_validation": {"auc": np.float64(0.75), "ci": (0.5, 0.9)}})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["state_dict"]["w"].dtype == torch.float16 and raw["state_dict"]["n"].dtype == torch.int64
    loaded = checkpoint.load(tmp_path / "m.pt")
    assert type(loaded["input_size"]) is int and loaded["cross_validation"] == {"auc": 0.75, "ci": [0.5, 0.9]}
    assert loaded.state_dict["w"].dtype == torch.float32 and torch.allclose(loaded.state_dict["w"], weights["w"],
                                                                            atol=1e-3)
    with pytest.raises(checkpoint.ModelFileError, match="needs version, input_size"):
        checkpoint.save(tmp_path / "bad.pt", weights, {"name": "m"})


def test_a_site_model_folder_from_the_config_file_replaces_the_bundled_file(tmp_path):
    import torch

    from ai import checkpoint
    from ai.models import BUNDLED_DIR, LUNG_UNET

    bundled = checkpoint.load(BUNDLED_DIR / LUNG_UNET, checkpoint.SEGMENTER_FIELDS)
    site = tmp_path / "site-models"
    checkpoint.save(site / LUNG_UNET, bundled.state_dict, {**bundled.fields, "version": "1.0.0-site"},
                    checkpoint.SEGMENTER_FIELDS)
    resaved = checkpoint.load(site / LUNG_UNET, checkpoint.SEGMENTER_FIELDS)
    assert all(torch.equal(resaved.state_dict[k], v) for k, v in bundled.state_dict.items())  # half is lossless
    config = tmp_path / "node.toml"
    config.write_text('[models]\ndirectory = "site-models"\n')  # relative: against the config file's folder
    chest = SAMPLES / "chest" / "RG1_UNCR.dcm"
    proc = subprocess.run([sys.executable, "-m", "dicom_node.cli", "analyse", "--json", "--config", str(config),
                           "--device", "cpu", str(chest)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout)
    assert line["analysed"] and line["models"][0] == {
        "name": "lung-field-unet", "version": "1.0.0-site",
        "model_card": f"lung_unet.md (weights sha256 {resaved.sha256[:16]})"}
    assert line["models"][1]["name"] == "pneumoconiosis-resnet34"  # no classifier.pt there: the bundled one


# --- files without preamble and file meta; failure reasons and retryable flags ------------------------------------


def write_without_preamble_and_file_meta(path, source=SAMPLES / "chest" / "RG1_UNCR.dcm"):
    """An old ACR-NEMA-style export: the bare dataset, implicit VR little endian, no preamble, no DICM, no meta."""
    ds = dcmread(source)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    head = path.read_bytes()[:132]
    assert head[128:132] != b"DICM" and head[:2] == b"\x08\x00"  # starts straight with a group 0008 element
    return path


def test_a_file_without_preamble_and_file_meta_is_analysed_like_a_received_one(tmp_path):
    path = write_without_preamble_and_file_meta(tmp_path / "acr-nema-export")
    record = analyse(path, device="cpu")
    assert record.in_scope and record.error is None, (record.reason, record.error)
    source = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm", stop_before_pixels=True)
    assert record.sop_instance_uid == source.SOPInstanceUID
    assert (record.rows, record.columns) == (source.Rows, source.Columns)
    # The same image as the Part 10 original gives (the lung fields then follow: the analysis is deterministic).
    from ai.normalise import normalise

    np.testing.assert_array_equal(record.image.pixels, normalise(SAMPLES / "chest" / "RG1_UNCR.dcm").pixels)
    assert record.lung_area_px["right"] > 0.05 * record.labels.size


def test_a_file_pydicom_forces_open_is_dicom_only_with_a_sop_class_or_pixel_data(tmp_path):
    from ai.normalise import read_image_file

    path = write_without_preamble_and_file_meta(tmp_path / "export.dcm")
    ds = read_image_file(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # how pydicom read it: implicit VR LE
    explicit = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm")
    del explicit.file_meta
    explicit.preamble = None
    explicit.save_as(tmp_path / "explicit.dcm", enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert read_image_file(tmp_path / "explicit.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    bare = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm", stop_before_pixels=True)
    del bare.file_meta, bare.SOPClassUID
    bare.preamble = None
    bare.save_as(tmp_path / "no-class.dcm", enforce_file_format=False, implicit_vr=True, little_endian=True)
    record = analyse(tmp_path / "no-class.dcm", device="cpu")
    assert (record.reason, record.retryable) == ("unreadable_image", False)
    assert record.error == "UnreadableImage: not a readable image file (neither DICOM nor a picture)"


def test_cli_reads_a_file_without_preamble_and_reports_reasons_and_retryable(tmp_path):
    export = write_without_preamble_and_file_meta(tmp_path / "export")
    cut = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm")
    cut.PixelData = cut.PixelData[:1000]
    cut.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    files = [export, tmp_path / "cut.dcm", tmp_path / "gone.dcm"]
    proc = subprocess.run([sys.executable, "-m", "dicom_node.cli", "analyse", "--json", *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["source"] for line in lines] == [str(f) for f in files], proc.stderr[-2000:]
    export_line, cut_line, gone_line = lines
    assert export_line["analysed"] and export_line["reason"] == "in_scope" and export_line["error"] is None
    assert export_line["lung_area_px"]["right"] > 0 and export_line["retryable"] is False
    assert (cut_line["reason"], cut_line["retryable"]) == ("undecodable_pixels", False)
    assert cut_line["error"] == "UndecodablePixels: pixel data cannot be decoded (native: ValueError)"
    assert (gone_line["reason"], gone_line["retryable"]) == ("file_not_found", True)
    assert gone_line["error"] == "FileNotFoundError: file not found"
    assert proc.returncode == 1


def test_failure_reasons_and_retryable_flags(tmp_path):
    from ai.analysis import FAILURE_REASONS

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    refused = dcmread(SAMPLES / "not-chest" / "CR1_6154_Agfa_16x16.dcm")
    no_pixels = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm", stop_before_pixels=True)
    colour = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm")
    colour.PhotometricInterpretation = "MONOCHROME3"  # passes nothing: the scope check says not_monochrome
    records = analyse_batch([text, tmp_path / "missing.dcm", refused, no_pixels, colour], device="cpu")
    got = [(r.reason, r.retryable, r.error is not None) for r in records]
    assert got == [("unreadable_image", False, True), ("file_not_found", True, True),
                   (records[2].reason, False, False), ("no_pixel_data", False, False),
                   ("not_monochrome", False, False)]
    assert records[2].reason == "body_part_not_chest"  # a refusal: no error, nothing to retry
    for record in records[:2]:
        assert record.explanation == FAILURE_REASONS[record.reason][0]
    assert all(code == code.lower() and " " not in code and len(code) <= 24 for code in FAILURE_REASONS)


class ExplodingSegmenter:
    """The real segmenter, except that it raises for any batch holding an image of the given shape."""

    def __init__(self, real, shape):
        self.real, self.shape, self.calls = real, shape, 0

    def segment(self, images):
        self.calls += 1
        if any(image.pixels.shape == self.shape for image in images):
            raise RuntimeError("model exploded: 1940-03-05")  # a text that must not reach the record
        return self.real.segment(images)

    @property
    def info(self):
        return self.real.info


def test_an_exception_inside_the_models_fails_only_its_input_and_is_retryable(monkeypatch):
    import ai.analysis as analysis
    from ai.models import lung_segmenter

    from .dicomgen import synthetic_dx

    exploding = ExplodingSegmenter(lung_segmenter("cpu"), (64, 64))
    monkeypatch.setattr(analysis, "lung_segmenter", lambda device=None, model_dir=None: exploding)
    good, bad = dcmread(SAMPLES / "chest" / "RG1_UNCR.dcm"), synthetic_dx(64, 64)
    good_record, bad_record = analyse_batch([good, bad], device="cpu")
    assert exploding.calls == 3  # the batch, then one call per input
    assert good_record.in_scope and good_record.error is None
    assert (bad_record.reason, bad_record.retryable, bad_record.in_scope) == ("analysis_error", True, False)
    assert bad_record.error == "RuntimeError: details withheld (library messages may quote dataset values)"
    assert bad_record.labels is None and bad_record.classification is None
