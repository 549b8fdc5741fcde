"""Pneumoconiosis classification of one accepted radiograph: a trained classifier file ready for inference.

The pieces live beside it, the way the segmenter's do (``ai/unet.py``, ``ai/segment.py``): the network in
``ai/resnet.py``, its input (lung crop) in ``ai/lung_crop.py``, the heat map and zone scores in ``ai/explain.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .explain import class_activation_map, zone_scores
from .lung_crop import CropGeometry, classifier_input
from .model_info import ModelInfo
from .normalise import NormalisedImage
from .onnx_engine import onnx_model_of, use_onnxruntime
from .precision import bfloat16_copy, near_decision, resolve_precision
from .resnet import PneumoconiosisNet

OUTPUTS = ("binary", "profusion", "feature_map")


class _Outputs(torch.nn.Module):
    """The network's inference form as a tuple of tensors, which is what an ONNX export needs."""

    def __init__(self, model: PneumoconiosisNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_with_feature_map(x)
        return tuple(out[name] for name in OUTPUTS)


def inference_module(model: PneumoconiosisNet) -> torch.nn.Module:
    """``model`` as its ONNX export takes it (eval mode, a tuple of ``OUTPUTS``): the node's engine and the int8
    benchmark (benchmarks/int8_classifier.py) export the same graph."""
    return _Outputs(model).eval()


@dataclass
class Classification:
    """What the classifier says about one accepted radiograph, on the source's native grid."""

    probability: float  # pneumoconiosis present
    present: bool  # probability >= threshold
    threshold: float
    category_probabilities: list[float]  # ILO major categories 0, 1, 2, 3
    most_likely_category: int
    zones: dict[str, float]  # mean heat in the six ILO zones
    heat_map: np.ndarray  # float32 native grid in [0, 1], 0 outside the lung crop
    timings: dict[str, float]
    precision: str = "fp32"  # the arithmetic these numbers came from: "bf16" (far from every decision) or "fp32"


class PneumoconiosisClassifier:
    """A trained classifier file (``train/classifier.py --final`` writes it) ready for inference.

    The file carries its own decision threshold (chosen on out-of-fold predictions), input geometry, what it was
    trained on and, for demo weights, the notice that must reach every result.
    """

    def __init__(self, path: Path, device: torch.device, engine: str = "auto", precision: str = "auto") -> None:
        model_file = checkpoint.load(path, checkpoint.CLASSIFIER_FIELDS)
        self.info: ModelInfo = model_file.info()
        self.threshold = float(model_file["threshold"])
        self.input_size = int(model_file["input_size"])
        self.margin = float(model_file.get("margin", 0.05))
        self.suppress_outside = bool(model_file.get("suppress_outside", False))
        self.model = PneumoconiosisNet()
        self.model.load_state_dict(model_file.state_dict)
        # Inference form: batch norms folded into the convolutions, channels-last (measured in docs/benchmarks.md).
        self.model.eval().fuse_for_inference().to(device).to(memory_format=torch.channels_last)
        self.device = device
        # ONNX Runtime on CPU (ai/onnx_engine.py); the torch model stays for the heat map's head weights.
        example = torch.zeros(1, 1, self.input_size, self.input_size)
        self.onnx = (onnx_model_of(inference_module(self.model), example, OUTPUTS, model_file.sha256)
                     if use_onnxruntime(engine, device) else None)
        self.engine = "onnxruntime" if self.onnx is not None else "torch"
        # bfloat16 first where it pays, float32 (the engine above) near a decision: ai/precision.py
        self.precision = resolve_precision(precision, device)
        self.bf16_model = bfloat16_copy(self.model) if self.precision == "bf16" else None

    def _forward(self, image: NormalisedImage, labels: np.ndarray
                 ) -> tuple[torch.Tensor, CropGeometry, float, np.ndarray, str]:
        """The lung crop through the network: the probabilities, layer4's features for the heat map and the
        precision they came from (bfloat16 only where its answer is far from every decision)."""
        x, geometry = classifier_input(image, labels, self.input_size, self.margin, self.suppress_outside)
        with torch.inference_mode():
            if self.precision == "bf16":
                out = self._run_bf16(x)
                probability, categories = output_probabilities(out)
                if not near_decision(probability, self.threshold, categories.tolist()):
                    return out["feature_map"].float(), geometry, probability, categories, "bf16"
            out = self._run_fp32(x)
            probability, categories = output_probabilities(out)
        return out["feature_map"], geometry, probability, categories, "fp32"

    def _run_fp32(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        if self.onnx is not None:
            return {name: torch.from_numpy(value) for name, value in self.onnx(x[None, None]).items()}
        return self.model.forward_with_feature_map(self._tensor(x))

    def _run_bf16(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        """What ``torch.autocast`` to bfloat16 gives for the float32 model, from weights stored in bfloat16."""
        if self.bf16_model is None:
            raise RuntimeError("this classifier was made for float32 only")
        return self.bf16_model.forward_with_feature_map(self._tensor(x).to(torch.bfloat16))

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        """The crop as the torch model takes it: a batch of one, on its device, channels-last."""
        return torch.from_numpy(x)[None, None].to(self.device).contiguous(memory_format=torch.channels_last)

    def probabilities(self, image: NormalisedImage, labels: np.ndarray) -> tuple[float, np.ndarray, str]:
        """Probability of pneumoconiosis and of categories 0-3, and the precision they came from, without the heat
        map (evaluation runs)."""
        _, _, probability, categories, precision = self._forward(image, labels)
        return probability, categories, precision

    def warm_up(self) -> None:
        """One pass through each path a job may take (bfloat16 and the float32 engine), so that no first call's
        set-up falls into a job."""
        x = np.zeros((self.input_size, self.input_size), dtype=np.float32)
        with torch.inference_mode():
            self._run_fp32(x)
            if self.precision == "bf16":
                self._run_bf16(x)

    def classify(self, image: NormalisedImage, labels: np.ndarray) -> Classification:
        started = time.perf_counter()
        feature_map, geometry, probability, categories, precision = self._forward(image, labels)
        classified = time.perf_counter()
        cam = class_activation_map(feature_map, self.model.binary.weight[0], (self.input_size, self.input_size))
        heat = geometry.to_source(cam)
        zones = zone_scores(heat, labels, geometry.box)  # every lung pixel lies in the crop box
        return Classification(
            probability=probability, present=probability >= self.threshold, threshold=self.threshold,
            category_probabilities=[float(c) for c in categories], most_likely_category=int(categories.argmax()),
            zones=zones, heat_map=heat,
            timings={"classify": classified - started, "heat_map": time.perf_counter() - classified},
            precision=precision,
        )


def output_probabilities(out: dict[str, torch.Tensor]) -> tuple[float, np.ndarray]:
    """The network's outputs as the probability of pneumoconiosis and of categories 0-3, in float32 (also what the
    int8 benchmark compares, benchmarks/int8_classifier.py)."""
    probability = float(torch.sigmoid(out["binary"].float())[0])
    return probability, torch.softmax(out["profusion"][0].float(), dim=0).cpu().numpy()
