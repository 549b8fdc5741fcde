"""Header coercion (dicom_node/results/coerce.py) and result building on the header-variant corpus
(tests/header_variants.py): each rule, idempotence, the source left as it was, repairs without values; every
variant gives results that dciodvfy accepts, in UTF-8, and no planted patient value reaches a log record or a
warning."""

from __future__ import annotations

import dataclasses
import gc
import logging
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from ai import analyse
from dicom_node.results import (
    NodeIdentity,
    Repair,
    ResultEncodingError,
    build_last_resort_sr,
    build_not_analysed,
    build_results,
    coerce_header,
    derive_device_uid,
)
from dicom_node.results import coerce as coercion

from .header_variants import PROBLEMS, Variant, variant, variants
from .support.data import CHEST_UNCOMPRESSED as CHEST
from .support.dicom_tools import dciodvfy_errors

ALL = variants()
STRING_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT"}  # DA/TM/DS/IS: pydicom's types
REASON, EXPLANATION = "body_part_not_chest", "Body Part Examined is not CHEST"

# SEG + SR + SC for these: the values, the structures, an invalid value of each attribute that SEG and SC
# copy themselves (orientation, body part, spacing, laterality, equipment), two character-set files. Every variant
# (these included) also gets its "not analysed" SR built and checked the same way. The heat-map picture is the
# same for every variant (one analysis record), so it is rendered once (see render_once).
FULL = ({name for name, *_ in PROBLEMS}
        | {"baseline", "all-problems-at-once", "uids-not-under-a-valid-root", "procedure-code-sequence-ir87",
           "veterinary-complete", "veterinary-species-description", "charset-file-chrH31", "charset-file-chrX2"}
        | {f"{keyword}-invalid" for keyword in ("PatientOrientation", "BodyPartExamined", "PixelSpacing",
                                                "ImagerPixelSpacing", "Laterality", "Manufacturer", "InstitutionName")})


# --- helpers ----------------------------------------------------------------------------------------------------


def text_values_are_str(ds: Dataset) -> list[str]:
    """Keywords of elements whose values are not decoded: raw elements, bytes, a string VR holding anything but
    str (or pydicom's PersonName)."""
    bad = []
    for tag in ds.keys():
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            bad.append(keyword_for_tag(tag) or str(tag))
            continue
        if element.VR == "SQ":
            for item in element.value:
                bad += text_values_are_str(item)
        elif element.value is not None and not element.VR.startswith(("O", "UN")):  # binary data, "OB or OW"
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            if any(isinstance(v, (bytes, bytearray)) for v in values) or (
                    element.VR in STRING_VRS and not all(isinstance(v, (str, PersonName)) for v in values)):
                bad.append(element.keyword)
    return bad


def said(caplog, caught) -> str:
    return caplog.text + "\n" + "\n".join(str(w.message) for w in caught)


def leaks(text: str, v: Variant) -> list[str]:
    return [p for p in v.planted if p in text]


def assert_no_library_warning_but_single_component_names(caplog, header: Dataset) -> None:
    """After coercion the libraries find nothing wrong; the one warning left is highdicom's about a patient name
    of a single component (valid DICOM, e.g. the Greek and Russian charset samples), withheld from the log."""
    withheld = [r.getMessage() for r in caplog.records if r.name == "dicom_node.results.quiet"]
    name = str(header.get("PatientName", ""))
    single = bool(name) and "^" not in name
    assert not withheld or (single and all("UserWarning at base.py" in line for line in withheld)), withheld


@pytest.fixture(scope="module")
def node() -> NodeIdentity:
    return NodeIdentity(ae_title="PNEUMOCAD", device_uid=derive_device_uid("PNEUMOCAD"))


@pytest.fixture(scope="module")
def record():
    """One real analysis of the chest: every variant has the chest's pixels, so the record is the same."""
    result = analyse(dcmread(CHEST), device="cpu")
    assert result.in_scope and result.labels is not None, result.explanation
    return result


@pytest.fixture(scope="module")
def render_once():
    """The SC's picture depends on the record only, which every variant shares: rendered once here (test_results.py
    checks the picture itself; this file tests the header)."""
    from dicom_node.results import sc

    original, memo = sc.render, {}

    def render(pixels, labels, heat, lines):
        key = (id(pixels), id(labels), id(heat), tuple(lines))
        if key not in memo:
            memo[key] = original(pixels, labels, heat, lines)
        return memo[key].copy()

    sc.render = render
    yield
    sc.render = original


# --- coercion rules ---------------------------------------------------------------------------------------------


def test_the_baseline_needs_no_repair_and_keeps_every_value():
    source = variant("baseline").dataset
    header, repairs = coerce_header(source)
    assert repairs == []
    assert header.SpecificCharacterSet == "ISO_IR 192"
    assert "PixelData" not in header and header.file_meta == source.file_meta
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyDescription", "Manufacturer",
                    "InstitutionName", "PatientOrientation", "BodyPartExamined", "PixelSpacing", "Rows", "Columns"):
        assert header.get(keyword) == source.get(keyword), keyword
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert header[keyword].value == source[keyword].value
    assert set(header.dir()) <= set(coercion.copied_keywords()) | {"SpecificCharacterSet"}


@pytest.mark.parametrize("v", [v for v in ALL if v.expect], ids=lambda v: v.name)
def test_each_rule_repairs_what_it_must(v):
    header, repairs = coerce_header(v.dataset)
    got = {(r.keyword, r.action) for r in repairs}
    assert set(v.expect) <= got, (v.name, sorted(got))
    for keyword, action in v.expect:
        if action.startswith("emptied") or action == "added_empty":
            assert keyword in header and not header[keyword].value, keyword
        elif action.startswith("dropped"):
            assert keyword not in header, keyword


def test_type_2_values_are_emptied_type_3_dropped():
    header, _ = coerce_header(variant("PatientID-overlong").dataset)
    assert "PatientID" in header and header.PatientID == ""
    header, _ = coerce_header(variant("IssuerOfPatientID-overlong").dataset)
    assert "IssuerOfPatientID" not in header
    header, _ = coerce_header(variant("sex-q").dataset)
    assert header.PatientSex == ""
    header, repairs = coerce_header(variant("patient-and-study-type-2-absent").dataset)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                    "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
        assert keyword in header and not header[keyword].value


def test_a_veterinary_source_gets_the_attributes_its_modules_require():
    header, _ = coerce_header(variant("veterinary-species-description").dataset)
    for keyword in ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
                    "ResponsiblePerson", "ResponsibleOrganization", "PatientSexNeutered"):
        assert keyword in header and not header[keyword].value, keyword
    complete, repairs = coerce_header(variant("veterinary-complete").dataset)
    assert repairs == [Repair("PatientSexNeutered", "added_empty")]
    assert complete.ResponsiblePerson == "Ownerplanted^Rr" and complete.ResponsiblePersonRole == "OWNER"
    human, _ = coerce_header(variant("baseline").dataset)
    assert "PatientBreedDescription" not in human and "ResponsiblePerson" not in human


def test_character_sets_decode_as_pydicom_decodes_them_and_come_out_as_utf8(tmp_path):
    for v in [v for v in ALL if v.name.startswith("charset-file-") or "-charset-" in v.name]:
        source = v.dataset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {k: str(source.get(k)) for k in ("PatientName", "PatientID", "OtherPatientNames",
                                                         "ReferringPhysicianName", "StudyDescription",
                                                         "InstitutionName", "ManufacturerModelName") if k in source}
        header, repairs = coerce_header(source)
        assert not [r for r in repairs if r.action == "charset_fallback"], v.name
        for keyword, value in expected.items():
            if keyword in header:
                assert str(header.get(keyword)) == value, (v.name, keyword)
        path = tmp_path / f"{v.name}.dcm"
        dcmwrite(path, header, enforce_file_format=True)
        again = dcmread(path)
        assert again.SpecificCharacterSet == "ISO_IR 192"
        assert str(again.PatientName) == str(header.PatientName), v.name
        assert str(header.PatientName).encode("utf-8") in path.read_bytes()


@pytest.mark.parametrize("name, expected", [
    ("charset-unknown", "Zzplantéd^Qqnäme"),  # latin-1 bytes: not UTF-8, so ISO 8859-1
    ("charset-utf8-declared-latin1-bytes", "Zzplantéd^Qqnäme"),
    ("charset-none-utf8-bytes", "Zzplantéd^Qqnäme"),  # no Specific Character Set, UTF-8 bytes: UTF-8
    ("charset-iso2022-ir100-alone", "Zzplantéd^Qqnäme"),
    ("charset-empty-then-ir87", "Zzplanted^山田=やまだ"),
])
def test_undecodable_and_unusual_character_sets_fall_back_deterministically(name, expected):
    first, repairs = coerce_header(variant(name).dataset)
    second, _ = coerce_header(variant(name).dataset)
    assert str(first.PatientName) == str(second.PatientName) == expected
    fell_back = ("PatientName", "charset_fallback") in {(r.keyword, r.action) for r in repairs}
    assert fell_back == (name in ("charset-unknown", "charset-utf8-declared-latin1-bytes", "charset-none-utf8-bytes"))


def test_a_broken_escape_sequence_falls_back_and_an_unusable_value_is_emptied():
    header, repairs = coerce_header(variant("charset-ir87-broken-escape").dataset)
    assert {("PatientName", "charset_fallback"), ("PatientName", "emptied_invalid")} <= {
        (r.keyword, r.action) for r in repairs}
    assert header.PatientName == ""


def test_uids_are_kept_as_they_are():
    source = variant("uids-not-under-a-valid-root").dataset
    header, repairs = coerce_header(source)
    assert repairs == []
    assert (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID) == (
        "999.7731.1", "999.7731.1.2", "999.7731.1.2.3")


@pytest.mark.parametrize("v", ALL, ids=lambda v: v.name)
def test_coercion_is_idempotent_leaves_the_source_as_it_was_and_names_no_value(v, caplog):
    source, pristine = v.dataset, v.dataset
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # reading the file may warn (pydicom, about the character set); coercing must not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        header, repairs = coerce_header(source)
        again, more = coerce_header(header)
    assert not caplog.records and not caught, said(caplog, caught)  # coercion is silent
    assert more == [] and again == header, (v.name, more)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # comparing converts (and pydicom logs) what coercion left raw
        assert source == pristine and len(source) == len(pristine)
    assert header.SpecificCharacterSet == "ISO_IR 192" and not text_values_are_str(header)
    for repair in repairs:
        assert [f.name for f in dataclasses.fields(repair)] == ["keyword", "action"]
        assert tag_for_keyword(repair.keyword) is not None and repair.action in coercion.ACTIONS
    assert not leaks(repr(repairs), v)


def test_the_source_dataset_object_is_never_modified():
    source = dcmread(CHEST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid date it is given
        source.PatientBirthDate = "1950-12-31"
        source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    before = [(e.tag, e.VR, e.value) for e in source]
    coerce_header(source)
    assert [(e.tag, e.VR, e.value) for e in source] == before and "PixelData" in source


# --- every variant gives valid results, without leaks --------------------------------------------------------


def check_objects(objects, v: Variant, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for result in objects:
        ds = result.dataset
        assert ds.SpecificCharacterSet == "ISO_IR 192", (v.name, result.kind)
        assert not text_values_are_str(ds), (v.name, result.kind, text_values_are_str(ds))
        path = folder / f"{result.kind}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        errors = dciodvfy_errors(path, v.uids_off_root)
        assert not errors, (v.name, result.kind, errors)


@pytest.mark.parametrize("v", ALL, ids=lambda v: v.name)
def test_every_variant_gets_a_valid_not_analysed_sr_without_leaks(v, node, caplog, tmp_path):
    source = v.dataset
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = build_not_analysed(source, REASON, EXPLANATION, node, [])
    assert [o.kind for o in objects] == ["sr"]
    assert not leaks(said(caplog, caught), v), said(caplog, caught)
    check_objects(objects, v, tmp_path)
    header, _ = coerce_header(v.dataset)
    assert_no_library_warning_but_single_component_names(caplog, header)
    sr = objects[0].dataset
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert sr.get(keyword) == header.get(keyword), keyword  # the coerced values, as they are


@pytest.mark.parametrize("v", [v for v in ALL if v.name in FULL], ids=lambda v: v.name)
def test_full_results_for_the_variants_that_matter_to_seg_and_sc(v, node, record, render_once, caplog, tmp_path):
    source = v.dataset
    caplog.set_level(logging.DEBUG)
    gc.collect()  # an earlier test's unclosed object (a PostgreSQL connection) warns when collected, not here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = build_results(source, record, node)
    assert [o.kind for o in objects] == ["seg", "sr", "sc"]
    assert not leaks(said(caplog, caught), v), said(caplog, caught)
    check_objects(objects, v, tmp_path)
    header, _ = coerce_header(v.dataset)
    assert_no_library_warning_but_single_component_names(caplog, header)
    for result in objects:
        for keyword in ("PatientName", "PatientID", "StudyDate", "AccessionNumber"):
            assert result.dataset.get(keyword) == header.get(keyword), (result.kind, keyword)


def test_the_full_set_names_real_variants():
    assert FULL <= {v.name for v in ALL} and len(FULL) >= 30 and {name for name, *_ in PROBLEMS} <= FULL


# --- failures: fixed messages, the last-resort SR ---------------------------------------------------------------


def test_a_builder_failure_is_a_result_encoding_error_with_a_fixed_message(node, record, monkeypatch, caplog):
    from dicom_node.results import seg

    v = variant("baseline")
    planted = "Zzplanted^Qqname"

    def broken(*args, **kwargs):
        raise ValueError(f"Unable to convert '{planted}' to 'PN' object")

    monkeypatch.setattr(seg, "build_seg", broken)
    with pytest.raises(ResultEncodingError) as info:
        build_results(v.dataset, record, node)
    assert planted not in str(info.value) and "ValueError" in str(info.value) and "SEG" in str(info.value)

    def missing(*args, **kwargs):
        raise AttributeError("'FileDataset' object has no attribute 'PatientID'")

    monkeypatch.setattr(seg, "build_seg", missing)
    with pytest.raises(ResultEncodingError) as info:
        build_results(v.dataset, record, node)
    assert info.value.keyword == "PatientID" and "at PatientID" in str(info.value)


@pytest.mark.parametrize("name", ["baseline", "all-problems-at-once", "charset-file-chrH31", "veterinary-complete",
                                  "patient-and-study-type-2-absent"])
def test_the_last_resort_sr_on_the_coerced_header(name, node, tmp_path, caplog):
    v = variant(name)
    caplog.set_level(logging.DEBUG)
    objects = build_last_resort_sr(v.dataset, "result_encoding_error", "the result objects could not be encoded",
                                   node, [])
    assert not leaks(caplog.text, v)
    check_objects(objects, v, tmp_path)
    header, _ = coerce_header(v.dataset)
    assert objects[0].dataset.PatientName == header.PatientName


def test_the_last_resort_sr_falls_back_to_a_minimal_header_then_to_empty_values(node, monkeypatch, tmp_path):
    from dicom_node.results import sr

    real = sr.build_not_analysed_sr
    calls: list[set[str]] = []

    def fails_on_rich_headers(header, *args, **kwargs):
        calls.append(set(header.dir()))
        if "StudyDescription" in header:  # only the coerced header has it, not the minimal one
            raise ValueError("'Planted study Jj2207' is not valid")
        return real(header, *args, **kwargs)

    monkeypatch.setattr(sr, "build_not_analysed_sr", fails_on_rich_headers)
    v = variant("baseline")
    objects = build_last_resort_sr(v.dataset, "result_encoding_error", "encoding failed", node, [])
    check_objects(objects, v, tmp_path / "minimal")
    minimal = objects[0].dataset
    assert str(minimal.PatientName) == "Zzplanted^Qqname" and minimal.PatientID == "PLANTED-ID-7731"
    assert "StudyDescription" not in minimal and len(calls) == 2

    def fails_with_any_patient_value(header, *args, **kwargs):
        if header.get("PatientName"):
            raise ValueError("'Zzplanted^Qqname'")
        return real(header, *args, **kwargs)

    monkeypatch.setattr(sr, "build_not_analysed_sr", fails_with_any_patient_value)
    objects = build_last_resort_sr(v.dataset, "result_encoding_error", "encoding failed", node, [])
    check_objects(objects, v, tmp_path / "empty")
    empty = objects[0].dataset
    assert empty.PatientName == "" and empty.PatientID == "" and empty.StudyInstanceUID == v.dataset.StudyInstanceUID

    def always_fails(header, *args, **kwargs):
        raise ValueError("'Zzplanted^Qqname' again")

    monkeypatch.setattr(sr, "build_not_analysed_sr", always_fails)
    with pytest.raises(ResultEncodingError) as info:
        build_last_resort_sr(v.dataset, "result_encoding_error", "encoding failed", node, [])
    assert "Zzplanted" not in str(info.value)


def test_the_last_resort_sr_from_uids_alone(node, tmp_path):
    """What the worker has when even the archived header cannot be read: the UIDs its database recorded."""
    source = Dataset()
    chest = variant("baseline").dataset
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        setattr(source, keyword, chest.get(keyword))
    objects = build_last_resort_sr(source, "unreadable_file", "the archived file cannot be read", node, [])
    check_objects(objects, variant("baseline"), tmp_path)
