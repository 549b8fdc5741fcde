"""Losses: Dice + BCE for segmentation; overlap metrics used in reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    return ((2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.5) -> torch.Tensor:
    """(1 - soft Dice) + weight * BCE: Dice for overlap, BCE for well-calibrated, sharp boundaries."""
    return (1 - soft_dice(logits, target)) + bce_weight * F.binary_cross_entropy_with_logits(logits, target)


def dice_iou(pred: torch.Tensor | "np.ndarray", target: torch.Tensor | "np.ndarray") -> tuple[float, float]:
    """Hard Dice and IoU of two binary masks (an empty pair counts as a perfect match)."""
    import numpy as np

    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    inter = np.logical_and(p, t).sum()
    total = p.sum() + t.sum()
    union = np.logical_or(p, t).sum()
    if total == 0:
        return 1.0, 1.0
    return float(2 * inter / total), float(inter / union)


def batch_dice(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean hard Dice over images at threshold 0.5: the validation score of the segmenter."""
    scores = []
    for out, tgt in zip(outputs, targets):
        for o, t in zip(out, tgt):
            scores.append(dice_iou((o > 0).numpy(), (t > 0.5).numpy())[0])
    return float(sum(scores) / max(len(scores), 1))
