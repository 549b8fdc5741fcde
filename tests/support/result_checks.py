"""Checks every result object of one kind must pass, wherever it was made (``build_*``, the worker, a node)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from .dicom_tools import assert_dciodvfy_clean, assert_dsrdump_clean
from .sr_tree import children, code_of, name_of, only, sr_text

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def our_equipment(ds: Dataset, node: Any) -> Dataset:
    """The node's Contributing Equipment item (highdicom adds its own and the source's acquisition device)."""
    ours = [e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == node.device_uid]
    assert len(ours) == 1
    purpose = ours[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109102", "DCM", "Processing Equipment")
    return ours[0]


def assert_not_analysed_sr(path: Path, source: Dataset | Path, reason: str, explanation: str = "",
                           node: Any = None, *, row: Any = None, from_recorded_uids: bool = False,
                           allow_off_root_uids: bool = False) -> Dataset:
    """A valid "not analysed" SR about ``source`` (a dataset or its file) for ``reason``; returns it.

    ``explanation``: text the explanation must contain; ``node`` (a NodeIdentity): its equipment must be named;
    ``row`` (a ``db.models.Result``): the row that records this SR; ``from_recorded_uids``: the source's header was
    gone and the SR was written from the UIDs the intake recorded (no patient attributes to compare);
    ``allow_off_root_uids``: the source's own UIDs are not under a valid root (see ``dicom_tools``)."""
    assert_dciodvfy_clean(path, allow_off_root_uids)
    assert_dsrdump_clean(path)
    if not isinstance(source, Dataset):
        source = dcmread(source, stop_before_pixels=True)
    sr = dcmread(path)
    if row is not None:
        assert (row.kind, row.analysed, row.reason) == ("sr", False, reason)
        assert sr.SOPInstanceUID == row.sop_instance_uid
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    if not from_recorded_uids:
        assert sr.PatientID == source.PatientID
    assert "NOT ANALYSED" in sr.SeriesDescription
    assert name_of(sr) == ("126000", "DCM") and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert not children(sr, ("126010", "DCM"))  # no measurements
    statements = only(sr, ("C0034375", "UMLS"))
    assert code_of(only(statements, ("111017", "DCM"))) == ("111245", "DCM")  # no algorithms succeeded
    assert only(statements, ("REASON", "99PNEUMOILO")).TextValue == reason
    assert sr_text(sr, "REASON") == [reason]  # and nowhere else
    why = only(statements, ("EXPLANATION", "99PNEUMOILO")).TextValue
    assert explanation in why and "NOT been assessed for pneumoconiosis" in why
    assert all("NOT been assessed" in text for text in sr_text(sr, "EXPLANATION"))
    if node is not None:
        assert our_equipment(sr, node).DeviceUID == node.device_uid
    return sr
