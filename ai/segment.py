"""Lung-field segmentation: normalised image -> labelled lung mask on the native pixel grid."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .geometry import Letterbox
from .lungs import labels_on_source
from .model_info import ModelInfo
from .normalise import NormalisedImage, stretch_contrast
from .onnx_engine import onnx_model_of, use_onnxruntime
from .unet import UNet

# train.datasets.load_gray shrinks the training films with PIL's BILINEAR filter: Letterbox's "triangle"
TRAINING_RESAMPLE = "triangle"


class _Probability(torch.nn.Module):
    """The U-Net with its sigmoid: the form exported to ONNX Runtime."""

    def __init__(self, model: UNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


@dataclass
class Segmentation:
    labels: np.ndarray  # uint8 on the native grid: 0 background, 1 right lung, 2 left lung
    probability: np.ndarray  # float32 (size, size) model-resolution lung probability
    letterbox: Letterbox
    timings: dict[str, float]  # seconds: segment (model input + model), postprocess
    confidence: dict[str, float]  # how sure the model is: see ``confidence``


def confidence(prob: np.ndarray, box: Letterbox) -> dict[str, float]:
    """Mean probability inside the predicted fields, and the uncertain area (0.1 < p < 0.9) relative to them.

    On chest radiographs the U-Net is nearly binary; on other anatomy it hedges, which is a better tell than any
    shape rule (see ai/input_check.py)."""
    top, left = box.offset
    content = prob[top:top + box.content_shape[0], left:left + box.content_shape[1]]
    fields = content > 0.5
    if not fields.any():
        return {"mean_probability": 0.0, "uncertain_ratio": 0.0}
    uncertain = np.count_nonzero((content > 0.1) & (content < 0.9))
    return {"mean_probability": float(content[fields].mean()), "uncertain_ratio": uncertain / fields.sum()}


def model_input(image: NormalisedImage, size: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox to ``size`` with the filter the U-Net's training images were shrunk with, and standardise
    contrast inside the content (padding stays black)."""
    box = Letterbox.fit(image.pixels.shape, size)
    pixels = image.pixels
    small = box.to_model(pixels, resample=TRAINING_RESAMPLE)
    valid = np.zeros_like(small, dtype=bool)
    top, left = box.offset
    valid[top:top + box.content_shape[0], left:left + box.content_shape[1]] = True
    if image.padding_mask is not None:
        valid &= box.to_model(~image.padding_mask, resample=TRAINING_RESAMPLE) > 0.5
    return stretch_contrast(small, valid), box


class LungSegmenter:
    """Loads the weights once; ``segment`` takes a batch of normalised images."""

    def __init__(self, weights: Path, device: torch.device, engine: str = "auto") -> None:
        model_file = checkpoint.load(weights, checkpoint.SEGMENTER_FIELDS)
        self.info: ModelInfo = model_file.info()
        self.input_size: int = int(model_file["input_size"])
        self.model = UNet(base_width=int(model_file["base_width"]), depth=int(model_file["depth"]))
        self.model.load_state_dict(model_file.state_dict)
        # Batch norms folded into the convolutions and channels-last tensors: the same function, about twice as fast
        # on CPU (docs/benchmarks.md).
        self.model.eval().fuse_for_inference().to(device).to(memory_format=torch.channels_last)
        self.device = device
        # ONNX Runtime on CPU: the same network exported at load (ai/onnx_engine.py).
        example = torch.zeros(1, 1, self.input_size, self.input_size)
        self.onnx = (onnx_model_of(_Probability(self.model), example, ("probability",), model_file.sha256)
                     if use_onnxruntime(engine, device) else None)
        self.engine = "onnxruntime" if self.onnx is not None else "torch"

    @torch.inference_mode()
    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """(N, size, size) model inputs -> (N, size, size) lung probabilities."""
        if self.onnx is not None:
            return np.ascontiguousarray(self.onnx(inputs[:, None])["probability"][:, 0])
        tensor = torch.from_numpy(inputs[:, None]).to(self.device).contiguous(memory_format=torch.channels_last)
        return np.ascontiguousarray(torch.sigmoid(self.model(tensor))[:, 0].float().cpu().numpy())

    def segment(self, images: list[NormalisedImage]) -> list[Segmentation]:
        started = time.perf_counter()
        prepared = [model_input(image, self.input_size) for image in images]
        probs = self.probabilities(np.stack([p[0] for p in prepared]))
        model_seconds = (time.perf_counter() - started) / max(len(images), 1)
        results = []
        for prob, (_, box) in zip(probs, prepared, strict=True):
            started = time.perf_counter()
            labels = labels_on_source(prob, box)
            results.append(Segmentation(labels, prob, box, {"segment": model_seconds,
                                                            "postprocess": time.perf_counter() - started},
                                        confidence(prob, box)))
        return results
