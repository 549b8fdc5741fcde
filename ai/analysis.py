"""``analyse``: one entry point from a dataset or an image file to an analysis record.

Header scope verdict -> decode -> normalise -> lung segmentation -> image-based input check -> lung areas.
A refused or unreadable input still gets a record that says why; nothing raises for bad input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from .header_scope import header_scope
from .input_check import InputCheck, check_lung_fields
from .lungs import LEFT_LUNG, RIGHT_LUNG
from .classifier import Classification
from .models import lung_segmenter, pneumoconiosis_classifier
from .normalise import NormalisedImage, UnreadableImage, decode_pixels, is_dicom_file, normalise_dataset, \
    normalise_picture

Source = Dataset | Path | str


@dataclass
class AnalysisRecord:
    source: str  # file path, or the SOP Instance UID of a dataset
    in_scope: bool  # analysed: header and image both say frontal chest
    reason: str  # "in_scope" or the reason code for refusal / failure
    explanation: str
    sop_instance_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    labels: np.ndarray | None = None  # uint8 native grid: 0 background, 1 right lung, 2 left lung
    lung_area_px: dict[str, int] | None = None
    lung_area_mm2: dict[str, float] | None = None
    input_check: dict[str, float] = field(default_factory=dict)
    models: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    image: NormalisedImage | None = None  # kept for result rendering (heat map, secondary capture)
    classification: Classification | None = None  # None when not analysed or no classifier is installed

    def to_json(self) -> dict[str, Any]:
        """The JSON line of ``dicom-node analyse --json`` (no pixel arrays)."""
        return {
            "source": self.source,
            "sop_instance_uid": self.sop_instance_uid,
            "analysed": self.in_scope,
            "reason": self.reason,
            "explanation": self.explanation,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
            "lung_area_px": self.lung_area_px,
            "lung_area_mm2": self.lung_area_mm2,
            "input_check": {k: round(v, 4) for k, v in self.input_check.items()},
            "models": self.models,
            "timings_ms": {k: round(v * 1000, 1) for k, v in self.timings.items()},
            "error": self.error,
            **self._classification_json(),
        }

    def _classification_json(self) -> dict[str, Any]:
        c = self.classification
        if c is None:
            return {"pneumoconiosis": None, "profusion_category": None, "zones": None}
        return {
            "pneumoconiosis": {"probability": round(c.probability, 4), "present": c.present,
                               "threshold": round(c.threshold, 4)},
            "profusion_category": {"most_likely": c.most_likely_category,
                                   "probabilities": [round(p, 4) for p in c.category_probabilities]},
            "zones": {k: round(v, 4) for k, v in c.zones.items()},
        }


@dataclass
class _Prepared:
    record: AnalysisRecord
    image: NormalisedImage | None


def _prepare(source: Source) -> _Prepared:
    """Read, check the header, decode and normalise one input; a refusal or error ends in the record."""
    name = source.SOPInstanceUID if isinstance(source, Dataset) and "SOPInstanceUID" in source else str(source)
    record = AnalysisRecord(source=str(name), in_scope=False, reason="unreadable_image", explanation="")
    started = time.perf_counter()
    try:
        ds: Dataset | None = source if isinstance(source, Dataset) else None
        path = None if ds is not None else Path(source)  # type: ignore[arg-type]
        if path is not None and is_dicom_file(path):
            ds = dcmread(path)
            if "SOPClassUID" not in ds:
                raise UnreadableImage("not a readable DICOM dataset (no SOP Class UID)")
        if ds is not None:
            record.sop_instance_uid = str(ds.get("SOPInstanceUID", "")) or None
            verdict = header_scope(ds)
            if not verdict.in_scope:
                record.reason, record.explanation = verdict.reason, verdict.explanation
                return _Prepared(record, None)
            stored = decode_pixels(ds)
            decoded = time.perf_counter()
            image = normalise_dataset(ds, stored)
        else:
            decoded = time.perf_counter()
            image = normalise_picture(path)  # type: ignore[arg-type]
    except UnreadableImage as exc:
        record.error = str(exc)
        record.explanation = str(exc)
        return _Prepared(record, None)
    except FileNotFoundError:
        record.error = record.explanation = "file not found"
        return _Prepared(record, None)
    except Exception as exc:  # a corrupt file must give a clear answer, never a crash
        record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        record.explanation = "the file cannot be read as an image"
        return _Prepared(record, None)
    record.timings["decode"] = decoded - started
    record.timings["normalise"] = time.perf_counter() - decoded
    record.rows, record.columns = image.pixels.shape
    record.pixel_spacing_mm = image.pixel_spacing_mm
    record.image = image
    return _Prepared(record, image)


def _finish(record: AnalysisRecord, labels: np.ndarray, check: InputCheck) -> None:
    record.input_check = check.measurements
    record.reason, record.explanation = check.reason, check.explanation
    record.in_scope = check.accepted
    if not check.accepted:
        return
    record.labels = labels
    right = int(np.count_nonzero(labels == RIGHT_LUNG))
    left = int(np.count_nonzero(labels == LEFT_LUNG))
    record.lung_area_px = {"right": right, "left": left}
    if record.pixel_spacing_mm:
        pixel_mm2 = record.pixel_spacing_mm[0] * record.pixel_spacing_mm[1]
        record.lung_area_mm2 = {"right": round(right * pixel_mm2, 1), "left": round(left * pixel_mm2, 1)}


def analyse_batch(sources: Sequence[Source], device: str | None = None) -> list[AnalysisRecord]:
    """Analyse several inputs with one model call for all that reach segmentation (the worker's form)."""
    segmenter = lung_segmenter(device)
    classifier = pneumoconiosis_classifier(device)
    prepared = [_prepare(s) for s in sources]
    todo = [p for p in prepared if p.image is not None]
    if todo:
        for p, seg in zip(todo, segmenter.segment([p.image for p in todo])):  # type: ignore[misc]
            p.record.timings.update(seg.timings)
            p.record.models.append(segmenter.describe())
            started = time.perf_counter()
            check = check_lung_fields(seg.labels, seg.confidence)
            p.record.timings["input_check"] = time.perf_counter() - started
            _finish(p.record, seg.labels, check)
            if classifier is not None and p.record.in_scope:
                p.record.classification = classifier.classify(p.image, seg.labels)  # type: ignore[arg-type]
                p.record.timings.update(p.record.classification.timings)
                p.record.models.append(classifier.describe())
    for p in prepared:
        p.record.timings["total"] = sum(p.record.timings.values())
    return [p.record for p in prepared]


def analyse(source: Source, device: str | None = None) -> AnalysisRecord:
    return analyse_batch([source], device)[0]
