"""Which convention a lung mask follows behind the heart: a model-free test on the film and its mask.

The node's lung fields exclude the lung behind the heart (docs/analysis.md, "What a lung field is"), as most of the
Montgomery and Shenzhen masks do: the left field's medial border follows the heart border. About one Shenzhen mask
in ten does not: it runs the left field's medial border straight down beside the spine, so the heart shadow lies
inside the mask. Scored against such a mask, a model that follows the convention loses 0.1-0.3 of Dice on that film,
and a ranking by "opaque fraction inside the true mask" (``train.dense_disease.opaque_fraction``) takes the heart
shadow for disease, so those masks crowd the densest decile (docs/analysis.md gives the counts).

The test: in the lower part of the mask's left field (patient's left, the image's right), the medial strip of each
row is as bright as the film's soft tissue when the mask holds the heart, and clearly darker (aerated lung beside
the heart border) when it follows the border. ``heart_in_mask`` is that strip's mean brightness on the scale from
aerated lung (0: the 20th percentile inside the mask) to soft tissue (1: ``soft_tissue_level``). Over the 704
shared masks its distribution has two modes with an empty gap between 0.65 and 0.70 (Shenzhen: 0.10-0.35 for the
masks that follow the border, 0.75-1.0 for those that hold the heart); ``HEART_INCLUDED`` sits at the gap's lower
edge. Dense disease in the left lower lobe's medial part can also light the strip; the test is for evaluating and
training on the public masks, not for the node's input.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .dense_disease import soft_tissue_level

HEART_INCLUDED = 0.65  # strip brightness above which the mask is taken to hold the heart shadow (see above)
LOWER_PART = (0.5, 0.9)  # rows of the left field, as fractions of its height from the apex
MEDIAL_SHARE = 0.15  # the strip: this share of the field's width in each row, from its medial edge
MIN_ROW_WIDTH = 10  # pixels; narrower rows (the costophrenic tip) are skipped


def left_field(mask: np.ndarray) -> np.ndarray:
    """The mask's left lung: of its two largest components, the one further to the image's right."""
    components, count = ndimage.label(np.asarray(mask, bool))
    if count == 0:
        return np.zeros(np.shape(mask), bool)
    sizes = ndimage.sum_labels(components > 0, components, index=np.arange(1, count + 1))
    keep = (np.argsort(sizes)[::-1][:2] + 1).tolist()
    centres = [c[1] for c in ndimage.center_of_mass(components > 0, components, keep)]
    if len(keep) == 1 and centres[0] < mask.shape[1] / 2:
        return np.zeros(np.shape(mask), bool)  # a single field on the image's left: the right lung
    return components == keep[int(np.argmax(centres))]


def heart_in_mask(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Brightness of the left field's lower medial strip, 0 = aerated lung, 1 = soft tissue; None without a field."""
    mask = np.asarray(mask, bool)
    left = left_field(mask)
    rows = np.nonzero(left.any(axis=1))[0]
    if rows.size == 0:
        return None
    top, height = rows[0], rows[-1] - rows[0]
    img = np.asarray(image, np.float64)
    strips = []
    for r in range(int(top + LOWER_PART[0] * height), int(top + LOWER_PART[1] * height)):
        cols = np.nonzero(left[r])[0]
        if cols.size < MIN_ROW_WIDTH:
            continue
        width = max(3, int(MEDIAL_SHARE * cols.size))
        strips.append(img[r, cols[0]:cols[0] + width].mean())
    if not strips:
        return None
    aerated = float(np.percentile(img[mask], 20))
    soft = soft_tissue_level(img, mask)
    if soft - aerated <= 1e-6:
        return None
    return float((np.mean(strips) - aerated) / (soft - aerated))


def includes_heart(image: np.ndarray, mask: np.ndarray) -> bool:
    """True when the mask's left field holds the heart shadow (the other convention)."""
    score = heart_in_mask(image, mask)
    return score is not None and score > HEART_INCLUDED
