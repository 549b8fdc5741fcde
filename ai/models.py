"""Bundled model files and the per-process model cache (models load once, on the best available device)."""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

import torch

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
LUNG_UNET = "lung_unet.pt"
CLASSIFIER = "classifier.pt"

_lock = threading.Lock()


def model_card_id(weights: Path, checkpoint: dict) -> str:
    """Which model card describes these weights: the card's file name and the weights' SHA-256 prefix."""
    import hashlib

    card = checkpoint.get("model_card") or weights.with_suffix(".md").name
    return f"{card} (weights sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()[:16]})"


def select_device(preferred: str | None = None) -> torch.device:
    """$PNEUMO_DEVICE or ``preferred`` when given (cpu, cuda, cuda:1), else CUDA when present, else CPU."""
    name = preferred or os.environ.get("PNEUMO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_path(file_name: str) -> Path:
    """A model file: $PNEUMO_MODEL_DIR/<file> when that exists (a site's own training), else the bundled one."""
    override = os.environ.get("PNEUMO_MODEL_DIR")
    if override and (Path(override) / file_name).is_file():
        return Path(override) / file_name
    return BUNDLED_DIR / file_name


@lru_cache(maxsize=4)
def _load_segmenter(path: Path, device: str):  # type: ignore[no-untyped-def]
    from .segment import LungSegmenter

    return LungSegmenter(path, torch.device(device))


def lung_segmenter(device: str | None = None):  # type: ignore[no-untyped-def]
    with _lock:
        return _load_segmenter(model_path(LUNG_UNET), str(select_device(device)))


@lru_cache(maxsize=4)
def _load_classifier(path: Path, device: str):  # type: ignore[no-untyped-def]
    from .classifier import PneumoconiosisClassifier

    return PneumoconiosisClassifier(path, torch.device(device))


def pneumoconiosis_classifier(device: str | None = None):  # type: ignore[no-untyped-def]
    """The installed classifier, or None while no classifier file is installed (lung fields only)."""
    path = model_path(CLASSIFIER)
    if not path.is_file():
        return None
    with _lock:
        return _load_classifier(path, str(select_device(device)))
