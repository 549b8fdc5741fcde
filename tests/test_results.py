"""Result objects (SEG, SR, SC) for real chest radiographs: validated by dciodvfy and dsrdump, read back with
pydicom/highdicom and checked item by item. Codes are spelled out literally here, independently of
dicom_node/results/codes.py, so a wrong code there fails here."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from scipy import ndimage

from ai import analyse
from ai.classifier import Classification
from ai.explain import zone_scores
from ai.lungs import LEFT_LUNG, RIGHT_LUNG
from ai.model_info import ModelInfo
from dicom_node.config import load_config
from dicom_node.results import (
    NodeIdentity,
    build_not_analysed,
    build_results,
    derive_device_uid,
    result_series_uid,
    result_uid,
)
from dicom_node.results.sc import banner_lines
from dicom_node.results.sr import ARITHMETIC, NO_CLASSIFIER_NOTE

from .support.data import CHEST_JPEG_LS
from .support.data import CHEST_UNCOMPRESSED as CHEST
from .support.data import CONFIG as CONFIG_FILE
from .support.data import NOT_CHEST_TINY as NOT_CHEST
from .support.dicom_tools import assert_dciodvfy_clean, assert_dsrdump_clean
from .support.result_checks import assert_not_analysed_sr, our_equipment
from .support.sr_tree import children, code_of, name_of, num, only, text_values, unit_of, walk

NOTICE = "DEMO model trained on synthetic radiographs only; not for clinical use."
DEMO_CLASSIFIER = ModelInfo(name="pneumo-resnet34", version="0.1.0-demo", card_id="classifier.md",
                            trained_on="synthetic opacities", notice=NOTICE)
ZONE_SITES = {"right_upper": ("281392002", "24028007"), "right_middle": ("281393007", "24028007"),
              "right_lower": ("281394001", "24028007"), "left_upper": ("281392002", "7771000"),
              "left_middle": ("281393007", "7771000"), "left_lower": ("281394001", "7771000")}

# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> NodeIdentity:
    return NodeIdentity(ae_title="PNEUMOCAD", device_uid=derive_device_uid("PNEUMOCAD"))


@pytest.fixture(scope="module")
def chest() -> Dataset:
    return dcmread(CHEST)


@pytest.fixture(scope="module")
def analysed(chest):
    record = analyse(chest, device="cpu")
    assert record.in_scope, record.explanation
    return record


def synthetic_classification(labels: np.ndarray) -> Classification:
    """A heat map peaking in the middle of the right lung, plus a hot spot in the mediastinum between the lungs
    (Grad-CAM is not confined to the lungs; the picture must be)."""
    rows, cols = np.nonzero(labels == RIGHT_LUNG)
    centre_r, centre_c = rows.mean(), cols.mean()
    left_c = np.nonzero(labels == LEFT_LUNG)[1].mean()
    grid_r, grid_c = np.mgrid[:labels.shape[0], :labels.shape[1]]
    lung = np.exp(-(((grid_r - centre_r) / 350.0) ** 2 + ((grid_c - centre_c) / 300.0) ** 2))
    mediastinum = np.exp(-(((grid_r - centre_r) / 150.0) ** 2 + ((grid_c - (centre_c + left_c) / 2) / 60.0) ** 2))
    heat = np.maximum(lung, mediastinum).astype(np.float32)
    return Classification(probability=0.8312, present=True, threshold=0.42,
                          category_probabilities=[0.1, 0.55, 0.25, 0.1], most_likely_category=1,
                          zones=zone_scores(heat, labels), heat_map=heat, timings={})


@pytest.fixture(scope="module")
def demo_record(analysed):
    return dataclasses.replace(analysed, classification=synthetic_classification(analysed.labels),
                               classifier=DEMO_CLASSIFIER)


@pytest.fixture(scope="module")
def no_classifier_record(analysed):
    return dataclasses.replace(analysed, classification=None, classifier=None)


def write_all(results, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for result in results:
        paths[result.kind] = folder / f"{result.kind}.dcm"
        dcmwrite(paths[result.kind], result.dataset, enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def demo(chest, demo_record, node, tmp_path_factory):
    results = build_results(chest, demo_record, node)
    return results, write_all(results, tmp_path_factory.mktemp("demo"))


# --- analysed, with a (synthetic) demo classification -----------------------------------------------------------


def test_results_are_seg_sr_sc_in_the_source_study_each_in_its_own_series(demo, chest, node):
    results, paths = demo
    assert [r.kind for r in results] == ["seg", "sr", "sc"]
    assert chest == dcmread(CHEST), "building results must leave the source dataset as it was"
    series = set()
    for kind, path in paths.items():
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == (JPEGBaseline8Bit if kind == "sc" else ExplicitVRLittleEndian)
        assert ds.StudyInstanceUID == chest.StudyInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyID", "StudyDate", "StudyTime", "StudyDescription", "ReferringPhysicianName"):
            assert ds.get(keyword) == chest.get(keyword), (kind, keyword)
        assert ds.SeriesInstanceUID != chest.SeriesInstanceUID and ds.SOPInstanceUID != chest.SOPInstanceUID
        series.add(ds.SeriesInstanceUID)
        assert ds.SeriesDescription.startswith("DEMO "), ds.SeriesDescription  # a model carries a notice
        ours = our_equipment(ds, node)
        assert ours.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
        assert ours.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
        assert (ours.Manufacturer, ours.ManufacturerModelName) == (node.manufacturer, node.model_name)
        assert ours.SoftwareVersions == node.software_version and ours.DeviceUID == node.device_uid
        assert ours.InstitutionName == chest.InstitutionName  # node.institution_name is empty: copied
        assert NOTICE in ours.ContributionDescription and "pneumo-resnet34 0.1.0-demo" in ours.ContributionDescription
    assert len(series) == 3
    assert dcmread(paths["seg"]).SeriesDescription == "DEMO AI lung fields (SEG)"
    assert dcmread(paths["sr"]).SeriesDescription == "DEMO AI pneumoconiosis report (SR)"
    assert dcmread(paths["sc"]).SeriesDescription == "DEMO AI heat map (not for diagnosis)"


def test_seg_is_valid_and_equals_the_lung_labels(demo, chest, demo_record, node):
    _, paths = demo
    assert_dciodvfy_clean(paths["seg"])
    seg = hd.seg.segread(paths["seg"])
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert (seg.Rows, seg.Columns) == (chest.Rows, chest.Columns) and int(seg.NumberOfFrames) == 2
    pixels = seg.get_pixels_by_source_instance([chest.SOPInstanceUID], segment_numbers=[1, 2])
    assert pixels.shape == (1, chest.Rows, chest.Columns, 2)
    assert np.array_equal(pixels[0, ..., 0] > 0, demo_record.labels == RIGHT_LUNG)
    assert np.array_equal(pixels[0, ..., 1] > 0, demo_record.labels == LEFT_LUNG)
    segmenter = demo_record.segmenter
    for number, label, laterality in ((1, "Right lung", ("24028007", "SCT")), (2, "Left lung", ("7771000", "SCT"))):
        segment = seg.SegmentSequence[number - 1]
        assert (segment.SegmentNumber, segment.SegmentLabel) == (number, label)
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("39607008", "SCT", "Lung")
        modifier = kind.SegmentedPropertyTypeModifierCodeSequence
        assert len(modifier) == 1 and (modifier[0].CodeValue, modifier[0].CodingSchemeDesignator) == laterality
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (segmenter.name, segmenter.version)
    references = seg.ReferencedSeriesSequence[0]
    assert references.SeriesInstanceUID == chest.SeriesInstanceUID
    assert references.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == chest.SOPInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == chest.SOPInstanceUID
    assert list(seg.PatientOrientation) == list(chest.PatientOrientation)  # highdicom leaves it out
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]  # the CR's spacing is "0\0"
    assert seg.ImageComments == NOTICE
    assert seg.Manufacturer == node.manufacturer


def test_sr_is_valid_for_dciodvfy_and_dsrdump(demo):
    _, paths = demo
    assert_dciodvfy_clean(paths["sr"])
    assert_dsrdump_clean(paths["sr"])


@pytest.fixture(scope="module")
def demo_sr(demo):
    """The demo SR as highdicom reads it, and its SEG's header."""
    _, paths = demo
    return hd.sr.srread(paths["sr"]), dcmread(paths["seg"], stop_before_pixels=True)


def measurement_groups(sr) -> list[Dataset]:
    """The TID 1500 Imaging Measurements' groups: the pneumoconiosis finding, then the right and left lung."""
    groups = children(only(sr, ("126010", "DCM")), ("125007", "DCM"))
    assert len(groups) == 3
    return groups


def test_sr_document_is_a_complete_unverified_comprehensive_sr_with_its_evidence(demo_sr, chest):
    sr, seg = demo_sr
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    schemes = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert schemes["99PNEUMOILO"].CodingSchemeName and schemes["99PNEUMOILO"].CodingSchemeResponsibleOrganization
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {chest.SOPInstanceUID, seg.SOPInstanceUID}


def test_sr_observation_context_names_the_node_as_device_observer(demo_sr, node):
    """TID 1500 root with TID 1001/1004 (observer: a device) and the procedure reported."""
    root, _ = demo_sr  # the root content item's attributes live on the dataset itself
    assert name_of(root) == ("126000", "DCM") and root.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert code_of(only(root, ("121005", "DCM"))) == ("121007", "DCM")  # Observer Type: Device
    assert only(root, ("121012", "DCM")).UID == node.device_uid
    assert only(root, ("121013", "DCM")).TextValue == node.ae_title
    assert only(root, ("121014", "DCM")).TextValue == node.manufacturer
    assert only(root, ("121015", "DCM")).TextValue == node.model_name
    assert code_of(only(root, ("121058", "DCM"))) == ("399208008", "SCT")  # Procedure reported


def test_sr_image_library_holds_the_source_without_frame_or_segment_numbers(demo_sr, chest):
    """TID 1600 Image Library; no reference to the single-frame source may carry frame or segment numbers
    (dciodvfy errors)."""
    sr, _ = demo_sr
    library = only(only(sr, ("111028", "DCM")), ("126200", "DCM"))
    image = only(library, ("260753009", "SCT"))
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == chest.SOPInstanceUID
    for item in walk(sr.ContentSequence):
        if item.ValueType == "IMAGE" and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
                chest.SOPInstanceUID:
            assert "ReferencedFrameNumber" not in item.ReferencedSOPSequence[0]
            assert "ReferencedSegmentNumber" not in item.ReferencedSOPSequence[0]


def test_sr_pneumoconiosis_findings_report_the_classification(demo_sr, chest, demo_record):
    """The TID 1501 measurement group of the finding: algorithm, source, presence, ILO category, probability,
    threshold, category probabilities and the six zone scores with their sites."""
    sr, _ = demo_sr
    c = demo_record.classification
    finding = measurement_groups(sr)[0]
    assert only(finding, ("112039", "DCM")).TextValue == "Pneumoconiosis"  # Tracking Identifier
    assert code_of(only(finding, ("121071", "DCM"))) == ("40122008", "SCT")
    assert code_of(only(finding, ("363698007", "SCT"))) == ("39607008", "SCT")
    assert only(finding, ("111001", "DCM")).TextValue == DEMO_CLASSIFIER.name
    assert only(finding, ("111003", "DCM")).TextValue == DEMO_CLASSIFIER.version
    assert {i.TextValue for i in children(finding, ("111002", "DCM"))} == {
        "model card: classifier.md", "trained on: synthetic opacities", f"arithmetic: {ARITHMETIC[c.precision]}"}
    source = only(finding, ("121112", "DCM"))
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == chest.SOPInstanceUID
    assert code_of(only(finding, ("40122008", "SCT"))) == ("52101004", "SCT")  # Present
    category = only(finding, ("PROFUSION", "99PNEUMOILO"))
    assert code_of(category) == ("1", "99PNEUMOILO")
    probability = only(finding, ("122157", "DCM"))
    assert num(probability) == pytest.approx(c.probability, abs=1e-6) and unit_of(probability) == ("1", "UCUM")
    threshold = only(finding, ("122411", "DCM"))
    assert num(threshold) == pytest.approx(c.threshold, abs=1e-6) and unit_of(threshold) == ("1", "UCUM")
    for k, expected in enumerate(c.category_probabilities):
        assert num(only(finding, (f"P{k}", "99PNEUMOILO"))) == pytest.approx(expected, abs=1e-6)
    zones = children(finding, ("ZONESCORE", "99PNEUMOILO"))
    assert len(zones) == 6
    seen = {}
    for zone in zones:
        site = only(zone, ("363698007", "SCT"))
        laterality = only(site, ("272741003", "SCT"))
        seen[(code_of(site)[0], code_of(laterality)[0])] = num(zone)
        assert unit_of(zone) == ("1", "UCUM")
    assert seen == pytest.approx({ZONE_SITES[k]: round(v, 6) for k, v in c.zones.items()}, abs=1e-6)
    assert seen[ZONE_SITES["right_middle"]] > 0.5 > seen[ZONE_SITES["left_upper"]]
    # highdicom's own reading of the same tree agrees.
    assert len(sr.content.get_image_measurement_groups()) == 1


def test_sr_lung_areas_are_inferred_from_their_seg_segments(demo_sr, chest, demo_record):
    """The TID 1410 planar ROI measurement groups: one per lung, its area inferred from its SEG segment."""
    sr, seg = demo_sr
    groups = measurement_groups(sr)
    segmenter = demo_record.segmenter
    for group, side, number, laterality in ((groups[1], "right", 1, "24028007"), (groups[2], "left", 2, "7771000")):
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
        assert only(group, ("112039", "DCM")).TextValue == f"{side.capitalize()} lung field"
        assert code_of(only(group, ("121071", "DCM"))) == ("39607008", "SCT")
        site = only(group, ("363698007", "SCT"))
        assert code_of(site) == ("39607008", "SCT") and code_of(only(site, ("272741003", "SCT")))[0] == laterality
        area = only(group, ("42798000", "SCT"))
        assert num(area) == demo_record.lung_area_px[side] and unit_of(area) == ("{pixels}", "UCUM")
        area_source = only(area, ("121112", "DCM"))
        assert area_source.RelationshipType == "INFERRED FROM"
        segment_ref = area_source.ReferencedSOPSequence[0]
        assert (segment_ref.ReferencedSOPInstanceUID, segment_ref.ReferencedSegmentNumber) == (seg.SOPInstanceUID,
                                                                                             number)
        assert "ReferencedFrameNumber" not in segment_ref
        assert only(group, ("111001", "DCM")).TextValue == segmenter.name
        assert only(group, ("111003", "DCM")).TextValue == segmenter.version
        if segmenter.card_id:
            assert f"model card: {segmenter.card_id}" in {i.TextValue for i in children(group, ("111002", "DCM"))}
        frame_ref = only(group, ("121214", "DCM")).ReferencedSOPSequence[0]
        assert (frame_ref.ReferencedSOPClassUID, frame_ref.ReferencedSOPInstanceUID) == (seg.SOPClassUID,
                                                                                       seg.SOPInstanceUID)
        frame = seg.PerFrameFunctionalGroupsSequence[int(frame_ref.ReferencedFrameNumber) - 1]
        assert frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number  # the frame's segment
        assert seg.SegmentSequence[number - 1].SegmentLabel.lower() == f"{side} lung"
        source = only(group, ("121233", "DCM")).ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == chest.SOPInstanceUID
    # highdicom's own reading of the same tree agrees.
    assert len(sr.content.get_planar_roi_measurement_groups()) == 2


def test_sr_qualitative_evaluations_say_the_analysis_succeeded_and_carry_the_notice(demo_sr):
    sr, _ = demo_sr
    statements = only(sr, ("C0034375", "UMLS"))
    assert code_of(only(statements, ("111017", "DCM"))) == ("111242", "DCM")  # succeeded, with findings
    assert only(statements, ("NOTICE", "99PNEUMOILO")).TextValue == NOTICE
    assert not children(statements, ("NOTE", "99PNEUMOILO"))


def test_sc_is_rgb_with_burnt_in_heat_map_contours_and_banner(demo, chest, demo_record):
    _, paths = demo
    assert_dciodvfy_clean(paths["sc"])
    sc = dcmread(paths["sc"])
    assert sc.BurnedInAnnotation == "YES" and sc.SamplesPerPixel == 3
    # the node's default (results.sc_compression = "jpeg"): lossy JPEG Baseline, said so in the header
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit and sc.PhotometricInterpretation == "YBR_FULL_422"
    assert sc.LossyImageCompression == "01" and values(sc, "LossyImageCompressionMethod") == ["ISO_10918_1"]
    assert 5 < float(sc.LossyImageCompressionRatio) < 60 and "lossy JPEG" in sc.DerivationDescription
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.ConversionType == "WSD"
    assert [r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence] == [chest.SOPInstanceUID]
    assert list(sc.PatientOrientation) == list(chest.PatientOrientation)
    rgb = sc.pixel_array.astype(int)
    scale = sc.Columns / chest.Columns
    banner = sc.Rows - round(chest.Rows * scale)
    assert banner > 20
    assert max(sc.Rows - banner, sc.Columns) <= 2048  # the radiograph part; the banner is added above it
    strip = rgb[:banner]
    assert (strip.max(axis=-1) < 30).mean() > 0.7 and (strip.min(axis=-1) > 200).any()  # black with white text
    assert ((strip[..., 0] > 200) & (strip[..., 1] > 150) & (strip[..., 2] < 60)).any()  # the notice in yellow

    labels, heat = demo_record.labels, demo_record.classification.heat_map
    inner = ndimage.binary_erosion(labels == RIGHT_LUNG, iterations=40)
    far_outside = ~ndimage.binary_dilation(labels > 0, iterations=40)

    def at(mask):
        r, c = np.nonzero(mask[::25, ::25])
        return rgb[np.minimum((r * 25 * scale).round().astype(int) + banner, sc.Rows - 1),
                   np.minimum((c * 25 * scale).round().astype(int), sc.Columns - 1)]

    hot_inside = at(inner & (heat > 0.8))
    assert len(hot_inside) > 10
    spread = hot_inside.max(axis=-1) - hot_inside.min(axis=-1)
    assert (spread > 60).all(), "heat map must colour the lung where it is high"
    hot_outside = at(far_outside & (heat > 0.5))
    assert len(hot_outside) > 10
    assert (hot_outside.max(axis=-1) - hot_outside.min(axis=-1) <= 3).all(), "no colour outside the lungs"

    lines = [text for text, _ in banner_lines(demo_record)]
    assert "probability 0.83" in lines[0] and "threshold 0.42" in lines[0] and "ILO category 1" in lines[0]
    assert "pneumo-resnet34 0.1.0-demo" in lines[1] and NOTICE in lines
    assert sc.ImageComments == NOTICE


def values(ds: Dataset, keyword: str) -> list:
    """An attribute's values as a list, whatever its multiplicity."""
    return list(ds[keyword].value) if ds[keyword].VM > 1 else [ds[keyword].value]


def test_sc_uncompressed_on_request_and_jpeg_within_a_few_grey_levels_of_it(demo, chest, demo_record, node,
                                                                              tmp_path):
    _, paths = demo
    plain = build_results(chest, demo_record, dataclasses.replace(node, sc_compression="none"))[2].dataset
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and plain.PhotometricInterpretation == "RGB"
    dcmwrite(tmp_path / "sc.dcm", plain, enforce_file_format=True)
    assert_dciodvfy_clean(tmp_path / "sc.dcm")
    assert "LossyImageCompression" not in plain and "lossy" not in plain.DerivationDescription
    jpeg = dcmread(paths["sc"])
    assert jpeg.SOPInstanceUID == plain.SOPInstanceUID  # the same picture, however it is stored
    truth, decoded = plain.pixel_array.astype(int), jpeg.pixel_array.astype(int)  # pydicom returns RGB
    assert decoded.shape == truth.shape
    error = np.abs(decoded - truth)
    assert error.mean() < 2 and np.percentile(error, 99) <= 12
    coloured = (truth.max(axis=-1) - truth.min(axis=-1)) > 60  # contours and heat map keep their colour
    assert ((decoded.max(axis=-1) - decoded.min(axis=-1))[coloured] > 30).mean() > 0.97
    assert os.path.getsize(paths["sc"]) * 5 < len(plain.PixelData)


def test_the_node_writes_its_sc_as_config_results_sc_compression_says():
    assert NodeIdentity.from_config(load_config(CONFIG_FILE)).sc_compression == "jpeg"
    chosen = load_config(CONFIG_FILE, {"results.sc_compression": "none"})
    assert NodeIdentity.from_config(chosen).sc_compression == "none"


@pytest.mark.parametrize("compression", ["jpeg", "none"])
def test_sc_of_a_lossy_source_says_lossy_with_the_source_history(demo_record, node, compression, tmp_path):
    lossy = dcmread(CHEST)
    lossy.LossyImageCompression, lossy.LossyImageCompressionRatio = "01", ["2.5"]
    lossy.LossyImageCompressionMethod = ["ISO_14495_1"]
    sc = build_results(lossy, demo_record, dataclasses.replace(node, sc_compression=compression))[2].dataset
    assert sc.LossyImageCompression == "01"
    expected = ["ISO_14495_1"] + (["ISO_10918_1"] if compression == "jpeg" else [])
    assert values(sc, "LossyImageCompressionMethod") == expected
    ratios = values(sc, "LossyImageCompressionRatio")
    assert float(ratios[0]) == 2.5 and len(ratios) == len(expected)
    dcmwrite(tmp_path / "sc.dcm", sc, enforce_file_format=True)
    assert_dciodvfy_clean(tmp_path / "sc.dcm")
    lossy.LossyImageCompressionMethod = ["ISO_14495_1", "ISO_10918_1"]  # one method too many: no history
    sc = build_results(lossy, demo_record, dataclasses.replace(node, sc_compression="none"))[2].dataset
    assert sc.LossyImageCompression == "01" and "LossyImageCompressionMethod" not in sc


# --- UIDs ------------------------------------------------------------------------------------------------------


def test_uids_are_deterministic_and_follow_the_model_versions(demo, chest, demo_record, node):
    results, _ = demo
    again = build_results(chest, demo_record, node)
    uids = lambda rs: [(r.dataset.SOPInstanceUID, r.dataset.SeriesInstanceUID) for r in rs]  # noqa: E731
    assert uids(again) == uids(results)
    newer = dataclasses.replace(demo_record, classifier=dataclasses.replace(DEMO_CLASSIFIER, version="0.2.0"))
    other = uids(build_results(chest, newer, node))
    assert not set(u for pair in other for u in pair) & set(u for pair in uids(results) for u in pair)
    for uid in [u for pair in uids(results) for u in pair]:
        assert uid.startswith("1.2.826.0.1.3680043.8.498.") and len(uid) <= 64 and re.fullmatch(r"[0-9.]+", uid)
    assert result_uid("1.2.3", "sr", "m 1") == result_uid("1.2.3", "sr", "m 1") != result_uid("1.2.3", "seg", "m 1")
    assert result_uid("1.2.3", "sr", "m 1") != result_series_uid("1.2.3", "sr", "m 1")
    assert derive_device_uid("PNEUMOCAD") == derive_device_uid("PNEUMOCAD") != derive_device_uid("OTHERCAD")


# --- analysed without a classifier, real analysis, geometry variants ---------------------------------------------


def test_without_a_classifier_the_sr_says_so_and_still_reports_the_lung_areas(chest, no_classifier_record, node,
                                                                               tmp_path):
    paths = write_all(build_results(chest, no_classifier_record, node), tmp_path)
    assert sorted(paths) == ["sc", "seg", "sr"]
    for path in paths.values():
        assert_dciodvfy_clean(path)
    assert_dsrdump_clean(paths["sr"])
    sr = dcmread(paths["sr"])
    assert sr.SeriesDescription == "AI pneumoconiosis report (SR)"  # no notice: no DEMO
    groups = children(only(sr, ("126010", "DCM")), ("125007", "DCM"))
    assert len(groups) == 2 and not [i for i in walk(sr.ContentSequence) if name_of(i) == ("121071", "DCM")
                                     and code_of(i) == ("40122008", "SCT")]
    assert [num(only(g, ("42798000", "SCT"))) for g in groups] == [no_classifier_record.lung_area_px["right"],
                                                                  no_classifier_record.lung_area_px["left"]]
    statements = only(sr, ("C0034375", "UMLS"))
    assert only(statements, ("NOTE", "99PNEUMOILO")).TextValue == NO_CLASSIFIER_NOTE
    assert "no pneumoconiosis classifier is installed" in NO_CLASSIFIER_NOTE.lower()
    assert not children(statements, ("111017", "DCM")) and not children(statements, ("NOTICE", "99PNEUMOILO"))
    sc = dcmread(paths["sc"])
    assert sc.SeriesDescription == "AI lung fields overlay (not for diagnosis)" and sc.BurnedInAnnotation == "YES"
    assert "No pneumoconiosis classifier installed" in banner_lines(no_classifier_record)[0][0]
    rgb = sc.pixel_array.astype(int)
    inside = ndimage.binary_erosion(no_classifier_record.labels > 0, iterations=40)[::50, ::50]
    scale = sc.Columns / chest.Columns
    r, c = np.nonzero(inside)
    sample = rgb[(r * 50 * scale).round().astype(int) + sc.Rows - round(chest.Rows * scale),
                 (c * 50 * scale).round().astype(int)]
    assert (sample.max(axis=-1) - sample.min(axis=-1) <= 3).all(), "no heat map without a classifier"


def analyse_another_encoding(node, folder: Path):
    """The JPEG-LS chest through the real analysis and result building (installed models as the caller's
    fixture says): valid objects, the notice of every model that has one, the SEG equal to the lung labels."""
    source = dcmread(CHEST_JPEG_LS)
    record = analyse(source, device="cpu")
    assert record.in_scope, record.explanation
    paths = write_all(build_results(source, record, node), folder)
    for path in paths.values():
        assert_dciodvfy_clean(path)
    assert_dsrdump_clean(paths["sr"])
    sr = dcmread(paths["sr"])
    statements = only(sr, ("C0034375", "UMLS"))
    for model in record.models:
        if model.notice:
            assert model.notice in {i.TextValue for i in children(statements, ("NOTICE", "99PNEUMOILO"))}
            assert sr.SeriesDescription.startswith("DEMO")
    seg = hd.seg.segread(paths["seg"])
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2])
    assert np.array_equal(pixels[0, ..., 0] > 0, record.labels == RIGHT_LUNG)
    assert np.array_equal(pixels[0, ..., 1] > 0, record.labels == LEFT_LUNG)
    return record, sr, statements


def test_another_encoding_with_the_bundled_classifier_reports_its_probability(with_classifier, node, tmp_path):
    record, sr, statements = analyse_another_encoding(node, tmp_path)
    assert record.classification is not None
    finding = children(only(sr, ("126010", "DCM")), ("125007", "DCM"))[0]
    assert num(only(finding, ("122157", "DCM"))) == pytest.approx(record.classification.probability, abs=1e-6)


def test_another_encoding_without_a_classifier_says_none_is_installed(without_classifier, node, tmp_path):
    record, sr, statements = analyse_another_encoding(node, tmp_path)
    assert record.classification is None
    assert only(statements, ("NOTE", "99PNEUMOILO")).TextValue == NO_CLASSIFIER_NOTE
    assert "classifier" in " ".join(text_values(sr)).lower()  # what the end-to-end test asked of such an SR
    assert not [i for i in walk(sr.ContentSequence) if name_of(i) == ("122157", "DCM")]  # no probability


def test_known_pixel_spacing_gives_areas_in_square_millimetres(chest, no_classifier_record, node, tmp_path):
    source = copy.deepcopy(chest)
    source.PixelSpacing = [0.2, 0.2]
    record = dataclasses.replace(
        no_classifier_record, pixel_spacing_mm=(0.2, 0.2),
        lung_area_mm2={k: round(v * 0.04, 1) for k, v in no_classifier_record.lung_area_px.items()})
    paths = write_all(build_results(source, record, node), tmp_path)
    for kind in ("seg", "sr"):
        assert_dciodvfy_clean(paths[kind])
    sr = dcmread(paths["sr"])
    groups = children(only(sr, ("126010", "DCM")), ("125007", "DCM"))
    for group, side in zip(groups, ("right", "left"), strict=True):
        area = only(group, ("42798000", "SCT"))
        assert num(area) == pytest.approx(record.lung_area_mm2[side]) and unit_of(area) == ("mm2", "UCUM")
    seg = dcmread(paths["seg"], stop_before_pixels=True)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [0.2, 0.2]


def test_the_image_library_reports_the_detector_spacing_and_the_areas_the_patients(chest):
    """TID 1603's pixel spacings are at the detector (Imager Pixel Spacing first); the lung areas measure the
    patient (Pixel Spacing first): the same lenient parser, two preferences (ai.header_values.pixel_spacing)."""
    from ai.normalise import pixel_spacing
    from dicom_node.results.image_library import descriptors

    def library_spacing(source):
        values = {name_of(i)[0]: float(i.MeasuredValueSequence[0].NumericValue) for i in descriptors(source)
                  if i.ValueType == "NUM" and name_of(i)[0] in ("111066", "111026")}  # vertical, horizontal
        return (values["111066"], values["111026"]) if values else None

    source = dcmread(CHEST, stop_before_pixels=True)
    source.PixelSpacing, source.ImagerPixelSpacing = [0.2, 0.21], [0.24, 0.25]
    assert library_spacing(source) == (0.24, 0.25) and pixel_spacing(source) == (0.2, 0.21)
    source.ImagerPixelSpacing = [0, 0]  # "unknown": the other attribute is the only spacing there is
    assert library_spacing(source) == (0.2, 0.21) == pixel_spacing(source)
    source.PixelSpacing = [0, 0]
    assert library_spacing(source) is None and pixel_spacing(source) is None


def test_a_source_without_patient_orientation_or_body_part_still_validates(chest, no_classifier_record, node,
                                                                           tmp_path):
    source = copy.deepcopy(chest)
    del source.PatientOrientation
    del source.BodyPartExamined
    paths = write_all(build_results(source, no_classifier_record, node), tmp_path)
    for path in paths.values():
        assert_dciodvfy_clean(path)
    for kind in ("seg", "sc"):
        ds = dcmread(paths[kind], stop_before_pixels=True)
        assert "PatientOrientation" in ds and not ds.PatientOrientation  # Type 2C: present, empty, not guessed


# --- not analysed ----------------------------------------------------------------------------------------------


def test_a_not_chest_sample_gets_a_not_analysed_sr_only(node, tmp_path):
    source = dcmread(NOT_CHEST)
    record = analyse(source, device="cpu")
    assert not record.in_scope
    results = build_results(source, record, node)
    assert [r.kind for r in results] == ["sr"]
    sr = assert_not_analysed_sr(write_all(results, tmp_path)["sr"], source, record.reason, record.explanation,
                                node)
    image = only(only(only(sr, ("111028", "DCM")), ("126200", "DCM")), ("260753009", "SCT"))
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert only(sr, ("121012", "DCM")).UID == node.device_uid


def test_build_not_analysed_for_a_job_that_failed_for_good(chest, analysed, node, tmp_path):
    reason, explanation = "unreadable_image", "pixel data cannot be decoded (RuntimeError)"
    models = [dataclasses.replace(analysed.segmenter, notice=NOTICE)]
    results = build_not_analysed(chest, reason, explanation, node, models)
    assert [r.kind for r in results] == ["sr"]
    sr = assert_not_analysed_sr(write_all(results, tmp_path)["sr"], chest, reason, explanation, node)
    assert sr.SeriesDescription.startswith("DEMO")
    assert only(only(sr, ("C0034375", "UMLS")), ("NOTICE", "99PNEUMOILO")).TextValue == NOTICE
    again = build_not_analysed(chest, reason, explanation, node, models)[0].dataset
    assert again.SOPInstanceUID == sr.SOPInstanceUID
    analysed_sr = build_results(chest, dataclasses.replace(analysed, classification=None, segmenter=models[0],
                                                           classifier=None), node)[1]
    assert analysed_sr.dataset.SOPInstanceUID != sr.SOPInstanceUID  # a later success never reuses the UID


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
                                       "1.2.826.0.1.3680043.8.498.99.1"])  # a private SOP class highdicom lacks
def test_a_non_image_source_is_named_in_the_evidence_only(sop_class, node, tmp_path):
    source = dcmread(NOT_CHEST, stop_before_pixels=True)
    source.SOPClassUID = sop_class
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword in source:
            delattr(source, keyword)
    results = build_not_analysed(source, "sop_class_not_radiograph", "SOP class is not CR, DX or secondary capture",
                                 node, [])
    sr = assert_not_analysed_sr(write_all(results, tmp_path)["sr"], source, "sop_class_not_radiograph",
                                "SOP class is not CR, DX or secondary capture", node)
    assert not children(sr, ("111028", "DCM"))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (evidence.ReferencedSOPClassUID, evidence.ReferencedSOPInstanceUID) == (sop_class, source.SOPInstanceUID)
    assert source.SOPClassUID == sop_class  # the caller's dataset is left as it was


def test_no_patient_name_or_id_reaches_logs_or_warnings(chest, demo_record, node, caplog):
    source = copy.deepcopy(chest)
    source.PatientName, source.PatientID = "Secretname", "SECRET-ID-42"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_results(source, demo_record, node)
        build_not_analysed(source, "unreadable_image", "broken", node, [])
    said = caplog.text + "\n".join(str(w.message) for w in caught)
    assert "Secretname" not in said and "SECRET-ID-42" not in said
