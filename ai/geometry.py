"""Letterbox resizing that remembers its geometry, so model-size outputs map back onto the native pixel grid.

The image is scaled to fit a square of ``size`` keeping its aspect ratio and centred on black padding. ``to_source``
crops the content region out of a model-size map and resamples it to the source's rows x columns, so a mask
predicted at model size lies exactly on the original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RESAMPLE_MODES = ("area", "triangle")


@dataclass(frozen=True)
class Letterbox:
    source_shape: tuple[int, int]  # (rows, columns) of the native image
    size: int  # side of the square model input
    content_shape: tuple[int, int]  # (rows, columns) of the scaled image inside the square
    offset: tuple[int, int]  # (top, left) of the content inside the square

    @classmethod
    def fit(cls, source_shape: tuple[int, int], size: int) -> Letterbox:
        rows, cols = source_shape
        scale = size / max(rows, cols)
        content = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        offset = ((size - content[0]) // 2, (size - content[1]) // 2)
        return cls((rows, cols), size, content, offset)

    @property
    def scale(self) -> tuple[float, float]:
        """Model pixels per source pixel along rows and columns."""
        return self.content_shape[0] / self.source_shape[0], self.content_shape[1] / self.source_shape[1]

    def to_model(self, image: np.ndarray, resample: str = "area") -> np.ndarray:
        """float32 (size, size): the image resized and padded with 0.

        ``resample`` is the antialiasing filter, and it must be the one the model's training images were made
        with: ``"area"`` averages the source pixels under each model pixel (``ai.lung_crop``, as the classifier was
        trained); ``"triangle"`` is the antialiased bilinear (tent) filter of PIL's BILINEAR resize, with which the
        lung U-Net's training images were shrunk (``train.datasets.load_gray``). The triangle is the softer of the
        two; fed the sharper area-averaged images, the U-Net lost 0.001 of mean Dice (docs/analysis.md)."""
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample filter {resample!r} (one of {', '.join(RESAMPLE_MODES)})")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if resample == "area":
            resized = F.interpolate(tensor, size=self.content_shape, mode="area")[0, 0].numpy()
        else:
            resized = F.interpolate(tensor, size=self.content_shape, mode="bilinear", align_corners=False,
                                    antialias=True)[0, 0].numpy()
        out = np.zeros((self.size, self.size), dtype=np.float32)
        top, left = self.offset
        out[top:top + self.content_shape[0], left:left + self.content_shape[1]] = resized
        return out

    def to_source(self, model_map: np.ndarray | torch.Tensor) -> np.ndarray:
        """Crop the content region of a (size, size) map and resample it bilinearly to the source grid."""
        tensor = torch.as_tensor(model_map, dtype=torch.float32)
        top, left = self.offset
        crop = tensor[top:top + self.content_shape[0], left:left + self.content_shape[1]][None, None]
        return F.interpolate(crop, size=self.source_shape, mode="bilinear", align_corners=False)[0, 0].numpy()
