"""Pneumoconiosis classifier pieces: a one-channel ResNet-34 with two heads, the lung crop, Grad-CAM, ILO zones.

Only the model and what inference needs live here (the training loop is in ``train``). Nothing here downloads:
the node runs inside hospital networks without internet access, so ImageNet weights are used only when a file is
already present (a configured path, or torchvision's own cache where an earlier download left it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torchvision.models import resnet34

from .geometry import Letterbox
from .normalise import NormalisedImage
from .lungs import LEFT_LUNG, RIGHT_LUNG
from .models import model_card_id

# torchvision's file name for ResNet34_Weights.IMAGENET1K_V1; hard-coded so that finding it never needs the URL.
IMAGENET_FILE = "resnet34-b627a593.pth"
PROFUSION_CATEGORIES = 4  # ILO major categories 0, 1, 2, 3
FEATURES = 512  # ResNet-34's channels after layer4
ZONES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower")


def _imagenet_file(imagenet_weights: Path | str | None, search_cache: bool) -> Path | None:
    """A configured path must exist (a typo should fail loudly, not silently train from scratch); the cache is
    only a convenience and is allowed to be empty."""
    if imagenet_weights is not None:
        path = Path(imagenet_weights)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights not found: {path}")
        return path
    if search_cache:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE
        if cached.is_file():
            return cached
    return None


def _state_dict(loaded: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one wrapped the way training scripts commonly save it."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                return loaded[key]
    return loaded


def build_resnet34(num_inputs: int = 1, imagenet_weights: Path | str | None = None, *,
                   search_cache: bool = True) -> tuple[nn.Module, str]:
    """torchvision ResNet-34 for ``num_inputs``-channel images, and which initialisation it got.

    With ImageNet weights the first convolution's kernels are averaged over RGB: a radiograph is grey, and the mean
    kernel is what the RGB filters compute on average per input channel, so the pretrained low-level detectors
    (edges, blobs) survive. The mean (not the sum) gives a third of the response an RGB-replicated grey image
    would get; bn1 is re-estimated during fine-tuning, which absorbs that constant. With 3 inputs the RGB kernels
    are kept as they are. The returned string ("imagenet:<path>" or "scratch") is for the training report and the
    model card, which must say where the weights started. ``search_cache=False`` skips the torch hub cache (used
    when a checkpoint of ours will overwrite the weights anyway).
    """
    if num_inputs < 1:
        raise ValueError("num_inputs must be at least 1")
    model = resnet34(weights=None)
    path = _imagenet_file(imagenet_weights, search_cache)
    init = "scratch"
    if path is not None:
        state = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict(state)
        init = f"imagenet:{path}"
    if num_inputs != 3:
        old = model.conv1
        conv = nn.Conv2d(num_inputs, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                         padding=old.padding, bias=old.bias is not None)
        if path is not None:
            with torch.no_grad():
                conv.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand_as(conv.weight))
        model.conv1 = conv
    return model, init


class PneumoconiosisNet(nn.Module):
    """ResNet-34 trunk with a shared pooled feature and two linear heads.

    One trunk for both tasks because "present" and "profusion" read the same small opacities; two heads because
    the binary question is the screening decision (its threshold is tuned on its own) while the ILO category is a
    graded reading. The trunk is a named Sequential (conv1 ... layer4) so Grad-CAM can address ``trunk.layer4``.
    """

    def __init__(self, backbone: nn.Module | None = None, dropout: float = 0.0, init: str = "scratch") -> None:
        super().__init__()
        if backbone is None:
            backbone, init = build_resnet34(1, search_cache=False)
        self.init = init
        self.trunk = nn.Sequential(OrderedDict(
            (name, getattr(backbone, name))
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ))
        self.in_channels = self.trunk.conv1.in_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.binary = nn.Linear(FEATURES, 1)
        self.profusion = nn.Linear(FEATURES, PROFUSION_CATEGORIES)

    @classmethod
    def create(cls, imagenet_weights: Path | str | None = None, num_inputs: int = 1, dropout: float = 0.0
               ) -> "PneumoconiosisNet":
        """A new model for training: ImageNet-initialised when weights are at hand, else from scratch."""
        backbone, init = build_resnet34(num_inputs, imagenet_weights)
        return cls(backbone, dropout=dropout, init=init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.trunk(x)), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.dropout(self.features(x))
        return {"binary": self.binary(f)[:, 0], "profusion": self.profusion(f)}


# --- lung crop ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropGeometry:
    """Where the classifier's square input came from, so heat maps land on the native pixels the reader sees."""

    source_shape: tuple[int, int]  # (rows, columns) of the native image
    box: tuple[int, int, int, int]  # (top, left, bottom, right) of the crop on the native grid, end exclusive
    letterbox: Letterbox  # from the crop to the (size, size) model input

    def to_source(self, map_at_size: np.ndarray | torch.Tensor) -> np.ndarray:
        """float32 native-size map: the model-size map resampled into the crop box, zeros outside it."""
        top, left, bottom, right = self.box
        out = np.zeros(self.source_shape, dtype=np.float32)
        out[top:bottom, left:right] = self.letterbox.to_source(map_at_size)
        return out


def lung_crop(image: np.ndarray, labels: np.ndarray, size: int, margin: float = 0.05,
              suppress_outside: bool = False, dilation: float | None = None) -> tuple[np.ndarray, CropGeometry]:
    """The lung region as a (size, size) float32 model input, and its geometry.

    Cropping to the lungs spends the input resolution on the parenchyma, where the small opacities are, instead of
    on the neck and abdomen; the margin keeps the pleura and costophrenic angles that a tight mask may clip.
    ``suppress_outside`` blacks out everything beyond the lung mask dilated by ``dilation`` (fraction of the
    box's longer side; default: the margin), so the model cannot learn shortcuts from markers, tubes or text; the
    halo keeps pleural findings at the mask's edge. The aspect ratio is kept (letterbox) because stretching would
    distort the shape and size of the opacities the ILO categories are defined by.
    """
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    lung = labels > 0
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    if rows.size == 0:
        raise ValueError("no lung pixels in the mask: the input check should have refused this image")
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    pad_r, pad_c = round(margin * height), round(margin * width)
    top, bottom = max(0, rows[0] - pad_r), min(image.shape[0], rows[-1] + 1 + pad_r)
    left, right = max(0, cols[0] - pad_c), min(image.shape[1], cols[-1] + 1 + pad_c)
    crop = np.array(image[top:bottom, left:right], dtype=np.float32)
    if suppress_outside:
        radius = (margin if dilation is None else dilation) * max(height, width)
        crop[_distance_to_lung(lung[top:bottom, left:right], size) > radius] = 0.0
    box = Letterbox.fit(crop.shape, size)
    geometry = CropGeometry(source_shape=(int(image.shape[0]), int(image.shape[1])),
                            box=(int(top), int(left), int(bottom), int(right)), letterbox=box)
    return box.to_model(crop), geometry


def _distance_to_lung(lung: np.ndarray, size: int) -> np.ndarray:
    """Distance in native pixels from each pixel of the crop to the nearest lung pixel.

    Computed on blocks as large as one model pixel (a block counts as lung when any of its pixels is): the
    result is resized to ``size`` anyway, and an exact transform on a native crop takes about a second on two
    cores. The halo's edge is therefore exact to within a block's diagonal (about one model pixel). Only the
    crop is used: every lung pixel lies inside it.
    """
    factor = max(1, math.ceil(max(lung.shape) / size))
    if factor == 1:
        return ndimage.distance_transform_edt(~lung)
    rows, cols = lung.shape
    padded = np.zeros((-(-rows // factor) * factor, -(-cols // factor) * factor), dtype=bool)
    padded[:rows, :cols] = lung
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).any(axis=(1, 3))
    distance = ndimage.distance_transform_edt(~blocks) * factor
    return np.repeat(np.repeat(distance, factor, axis=0), factor, axis=1)[:rows, :cols]


# --- explanations ------------------------------------------------------------------------------------------------

def grad_cam(model: PneumoconiosisNet, x: torch.Tensor, head: str = "binary", target_class: int | None = None,
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of one input at the input's size, float32 in [0, 1].

    layer4 is the last place with spatial resolution, so its gradient-weighted channels are the coarsest map that
    still says where; the ReLU keeps only evidence for the output. For ``head="profusion"`` the map explains
    ``target_class`` (default: the predicted category). The model runs in eval mode (batch-norm statistics of a
    single image would be meaningless) and every module's mode is restored afterwards; the gradient is taken with
    ``torch.autograd.grad`` so no parameter's ``.grad`` is touched and a training step in progress is unaffected.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one input of shape (1, C, S, S), got {tuple(x.shape)}")
    if head not in ("binary", "profusion"):
        raise ValueError(f"unknown head {head!r}")
    layer = model.trunk.layer4 if layer is None else layer
    modes = [(m, m.training) for m in model.modules()]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        model.eval()
        with torch.enable_grad():
            out = model(x.detach().clone().requires_grad_(True))
            if head == "binary":
                score = out["binary"][0]
            else:
                logits = out["profusion"][0]
                score = logits[int(logits.argmax()) if target_class is None else target_class]
            activation = captured[-1]
            (gradient,) = torch.autograd.grad(score, activation)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
        peak = float(cam.max())
        result = (cam / peak) if peak > 0 else torch.zeros_like(cam)
        return result.float().cpu().numpy()
    finally:
        handle.remove()
        for module, training in modes:
            module.training = training


def zone_scores(heat_native: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean heat in the six ILO zones: upper, middle and lower thirds of each lung's own height.

    The ILO classification reads profusion per zone, and each lung is divided by its own extent because the two
    fields rarely reach the same height (heart, diaphragm, scoliosis). An absent lung or zone scores 0.0.
    """
    if heat_native.shape != labels.shape:
        raise ValueError(f"heat map {heat_native.shape} and labels {labels.shape} differ in shape")
    scores: dict[str, float] = {}
    row_index = np.arange(labels.shape[0])[:, None]
    for side, value in (("right", RIGHT_LUNG), ("left", LEFT_LUNG)):
        lung = labels == value
        rows = np.flatnonzero(lung.any(axis=1))
        if rows.size == 0:
            scores.update({f"{side}_{z}": 0.0 for z in ("upper", "middle", "lower")})
            continue
        top, extent = rows[0], rows[-1] - rows[0] + 1
        third = np.clip((row_index - top) * 3 // extent, 0, 2)  # 0 upper, 1 middle, 2 lower
        for k, zone in enumerate(("upper", "middle", "lower")):
            inside = lung & (third == k)
            scores[f"{side}_{zone}"] = float(heat_native[inside].mean()) if inside.any() else 0.0
    return {name: scores[name] for name in ZONES}


def classifier_input(image: NormalisedImage, labels: np.ndarray, size: int, margin: float = 0.05,
                     suppress_outside: bool = False) -> tuple[np.ndarray, CropGeometry]:
    """The classifier's (size, size) input in [0, 1], made the same way in training and at inference: lung crop,
    letterbox, then the contrast standardisation the segmenter also uses (vendors' windows differ widely)."""
    from .normalise import stretch_contrast

    crop, geometry = lung_crop(image.pixels, labels, size, margin=margin, suppress_outside=suppress_outside)
    valid = np.zeros_like(crop, dtype=bool)
    top, left = geometry.letterbox.offset
    rows, cols = geometry.letterbox.content_shape
    valid[top:top + rows, left:left + cols] = True
    if suppress_outside:
        valid &= crop > 0
    return stretch_contrast(crop, valid), geometry


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


class PneumoconiosisClassifier:
    """A trained classifier file (``train/classifier.py --final`` writes it) ready for inference.

    The file carries its own decision threshold (chosen on out-of-fold predictions), input geometry, what it was
    trained on and, for demo weights, the notice that must reach every result.
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.name: str = checkpoint["name"]
        self.version: str = checkpoint["version"]
        self.threshold = float(checkpoint["threshold"])
        self.input_size = int(checkpoint["input_size"])
        self.margin = float(checkpoint.get("margin", 0.05))
        self.suppress_outside = bool(checkpoint.get("suppress_outside", False))
        self.trained_on: str = checkpoint.get("trained_on", "")
        self.notice: str = checkpoint.get("notice", "")
        self.model_card = model_card_id(path, checkpoint)
        self.model = PneumoconiosisNet()
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                    for k, v in checkpoint["state_dict"].items()})
        self.model.eval().to(device)
        self.device = device

    def describe(self) -> dict[str, str]:
        info = {"name": self.name, "version": self.version, "model_card": self.model_card}
        if self.trained_on:
            info["trained_on"] = self.trained_on
        if self.notice:
            info["notice"] = self.notice
        return info

    def _forward(self, image: NormalisedImage, labels: np.ndarray):  # type: ignore[no-untyped-def]
        x, geometry = classifier_input(image, labels, self.input_size, self.margin, self.suppress_outside)
        tensor = torch.from_numpy(x)[None, None].to(self.device)
        with torch.inference_mode():
            out = self.model(tensor)
            probability = float(torch.sigmoid(out["binary"])[0])
            categories = torch.softmax(out["profusion"][0].float(), dim=0).cpu().numpy()
        return tensor, geometry, probability, categories

    def probabilities(self, image: NormalisedImage, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Probability of pneumoconiosis and of categories 0-3, without the heat map (evaluation runs)."""
        _, _, probability, categories = self._forward(image, labels)
        return probability, categories

    def classify(self, image: NormalisedImage, labels: np.ndarray) -> Classification:
        import time

        started = time.perf_counter()
        tensor, geometry, probability, categories = self._forward(image, labels)
        classified = time.perf_counter()
        heat = geometry.to_source(grad_cam(self.model, tensor, head="binary"))
        zones = zone_scores(heat, labels)
        return Classification(
            probability=probability, present=probability >= self.threshold, threshold=self.threshold,
            category_probabilities=[float(c) for c in categories], most_likely_category=int(categories.argmax()),
            zones=zones, heat_map=heat,
            timings={"classify": classified - started, "heat_map": time.perf_counter() - classified},
        )
