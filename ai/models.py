"""Which model files a process uses, and the per-process model cache (models load once per file and device).

The caller says where a site's own model files are (the configuration's ``models.directory``) and which device to
use (``worker.device``, or ``dicom-node analyse --device``); nothing here reads the environment. Torch and the
networks load only when a model does: the commands that only need to know which file is installed (``dicom-node
models list``, ``retrain``'s registration) do not pay torchvision's import (about 3 s of CPU).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .classifier import PneumoconiosisClassifier
    from .segment import LungSegmenter

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
LUNG_UNET = "lung_unet.pt"
CLASSIFIER = "classifier.pt"

ModelDir = Path | str | None
"""A site's model folder; None or "" = the bundled models only."""

_lock = threading.Lock()


def select_device(preferred: str | None = None) -> torch.device:
    """``preferred`` when given (cpu, cuda, cuda:1; "auto" or None: not given), else CUDA when present, else CPU."""
    import torch

    if preferred and preferred != "auto":
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_path(file_name: str, model_dir: ModelDir = None) -> Path:
    """A model file: ``model_dir``/<file> when that exists (a site's own training), else the bundled one."""
    if model_dir and (Path(model_dir) / file_name).is_file():
        return Path(model_dir) / file_name
    return BUNDLED_DIR / file_name


@lru_cache(maxsize=4)
def _load_segmenter(path: Path, device: str) -> LungSegmenter:
    import torch

    from .segment import LungSegmenter

    return LungSegmenter(path, torch.device(device))


def lung_segmenter(device: str | None = None, model_dir: ModelDir = None) -> LungSegmenter:
    with _lock:
        return _load_segmenter(model_path(LUNG_UNET, model_dir), str(select_device(device)))


@lru_cache(maxsize=4)
def _load_classifier(path: Path, device: str, precision: str) -> PneumoconiosisClassifier:
    import torch

    from .classifier import PneumoconiosisClassifier

    return PneumoconiosisClassifier(path, torch.device(device), precision=precision)


def pneumoconiosis_classifier(device: str | None = None, model_dir: ModelDir = None, path: Path | str | None = None,
                              precision: str = "auto") -> PneumoconiosisClassifier | None:
    """The classifier of file ``path`` (the registry's champion; FileNotFoundError when it is missing), else the
    installed one, or None while no classifier file is installed (lung fields only). ``precision``: its
    arithmetic (``ai.precision``: "auto", "fp32" or "bf16")."""
    if path is not None:
        chosen = Path(path)
        if not chosen.is_file():
            raise FileNotFoundError(f"classifier file {chosen.name} not found")
    else:
        chosen = model_path(CLASSIFIER, model_dir)
        if not chosen.is_file():
            return None
    with _lock:
        return _load_classifier(chosen, str(select_device(device)), precision)
