"""Where the classifier looked: class activation maps and their mean in the six ILO lung zones.

The node's heat map is the class activation map (CAM, Zhou et al. 2016) of the binary head, computed from the
layer4 features of the same forward pass that gives the probability. The network ends in global average pooling
and one linear layer, so Grad-CAM's channel weights (the spatial mean of the score's gradient) are exactly the
linear weights divided by the number of positions (Selvaraju et al. 2017, appendix): after the peak normalisation
both give the same map, and CAM needs no backward pass (3.5 forward passes' worth of time). ``grad_cam`` stays as
the reference the CAM is checked against (tests, ``benchmarks/inference_engines.py``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lungs import LEFT_LUNG, RIGHT_LUNG
from .resnet import PneumoconiosisNet

ZONES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower")


def class_activation_map(feature_map: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """CAM of one input at ``size`` (the model input's rows, columns), float32 in [0, 1].

    ``feature_map``: (1, C, h, w) layer4 output; ``weight``: (C,) the linear head's weights for the explained
    output. The ReLU keeps only evidence for the output (as Grad-CAM does); the bias shifts the score, not where it
    comes from, so it is left out. A map without positive evidence is all zeros, never NaN.
    """
    if feature_map.ndim != 4 or feature_map.shape[0] != 1:
        raise ValueError(f"expected one feature map of shape (1, C, h, w), got {tuple(feature_map.shape)}")
    if weight.shape != feature_map.shape[1:2]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match {feature_map.shape[1]} channels")
    with torch.inference_mode():
        cam = F.relu(torch.einsum("c,bchw->bhw", weight.float(), feature_map.float()))[:, None]
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
        peak = float(cam.max())
        result = (cam / peak) if peak > 0 else torch.zeros_like(cam)
        return result.cpu().numpy()


def grad_cam(model: PneumoconiosisNet, x: torch.Tensor, head: str = "binary", target_class: int | None = None,
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of one input at the input's size, float32 in [0, 1]: the reference for
    ``class_activation_map`` (the node itself no longer runs a backward pass).

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
    layer = model.trunk.get_submodule("layer4") if layer is None else layer
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


def zone_scores(heat_native: np.ndarray, labels: np.ndarray,
                box: tuple[int, int, int, int] | None = None) -> dict[str, float]:
    """Mean heat in the six ILO zones: upper, middle and lower thirds of each lung's own height.

    The ILO classification reads profusion per zone, and each lung is divided by its own extent because the two
    fields rarely reach the same height (heart, diaphragm, scoliosis). An absent lung or zone scores 0.0.
    ``box`` (top, left, bottom, right; the classifier's crop) bounds where lung pixels can be: the same means,
    computed on that part of the grid only. A zone is a band of rows, so each is a slice, not a mask.
    """
    if heat_native.shape != labels.shape:
        raise ValueError(f"heat map {heat_native.shape} and labels {labels.shape} differ in shape")
    if box is not None:
        top, left, bottom, right = box
        heat_native, labels = heat_native[top:bottom, left:right], labels[top:bottom, left:right]
    scores: dict[str, float] = {}
    for side, value in (("right", RIGHT_LUNG), ("left", LEFT_LUNG)):
        lung = labels == value
        rows = np.flatnonzero(lung.any(axis=1))
        if rows.size == 0:
            scores.update({f"{side}_{z}": 0.0 for z in ("upper", "middle", "lower")})
            continue
        first, extent = int(rows[0]), int(rows[-1] - rows[0] + 1)
        for k, zone in enumerate(("upper", "middle", "lower")):
            # rows r with (r - first) * 3 // extent == k (k = 2 also takes any row below, none being lung)
            start = first + -(-k * extent // 3)
            stop = first + -(-(k + 1) * extent // 3) if k < 2 else labels.shape[0]
            inside = lung[start:stop]
            values = heat_native[start:stop][inside]
            scores[f"{side}_{zone}"] = float(values.mean()) if values.size else 0.0
    return {name: scores[name] for name in ZONES}
