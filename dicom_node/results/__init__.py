"""Result DICOM objects for one analysed (or refused) radiograph: SEG, SR and SC, built with highdicom.

Pure functions: a source dataset and an ``ai.AnalysisRecord`` in, datasets ready for
``dcmwrite(path, ds, enforce_file_format=True)`` out; no database, no network, no logging of patient data. All
results join the source's study, each kind in its own series, with UIDs derived from the source instance, the
kind and the model versions (re-running gives the same UIDs). docs/results.md describes the objects.

Every builder first coerces the source's header (``coerce_header``: decoded, validated, repaired, UTF-8), so a
header value that real files carry never makes highdicom raise; a caller that wants the repairs for its audit
trail calls ``coerce_header`` itself and passes the coerced header (coercing it again repairs nothing). A builder
that fails anyway raises ``ResultEncodingError``, whose message is fixed text; ``build_last_resort_sr`` is the
report for that case.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from ai.model_info import ModelInfo
from ai.safe_text import SafeMessage

from .coerce import UTF8, Repair, coerce_header, strictly_valid
from .identity import NodeIdentity, as_highdicom_knows
from .quiet import quiet as _quiet
from .uids import derive_device_uid, model_versions, result_series_uid, result_uid

if TYPE_CHECKING:  # ai.analysis loads torch; building results needs only the record's data
    from ai.analysis import AnalysisRecord

__all__ = ["NodeIdentity", "ResultObject", "Repair", "ResultEncodingError", "build_results", "build_report",
           "build_picture", "build_not_analysed", "build_last_resort_sr", "coerce_header", "derive_device_uid",
           "result_uid", "result_series_uid", "model_versions", "LAST_RESORT_REASON"]

LAST_RESORT_REASON = "result_encoding_error"


@dataclass
class ResultObject:
    kind: str  # "sr" | "seg" | "sc"
    dataset: Dataset  # ready for dcmwrite(path, ds, enforce_file_format=True)


class ResultEncodingError(SafeMessage, ValueError):
    """A result object could not be built. The message is fixed text: the object's kind, the exception type and,
    when it can be told, the attribute keyword (a DICOM dictionary keyword, never a value). The library's own
    exception, whose text may quote header values, is chained as ``__cause__`` for tracebacks only."""

    def __init__(self, kind: str, cause: BaseException, keyword: str | None = None):
        self.kind = kind
        self.keyword = keyword
        where = f" at {keyword}" if keyword else ""
        super().__init__(f"the {kind} could not be encoded ({type(cause).__name__}{where})")


_ATTRIBUTE = re.compile(r"\b([A-Z][A-Za-z0-9]{2,63})\b")


def _keyword_of(exc: BaseException) -> str | None:
    """The DICOM keyword an exception is about, when its text names exactly one (AttributeError: "... has no
    attribute 'PatientID'"); only a keyword of pydicom's dictionary is ever returned, never other text."""
    names = {m for m in _ATTRIBUTE.findall(str(exc)) if tag_for_keyword(m) is not None}
    return names.pop() if len(names) == 1 else None


@contextmanager
def _encoding(kind: str) -> Iterator[None]:
    try:
        yield
    except ResultEncodingError:
        raise
    except Exception as exc:
        raise ResultEncodingError(kind, exc, _keyword_of(exc)) from exc


def _finish(obj: Dataset, header: Dataset) -> Dataset:
    """Patient and study exactly as in the coerced header (highdicom copies only part of them for some IODs), and
    the character set every value was written in."""
    obj.copy_patient_and_study_information(as_highdicom_knows(header))
    obj.SpecificCharacterSet = UTF8
    return obj


def _analysed(record: AnalysisRecord) -> bool:
    """Whether ``record`` has lung fields to report on (in scope and segmented)."""
    return bool(record.in_scope and record.labels is not None)


def build_results(source: Dataset, record: AnalysisRecord, node: NodeIdentity) -> list[ResultObject]:
    """An analysed record gives [SEG, SR, SC]; any other record (refused, unreadable, failed) one SR that says
    it was not analysed and why. ``build_report`` followed by ``build_picture``."""
    return build_report(source, record, node) + build_picture(source, record, node)


def build_report(source: Dataset, record: AnalysisRecord, node: NodeIdentity) -> list[ResultObject]:
    """What the radiologist reads: an analysed record gives [SEG, SR] (the SR measures the lung fields on the SEG,
    so the two go together); any other record the one SR that says it was not analysed and why."""
    if not _analysed(record):
        return build_not_analysed(source, record.reason, record.explanation, node, record.models)
    from .seg import build_seg
    from .sr import build_sr

    with _quiet("result objects"):
        with _encoding("source header"):
            header, _ = coerce_header(source)
        with _encoding("SEG"):
            seg = _finish(build_seg(header, record, node), header)
        with _encoding("SR"):
            sr = _finish(build_sr(header, record, node, seg), header)
    return [ResultObject("seg", seg), ResultObject("sr", sr)]


def build_picture(source: Dataset, record: AnalysisRecord, node: NodeIdentity) -> list[ResultObject]:
    """The heat-map SC of an analysed record ([SC]); nothing for any other record. Neither the SR nor the SEG
    references it, so it can be built after they are sent."""
    if not _analysed(record):
        return []
    from .sc import build_sc

    with _quiet("result objects"):
        with _encoding("source header"):
            header, _ = coerce_header(source)
        with _encoding("SC"):
            sc = _finish(build_sc(header, record, node), header)
    return [ResultObject("sc", sc)]


def build_not_analysed(source: Dataset, reason: str, explanation: str, node: NodeIdentity,
                       models: Sequence[ModelInfo]) -> list[ResultObject]:
    """[SR "not analysed"] for an instance that got no analysis: refused by the scope checks, or a job that
    failed for good (e.g. corrupted pixel data) where no record exists."""
    with _quiet("result objects"):
        with _encoding("source header"):
            header, _ = coerce_header(source)
        return [ResultObject("sr", _not_analysed_sr(header, reason, explanation, node, models))]


def _not_analysed_sr(header: Dataset, reason: str, explanation: str, node: NodeIdentity,
                     models: Sequence[ModelInfo]) -> Dataset:
    from .sr import build_not_analysed_sr

    with _encoding("not-analysed SR"):
        return _finish(build_not_analysed_sr(header, reason, explanation, node, list(models)), header)


# --- the last resort ------------------------------------------------------------------------------------------

MINIMAL_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# The Type 2 attributes of the Patient and General Study modules, which highdicom's constructors read.
MINIMAL_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")


def minimal_header(header: Dataset, keep_values: bool = True) -> Dataset:
    """Only the UIDs, the SOP class, Modality and the Type 2 patient and study attributes: each with its value
    when that passes strict validation (and ``keep_values``), else empty."""
    minimal = Dataset()
    minimal.SpecificCharacterSet = UTF8
    for keyword in MINIMAL_UIDS:
        value = header.get(keyword)
        if value:
            minimal.add(DataElement(Tag(keyword), "UI", str(value)))
    modality = header.get("Modality")
    if isinstance(modality, str) and strictly_valid("Modality", modality):
        minimal.Modality = modality
    for keyword in MINIMAL_TYPE_2:
        value = header.get(keyword) if keep_values else None
        text = str(value) if isinstance(value, (str, PersonName)) else ""
        setattr(minimal, keyword, text if text and strictly_valid(keyword, text) else "")
    if hasattr(header, "file_meta"):
        minimal.file_meta = header.file_meta
    return minimal


def build_last_resort_sr(source: Dataset, reason: str, explanation: str, node: NodeIdentity,
                         models: Sequence[ModelInfo]) -> list[ResultObject]:
    """[SR "not analysed"] when building the normal results, or the normal "not analysed" SR, failed for any
    reason. Tries the normal "not analysed" SR on the coerced header; then on a minimal header (UIDs, SOP class,
    Modality, the Type 2 patient and study attributes, each value only when it passes strict validation); then on
    the same with every patient and study value empty. Raises ``ResultEncodingError`` only when even that fails
    (a source without usable UIDs)."""
    reason = reason or LAST_RESORT_REASON
    explanation = explanation or "the result objects could not be encoded"
    failure: BaseException | None = None
    with _quiet("result objects"):
        try:
            header, _ = coerce_header(source)
        except Exception as exc:  # coercion itself failed: start from the source's own UIDs
            failure, header = exc, source
        attempts = [header] if failure is None else []
        attempts += [minimal_header(header), minimal_header(header, keep_values=False)]
        for attempt in attempts:
            try:
                return [ResultObject("sr", _not_analysed_sr(attempt, reason, explanation, node, models))]
            except Exception as exc:
                failure = exc
    assert failure is not None
    if isinstance(failure, ResultEncodingError):
        raise failure
    raise ResultEncodingError("last-resort SR", failure, _keyword_of(failure)) from failure
