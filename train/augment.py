"""Batch augmentations on tensors: intensity (brightness, contrast, gamma) and small geometry.

No left-right flips: the anatomy is not symmetric (heart on the patient's left) and the labels of the lungs
depend on the side. Geometry is applied to image and mask with the same random affine transform; the area moved in
from outside is black, like the letterbox padding at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    brightness: float = 0.15  # additive, +/-
    contrast: tuple[float, float] = (0.75, 1.3)
    gamma: tuple[float, float] = (0.7, 1.5)
    rotation_deg: float = 8.0
    scale: tuple[float, float] = (0.85, 1.1)
    shift: float = 0.06  # fraction of the side


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo


def intensity(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    n, dev = images.shape[0], images.device
    shape = (n, 1, 1, 1)
    gamma = _uniform(n, *cfg.gamma, generator, dev).view(shape)
    out = images.clamp(0, 1) ** gamma
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * _uniform(n, *cfg.contrast, generator, dev).view(shape) + mean
    out = out + _uniform(n, -cfg.brightness, cfg.brightness, generator, dev).view(shape)
    return out.clamp(0, 1)


def geometry(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig,
             generator: torch.Generator | None = None, mask_mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine transform of images and masks; ``mask_mode`` "nearest" keeps binary masks binary,
    "bilinear" keeps soft masks' sub-pixel boundaries."""
    n, dev = images.shape[0], images.device
    angle = _uniform(n, -cfg.rotation_deg, cfg.rotation_deg, generator, dev) * math.pi / 180
    scale = _uniform(n, *cfg.scale, generator, dev)
    tx = _uniform(n, -cfg.shift, cfg.shift, generator, dev) * 2
    ty = _uniform(n, -cfg.shift, cfg.shift, generator, dev) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode=mask_mode, padding_mode="zeros", align_corners=False)
    return images, masks


def augment_pair(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig,
                 generator: torch.Generator | None = None,
                 mask_mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = geometry(images, masks, cfg, generator, mask_mode)
    return intensity(images, cfg, generator), masks
