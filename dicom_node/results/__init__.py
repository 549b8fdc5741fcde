"""Result DICOM objects for one analysed (or refused) radiograph: SEG, SR and SC, built with highdicom.

Pure functions: a source dataset and an ``ai.AnalysisRecord`` in, datasets ready for
``dcmwrite(path, ds, enforce_file_format=True)`` out; no database, no network, no logging of patient data. All
results join the source's study, each kind in its own series, with UIDs derived from the source instance, the
kind and the model versions (re-running gives the same UIDs). docs/results.md describes the objects.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from pydicom.dataset import Dataset

from .identity import NodeIdentity, as_highdicom_knows
from .uids import derive_device_uid, model_versions, result_series_uid, result_uid

if TYPE_CHECKING:  # ai.analysis loads torch; building results needs only the record's data
    from ai.analysis import AnalysisRecord

__all__ = ["NodeIdentity", "ResultObject", "build_results", "build_not_analysed", "derive_device_uid",
           "result_uid", "result_series_uid", "model_versions"]


@dataclass
class ResultObject:
    kind: str  # "sr" | "seg" | "sc"
    dataset: Dataset  # ready for dcmwrite(path, ds, enforce_file_format=True)


@contextmanager
def _no_names_in_warnings():
    """highdicom warns about single-component person names and quotes the name (a patient's, a referring
    physician's) in the warning, which ends up in logs; those warnings are dropped here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        yield


def _finish(obj: Dataset, source: Dataset) -> Dataset:
    """Patient and study exactly as in the source (highdicom copies only part of them for some IODs)."""
    obj.copy_patient_and_study_information(as_highdicom_knows(source))
    return obj


def build_results(source: Dataset, record: AnalysisRecord, node: NodeIdentity) -> list[ResultObject]:
    """An analysed record gives [SEG, SR, SC]; any other record (refused, unreadable, failed) one SR that says
    it was not analysed and why."""
    if not record.in_scope or record.labels is None:
        return build_not_analysed(source, record.reason, record.explanation, node, record.models)
    from .sc import build_sc
    from .seg import build_seg
    from .sr import build_sr

    with _no_names_in_warnings():
        seg = _finish(build_seg(source, record, node), source)
        sr = _finish(build_sr(source, record, node, seg), source)
        sc = _finish(build_sc(source, record, node), source)
    return [ResultObject("seg", seg), ResultObject("sr", sr), ResultObject("sc", sc)]


def build_not_analysed(source: Dataset, reason: str, explanation: str, node: NodeIdentity,
                       models: Sequence[Mapping[str, str]]) -> list[ResultObject]:
    """[SR "not analysed"] for an instance that got no analysis: refused by the scope checks, or a job that
    failed for good (e.g. corrupted pixel data) where no record exists."""
    from .sr import build_not_analysed_sr

    with _no_names_in_warnings():
        sr = _finish(build_not_analysed_sr(source, reason, explanation, node, list(models)), source)
    return [ResultObject("sr", sr)]
