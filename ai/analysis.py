"""``analyse``: one entry point from a dataset or an image file to an analysis record.

Header scope verdict -> decode -> normalise -> lung segmentation -> image-based input check -> lung areas.
A refused or unreadable input still gets a record that says why; nothing raises for bad input, and an exception
inside the models costs only the input that raised it.

Failure records (``error`` set) say whether trying again later could help (``retryable``) and why they failed
(``reason``): see ``FAILURE_REASONS``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from .classifier import Classification
from .header_scope import header_scope
from .input_check import InputCheck, check_lung_fields
from .limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, check_declared_size
from .lungs import LEFT_LUNG, RIGHT_LUNG
from .model_info import ModelInfo
from .models import ModelDir, lung_segmenter, pneumoconiosis_classifier
from .normalise import (
    DECODE_TIMEOUT,
    NormalisedImage,
    UnreadableImage,
    decode_pixels,
    normalise_dataset,
    normalise_picture,
    read_image_file,
)
from .safe_text import exception_summary

LOG = logging.getLogger("ai.analysis")

FAILURE_REASONS: dict[str, tuple[str, bool]] = {
    # reason code: (explanation, retryable)
    "unreadable_image": ("the file cannot be read as an image", False),
    "no_pixel_data": ("the dataset has no pixel data", False),
    "not_monochrome": ("the pixel data is not a single-frame grayscale image", False),
    "multi_frame": ("the pixel data holds more than one frame", False),
    "undecodable_pixels": ("the pixel data cannot be decoded", False),
    "decoder_crashed": ("the pixel decoder crashed on this image", False),
    "decoder_timeout": ("decoding the pixel data took too long", False),
    "decoder_unavailable": ("the pixel decoder could not be started", True),
    "image_too_large": ("the image exceeds the configured size limits (limits.*)", False),
    "file_not_found": ("file not found", True),  # an NFS archive may come back
    "file_unavailable": ("the file cannot be opened", True),
    "analysis_error": ("the analysis raised an unexpected error", True),
}
"""Reasons of failure records, with their explanation and whether the same input may succeed later. Refusals
(header scope, image check) are not failures: ``error`` is None and ``retryable`` False."""

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
    segmenter: ModelInfo | None = None  # set once segmentation ran (None: refused or failed before it)
    classifier: ModelInfo | None = None  # set once the classifier ran (None: not run, or none installed)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # log-safe (ai.safe_text.exception_summary): never a library's exception text
    retryable: bool = False  # a failure that may succeed when tried again later (missing file, model error)
    image: NormalisedImage | None = None  # kept for result rendering (heat map, secondary capture)
    classification: Classification | None = None  # None when not analysed or no classifier is installed

    @property
    def models(self) -> list[ModelInfo]:
        """The models that ran on this input, in run order: the segmenter, then the classifier."""
        return [m for m in (self.segmenter, self.classifier) if m is not None]

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
            "models": [m.to_json() for m in self.models],
            "timings_ms": {k: round(v * 1000, 1) for k, v in self.timings.items()},
            "error": self.error,
            "retryable": self.retryable,
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


def _fail(record: AnalysisRecord, reason: str, exc: BaseException, message: str | None = None,
          retryable: bool | None = None) -> None:
    """Make ``record`` a failure record: log-safe error, reason code, explanation and retryable flag."""
    explanation, default_retryable = FAILURE_REASONS.get(reason, (None, False))
    record.in_scope = False
    record.reason = reason
    record.retryable = default_retryable if retryable is None else retryable
    record.error = exception_summary(exc, message=message)
    record.explanation = explanation or (str(exc) if isinstance(exc, UnreadableImage) else "analysis failed")


def _prepare(source: Source, decode_timeout: float, limits: ImageLimits) -> _Prepared:
    """Read, check the header, decode and normalise one input; a refusal or error ends in the record."""
    name = source.SOPInstanceUID if isinstance(source, Dataset) and "SOPInstanceUID" in source else str(source)
    record = AnalysisRecord(source=str(name), in_scope=False, reason="unreadable_image", explanation="")
    started = time.perf_counter()
    try:
        ds: Dataset | None = source if isinstance(source, Dataset) else None
        path = None if isinstance(source, Dataset) else Path(source)
        if path is not None:
            ds = read_image_file(path, limits)  # None: a picture (PNG/JPEG)
        if ds is not None:
            record.sop_instance_uid = str(ds.get("SOPInstanceUID", "")) or None
            verdict = header_scope(ds)
            if not verdict.in_scope:
                record.reason, record.explanation = verdict.reason, verdict.explanation
                return _Prepared(record, None)
            check_declared_size(ds, limits)  # nothing is decoded beyond the limits
            stored = decode_pixels(ds, decode_timeout)
            decoded = time.perf_counter()
            image = normalise_dataset(ds, stored)
        else:
            decoded = time.perf_counter()
            try:
                image = normalise_picture(path)  # type: ignore[arg-type]
            except (OSError, ValueError):
                raise UnreadableImage("not a readable image file") from None
    except ImageTooLarge as exc:
        _fail(record, "image_too_large", exc)
        record.explanation = str(exc)  # a SafeMessage: sizes and limits only
        return _Prepared(record, None)
    except UnreadableImage as exc:  # the node's own, log-safe; reason and retryable travel with it
        _fail(record, exc.reason, exc, retryable=exc.retryable)
        return _Prepared(record, None)
    except FileNotFoundError as exc:
        _fail(record, "file_not_found", exc, message="file not found")
        return _Prepared(record, None)
    except OSError as exc:  # permission, stale NFS handle, I/O error: the file may be readable later
        _fail(record, "file_unavailable", exc, message="the file cannot be opened")
        return _Prepared(record, None)
    except MemoryError as exc:
        _fail(record, "analysis_error", exc, message="out of memory")
        return _Prepared(record, None)
    except Exception as exc:  # a corrupt file must give a clear answer, never a crash
        _fail(record, "unreadable_image", exc)
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


def _model_failure(p: _Prepared, exc: Exception, stage: str) -> None:
    """An unexpected exception inside the models: this input fails (retryable), its batch-mates go on."""
    LOG.warning("%s failed for one input: %s", stage, exception_summary(exc))
    _fail(p.record, "analysis_error", exc)
    p.record.labels = p.record.lung_area_px = p.record.lung_area_mm2 = None
    p.record.classification = p.record.image = None
    p.image = None


def _segment(segmenter: Any, todo: list[_Prepared]) -> list[tuple[_Prepared, Any]]:
    """One model call for the batch; if it raises, one call per input, so that only the culprit fails."""
    try:
        return list(zip(todo, segmenter.segment([p.image for p in todo]), strict=True))
    except Exception as exc:
        if len(todo) == 1:
            _model_failure(todo[0], exc, "segmentation")
            return []
    done = []
    for p in todo:
        try:
            done.append((p, segmenter.segment([p.image])[0]))
        except Exception as exc:
            _model_failure(p, exc, "segmentation")
    return done


def analyse_batch(sources: Sequence[Source], device: str | None = None, decode_timeout: float = DECODE_TIMEOUT,
                  limits: ImageLimits = DEFAULT_LIMITS, model_dir: ModelDir = None,
                  classifier_path: Path | str | None = None, precision: str = "auto") -> list[AnalysisRecord]:
    """Analyse several inputs with one model call for all that reach segmentation (the worker's form).

    ``device``: cpu, cuda, ... (None or "auto": CUDA when present); ``decode_timeout``: seconds one compressed
    image may take to decode (then ``decoder_timeout``); ``limits``: images declaring more are refused
    (``image_too_large``) before anything is inflated or decoded; ``model_dir``: a site's own model files
    (``models.directory``), each replacing the bundled file of the same name (None: the bundled models);
    ``classifier_path``: the classifier file to use instead of the installed one (the registry's champion);
    ``precision``: the classifier's arithmetic (``ai.precision``; "auto": bfloat16 where the CPU has AMX or
    AVX-512 BF16, float32 near a decision)."""
    segmenter = lung_segmenter(device, model_dir)
    classifier = pneumoconiosis_classifier(device, model_dir, classifier_path, precision)
    prepared = [_prepare(s, decode_timeout, limits) for s in sources]
    todo = [p for p in prepared if p.image is not None]
    if todo:
        for p, seg in _segment(segmenter, todo):
            try:
                p.record.timings.update(seg.timings)
                p.record.segmenter = segmenter.info
                started = time.perf_counter()
                check = check_lung_fields(seg.labels, seg.confidence)
                p.record.timings["input_check"] = time.perf_counter() - started
                _finish(p.record, seg.labels, check)
                if classifier is not None and p.record.in_scope:
                    p.record.classification = classifier.classify(p.image, seg.labels)  # type: ignore[arg-type]
                    p.record.timings.update(p.record.classification.timings)
                    p.record.classifier = classifier.info
            except Exception as exc:
                _model_failure(p, exc, "analysis")
    for p in prepared:
        p.record.timings["total"] = sum(p.record.timings.values())
    return [p.record for p in prepared]


def analyse(source: Source, device: str | None = None, decode_timeout: float = DECODE_TIMEOUT,
            limits: ImageLimits = DEFAULT_LIMITS, model_dir: ModelDir = None,
            classifier_path: Path | str | None = None, precision: str = "auto") -> AnalysisRecord:
    return analyse_batch([source], device, decode_timeout, limits, model_dir, classifier_path, precision)[0]
