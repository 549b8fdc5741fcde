"""Post-processing of the U-Net's lung-field probability into a labelled mask.

Keep the two largest connected components, fill their holes, and label them by side: in a standard PA display
the patient's right lung is on the image's left, so the component whose centre lies further left is label 1
(right lung) and the other label 2 (left lung). Two lungs whose apices touch above the mediastinum come out of the
network as one component joined by a thin bridge; such a component is split at its narrowest column
(``split_joined_lungs``) instead of being reported as a single lung field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from .geometry import Letterbox

BACKGROUND, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2


BRIDGE_SEARCH = (0.3, 0.7)  # where a bridge may be: this part of the joined component's column range
BRIDGE_MAX_HEIGHT = 0.25  # a bridge column holds at most this share of the component's tallest column
SECOND_FIELD_SMALL = 0.15  # a second component below this share of the largest does not count as a lung


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a 2-D mask's true pixels, bottom and right exclusive; None when there are none.
    From the row and column projections: the box ``ndimage.find_objects`` gives, at a tenth of its time on a 2k
    grid."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def split_joined_lungs(binary: np.ndarray) -> np.ndarray:
    """Cut the largest component at its narrowest column when it is two lungs joined by a thin bridge.

    Applies only when there is no second component of at least ``SECOND_FIELD_SMALL`` of the largest; the cut
    column is searched in the middle of the component's column range, and it must hold at most
    ``BRIDGE_MAX_HEIGHT`` of the tallest column's pixels (a single lung's column profile has no such waist). Only
    that column's pixels are removed, so both halves keep their outline."""
    components, count = ndimage.label(binary)
    if count == 0:
        return binary
    sizes = ndimage.sum_labels(binary, components, index=np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1]
    if count > 1 and sizes[order[1]] >= SECOND_FIELD_SMALL * sizes[order[0]]:
        return binary
    largest = components == order[0] + 1
    heights = largest.sum(axis=0)
    cols = np.nonzero(heights)[0]
    lo = cols[0] + int(BRIDGE_SEARCH[0] * (cols[-1] - cols[0]))
    hi = cols[0] + int(BRIDGE_SEARCH[1] * (cols[-1] - cols[0]))
    if hi <= lo:
        return binary
    cut = lo + int(np.argmin(heights[lo:hi + 1]))
    if heights[cut] > BRIDGE_MAX_HEIGHT * heights.max():
        return binary
    out = binary.copy()
    out[:, cut] &= ~largest[:, cut]
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` by one labelling of the background inside the mask's box: the holes are the
    background components that do not touch the box's edge. The same result at about a sixth of the time (the
    scipy function dilates the border inwards until nothing changes)."""
    box = bounding_box(mask)
    if box is None:
        return mask.copy()
    top, left, bottom, right = box
    inner = mask[top:bottom, left:right]
    background, count = ndimage.label(~inner)
    edge = np.zeros(count + 1, dtype=bool)
    for border in (background[0], background[-1], background[:, 0], background[:, -1]):
        edge[border] = True
    edge[0] = True  # label 0 is the mask itself
    out = mask.copy()
    out[top:bottom, left:right] |= ~edge[background]
    return out


def repeat_nearest(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode="nearest")`` of a 2-D array to ``shape``, by repeating whole columns and then whole
    rows: row copies are memory copies, a fifth of the time of torch's nearest on a 2k grid. The source index is
    torch's, ``floor(i * (in / out))`` in single precision."""
    counts = []
    for n_in, n_out in zip(small.shape, shape, strict=True):
        scale = np.float32(n_in) / np.float32(n_out)
        index = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.intp), n_in - 1)
        counts.append(np.bincount(index, minlength=n_in))
    return np.repeat(np.repeat(small, counts[1], axis=1), counts[0], axis=0)


def postprocess_probability(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 label mask (0 background, 1 right lung, 2 left lung) from a probability map of any size."""
    binary = split_joined_lungs(prob > threshold)
    components, count = ndimage.label(binary)
    labels = np.zeros(prob.shape, dtype=np.uint8)
    if count == 0:
        return labels
    sizes = ndimage.sum_labels(binary, components, index=np.arange(1, count + 1))
    keep = (np.argsort(sizes)[::-1][:2] + 1).tolist()
    centres = dict(zip(keep, (c[1] for c in ndimage.center_of_mass(binary, components, keep)), strict=True))
    ordered = sorted(keep, key=lambda k: centres[k])  # image-left first
    for label_value, component in zip((RIGHT_LUNG, LEFT_LUNG), ordered, strict=False):
        filled = fill_holes(components == component)
        labels[filled & (labels == BACKGROUND)] = label_value
    if len(ordered) == 1:  # a single field: name it by the side of the image it lies on
        side = RIGHT_LUNG if centres[ordered[0]] < prob.shape[1] / 2 else LEFT_LUNG
        labels[labels > 0] = side
    return labels


def labels_on_source(prob_model: np.ndarray, letterbox: Letterbox) -> np.ndarray:
    """Native-grid labels from a model-size probability map, with the expensive work done at model size.

    Component selection, hole filling and side labelling run on the (small) letterbox content; the native mask is
    then the bilinearly resampled probability thresholded at 0.5, so its boundary keeps the model's sub-pixel
    information. Before resampling, the probability is pushed just above 0.5 inside the kept, filled lung fields
    and just below it everywhere else, so that the native mask has exactly the small map's topology.
    """
    import torch
    import torch.nn.functional as F

    top, left = letterbox.offset
    rows, cols = letterbox.content_shape
    content = np.asarray(prob_model, dtype=np.float32)[top:top + rows, left:left + cols]
    small = postprocess_probability(content)
    keep = small > 0
    clean = np.where(keep, np.maximum(content, 0.55), np.minimum(content, 0.45)).astype(np.float32)
    grown = ndimage.grey_dilation(small, size=3)  # boundary pixels of the native mask still find their side
    size = letterbox.source_shape
    prob = F.interpolate(torch.from_numpy(clean)[None, None], size=size, mode="bilinear", align_corners=False)
    # uint8 throughout and in place, the side map by whole-row copies: on a 3000 x 3000 grid a float side map,
    # torch.where or torch's nearest interpolation cost more than the bilinear one itself (docs/benchmarks.md)
    side = repeat_nearest(grown.astype(np.uint8), size)
    side *= (prob > 0.5)[0, 0].numpy()
    return side
