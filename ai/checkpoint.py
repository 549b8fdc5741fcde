"""Model files: the one module that reads, writes and identifies the node's ``.pt`` checkpoints.

A model file is a plain dictionary written by ``torch.save``: the fields below, and ``state_dict`` with its floating
point tensors in half precision (half the download and the disk; no measurable effect on the outputs once they are
converted back to float32 for inference).

Every file is read with ``torch.load(weights_only=True)``: a model file placed in a site's model folder may hold
tensors, containers, strings and numbers, and nothing that unpickling would run. ``save`` writes only such values
(numpy numbers become Python numbers), so everything the trainers write loads again.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model_info import ModelInfo

STATE_DICT = "state_dict"
MODEL_FIELDS = ("name", "version", "input_size", STATE_DICT)
"""Fields every model file has: the model's name and version (results name them, and result UIDs are derived from
them), the side of its square input in pixels, and its weights."""
SEGMENTER_FIELDS = MODEL_FIELDS + ("base_width", "depth")
"""The lung U-Net's, to rebuild it (``ai.unet.UNet``)."""
CLASSIFIER_FIELDS = MODEL_FIELDS + ("threshold",)
"""The classifier's: its decision threshold, chosen on out-of-fold predictions. Optional: ``margin`` and
``suppress_outside`` (how the lung crop was made in training; default 0.05 and False)."""
DESCRIPTIVE_FIELDS = ("model_card", "trained_on", "notice")
"""Optional in every model file: the model card's file name (default: the weights' name with ``.md``), what the
training data were, and a notice every result must carry verbatim (demo models)."""


class ModelFileError(ValueError):
    """A file is not a model file the node can use; the message names the file and, where it applies, the fields
    missing (never the file's content)."""


@dataclass(frozen=True)
class ModelFile:
    """A loaded model file: its fields, its weights in float32, and the SHA-256 of the very bytes they came from."""

    path: Path
    fields: Mapping[str, Any]  # every field but the state dict
    state_dict: dict[str, torch.Tensor]  # floating point tensors in float32
    sha256: str

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def card_id(self) -> str:
        return card_id(self.path, self.fields, self.sha256)

    def info(self) -> ModelInfo:
        threshold = self.fields.get("threshold")
        return ModelInfo(
            name=str(self.fields["name"]), version=str(self.fields["version"]), card_id=self.card_id,
            notice=str(self.fields.get("notice") or ""),
            threshold=None if threshold is None else float(threshold),
            input_size=int(self.fields["input_size"]), sha256=self.sha256,
            trained_on=str(self.fields.get("trained_on") or ""),
        )


def read(source: Path | str | io.BytesIO, map_location: str | torch.device = "cpu", name: str | None = None) -> Any:
    """Whatever a checkpoint of ours holds (a model file, a training run's ``best.pt`` or ``last.pt``), with
    ``weights_only=True``; a file holding anything else raises ``ModelFileError`` (``name``: the file's name for
    the message, by default the path's)."""
    name = name or (Path(source).name if isinstance(source, (str, Path)) else "checkpoint")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ModelFileError(f"{name} cannot be read as weights only ({type(exc).__name__}): it is not a "
                             f"checkpoint, or it holds objects other than tensors, containers and numbers") from exc


def load(path: Path | str, required: tuple[str, ...] = MODEL_FIELDS) -> ModelFile:
    """A model file with the ``required`` fields, its weights converted to float32 (``to_float``)."""
    path = Path(path)
    data = path.read_bytes()
    checkpoint = read(io.BytesIO(data), name=path.name)  # the very bytes the digest is taken of
    if not isinstance(checkpoint, dict):
        raise ModelFileError(f"{path.name} is not a model file (no fields)")
    missing = [name for name in required if name not in checkpoint]
    if missing:
        raise ModelFileError(f"{path.name} is not a model file: it lacks {', '.join(missing)}")
    fields = {k: v for k, v in checkpoint.items() if k != STATE_DICT}
    return ModelFile(path=path, fields=fields, state_dict=to_float(checkpoint.get(STATE_DICT, {})),
                     sha256=hashlib.sha256(data).hexdigest())


def to_float(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating point tensors in float32 (model files store them in half precision); others as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def to_half(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating point tensors in half precision, as model files store them; others as they are."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def _plain(value: Any) -> Any:
    """``value`` as what ``weights_only`` loading accepts: numpy numbers and arrays become Python numbers and
    lists; containers are converted item by item."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save(path: Path | str, state_dict: Mapping[str, torch.Tensor], fields: Mapping[str, Any],
         required: tuple[str, ...] = MODEL_FIELDS) -> None:
    """Write a model file: ``fields`` (which must hold the ``required`` ones, the state dict apart) and the
    weights in half precision. The folder is created when missing."""
    path = Path(path)
    missing = [name for name in required if name != STATE_DICT and name not in fields]
    if missing:
        raise ModelFileError(f"{path.name}: a model file needs {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**_plain(dict(fields)), STATE_DICT: to_half(state_dict)}, path)


def card_id(weights: Path, fields: Mapping[str, Any], sha256: str) -> str:
    """Which model card describes these weights: the card's file name and the weights' SHA-256 prefix."""
    card = fields.get("model_card") or weights.with_suffix(".md").name
    return f"{card} (weights sha256 {sha256[:16]})"
