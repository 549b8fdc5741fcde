"""The classifier's input: the lung region of a normalised radiograph, letterboxed to a square, and where it came
from on the native grid (so heat maps land on the pixels the reader sees)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .geometry import Letterbox
from .lungs import bounding_box
from .normalise import NormalisedImage, stretch_contrast


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
    extent = bounding_box(lung)
    if extent is None:
        raise ValueError("no lung pixels in the mask: the input check should have refused this image")
    first_row, first_col, end_row, end_col = extent
    height, width = end_row - first_row, end_col - first_col
    pad_r, pad_c = round(margin * height), round(margin * width)
    top, bottom = max(0, first_row - pad_r), min(image.shape[0], end_row + pad_r)
    left, right = max(0, first_col - pad_c), min(image.shape[1], end_col + pad_c)
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


def classifier_input(image: NormalisedImage, labels: np.ndarray, size: int, margin: float = 0.05,
                     suppress_outside: bool = False) -> tuple[np.ndarray, CropGeometry]:
    """The classifier's (size, size) input in [0, 1], made the same way in training and at inference: lung crop,
    letterbox, then the contrast standardisation the segmenter also uses (vendors' windows differ widely)."""
    crop, geometry = lung_crop(image.pixels, labels, size, margin=margin, suppress_outside=suppress_outside)
    valid = np.zeros_like(crop, dtype=bool)
    top, left = geometry.letterbox.offset
    rows, cols = geometry.letterbox.content_shape
    valid[top:top + rows, left:left + cols] = True
    if suppress_outside:
        valid &= crop > 0
    return stretch_contrast(crop, valid), geometry
