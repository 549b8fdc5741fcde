"""Post-processing of the U-Net's lung-field probability into a labelled mask.

Keep the two largest connected components, fill their holes, and label them by side: in a standard PA display
the patient's right lung is on the image's left, so the component whose centre lies further left is label 1
(right lung) and the other label 2 (left lung).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2


def postprocess_probability(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 label mask (0 background, 1 right lung, 2 left lung) from a probability map of any size."""
    binary = prob > threshold
    components, count = ndimage.label(binary)
    labels = np.zeros(prob.shape, dtype=np.uint8)
    if count == 0:
        return labels
    sizes = ndimage.sum_labels(binary, components, index=np.arange(1, count + 1))
    keep = (np.argsort(sizes)[::-1][:2] + 1).tolist()
    centres = {k: ndimage.center_of_mass(components == k)[1] for k in keep}
    ordered = sorted(keep, key=lambda k: centres[k])  # image-left first
    for label_value, component in zip((RIGHT_LUNG, LEFT_LUNG), ordered):
        filled = ndimage.binary_fill_holes(components == component)
        labels[filled & (labels == BACKGROUND)] = label_value
    if len(ordered) == 1:  # a single field: name it by the side of the image it lies on
        side = RIGHT_LUNG if centres[ordered[0]] < prob.shape[1] / 2 else LEFT_LUNG
        labels[labels > 0] = side
    return labels
