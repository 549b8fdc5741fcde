"""The pneumoconiosis classifier's network: a one-channel torchvision ResNet-34 with two heads.

Only the architecture and its initialisation live here (inference is ``ai/classifier.py``, training ``train``).
Nothing here downloads: the node runs inside hospital networks without internet access, so ImageNet weights are
used only when a file is already present (a configured path, or torchvision's own cache where an earlier download
left it).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet, resnet34

# torchvision's file name for ResNet34_Weights.IMAGENET1K_V1; hard-coded so that finding it never needs the URL.
IMAGENET_FILE = "resnet34-b627a593.pth"
PROFUSION_CATEGORIES = 4  # ILO major categories 0, 1, 2, 3
FEATURES = 512  # ResNet-34's channels after layer4


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
                   search_cache: bool = True) -> tuple[ResNet, str]:
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

    def __init__(self, backbone: ResNet | None = None, dropout: float = 0.0, init: str = "scratch") -> None:
        super().__init__()
        if backbone is None:
            backbone, init = build_resnet34(1, search_cache=False)
        self.init = init
        self.trunk = nn.Sequential(OrderedDict(
            (name, getattr(backbone, name))
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ))
        self.in_channels = backbone.conv1.in_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.binary = nn.Linear(FEATURES, 1)
        self.profusion = nn.Linear(FEATURES, PROFUSION_CATEGORIES)

    @classmethod
    def create(cls, imagenet_weights: Path | str | None = None, num_inputs: int = 1, dropout: float = 0.0
               ) -> PneumoconiosisNet:
        """A new model for training: ImageNet-initialised when weights are at hand, else from scratch."""
        backbone, init = build_resnet34(num_inputs, imagenet_weights)
        return cls(backbone, dropout=dropout, init=init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.trunk(x)), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.dropout(self.features(x))
        return {"binary": self.binary(f)[:, 0], "profusion": self.profusion(f)}

    def forward_with_feature_map(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` plus layer4's output under ``"feature_map"``: the class activation map is computed from it
        and the binary head's weights, so the heat map costs no second pass."""
        feature_map = self.trunk(x)
        f = self.dropout(torch.flatten(self.pool(feature_map), 1))
        return {"binary": self.binary(f)[:, 0], "profusion": self.profusion(f), "feature_map": feature_map}

    def fuse_for_inference(self) -> PneumoconiosisNet:
        """Fold every batch norm of the trunk into the convolution before it (eval mode only; the same function up
        to float rounding): fewer passes over the feature maps at inference. Returns self."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.training:
            raise RuntimeError("fuse_for_inference needs eval mode (batch norm running statistics)")
        def fused(conv: Any, bn: Any) -> nn.Conv2d:
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                raise TypeError("expected a convolution followed by a batch norm")
            return fuse_conv_bn_eval(conv, bn)

        trunk = self.trunk
        trunk.conv1, trunk.bn1 = fused(trunk.conv1, trunk.bn1), nn.Identity()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in trunk.get_submodule(name).children():
                block.conv1, block.bn1 = fused(block.conv1, block.bn1), nn.Identity()
                block.conv2, block.bn2 = fused(block.conv2, block.bn2), nn.Identity()
                if isinstance(block.downsample, nn.Sequential):
                    block.downsample = nn.Sequential(fused(block.downsample[0], block.downsample[1]))
        return self
