"""Losses: Dice + BCE and the Lovasz hinge for segmentation, focal losses for the classifier; overlap metrics."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    return ((2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


BCE_WEIGHT = 0.5  # the BCE term's weight beside an overlap loss (Dice for the shipped weights, or the Lovasz hinge)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = BCE_WEIGHT) -> torch.Tensor:
    """(1 - soft Dice) + weight * BCE: Dice for overlap, BCE for well-calibrated, sharp boundaries."""
    return (1 - soft_dice(logits, target)) + bce_weight * F.binary_cross_entropy_with_logits(logits, target)


def _lovasz_gradient(truth_sorted: torch.Tensor) -> torch.Tensor:
    """Increments of the Jaccard loss as the pixels, sorted by error, are counted wrong one after another."""
    positives = truth_sorted.sum()
    intersection = positives - truth_sorted.cumsum(0)
    union = positives + (1 - truth_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.0) -> torch.Tensor:
    """Per-image Lovasz hinge (Berman et al., CVPR 2018), optionally + weight * BCE.

    The Lovasz extension of the Jaccard loss, applied to the hinge errors 1 - logit * sign: a convex surrogate
    that optimises each image's IoU, and so (monotonically) the per-image Dice that the segmenter's goals average.
    Soft Dice pays most of its gradient to the uncertain pixels of the whole batch; this pays it to the pixels
    that cost the image's overlap most. Targets are thresholded at 0.5. For logits of +/-1 it equals
    2 * (1 - IoU) of the image, which the tests check.
    """
    losses = []
    for image_logits, image_target in zip(logits.flatten(1).float(), (target.flatten(1) > 0.5).float(), strict=True):
        signs = 2 * image_target - 1
        errors = 1 - image_logits * signs
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _lovasz_gradient(image_target[order])))
    loss = torch.stack(losses).mean()
    if bce_weight:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits, target)
    return loss


SEGMENTATION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dice_bce": dice_bce_loss,
    "lovasz": lovasz_hinge,
    "lovasz_bce": functools.partial(lovasz_hinge, bce_weight=BCE_WEIGHT),
}


def dice_iou(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """Hard Dice and IoU of two binary masks (an empty pair counts as a perfect match)."""
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
    for out, tgt in zip(outputs, targets, strict=True):
        for o, t in zip(out, tgt, strict=True):
            scores.append(dice_iou((o > 0).numpy(), (t > 0.5).numpy())[0])
    return float(sum(scores) / max(len(scores), 1))


# --- focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", equation 1) ---------------------------
# FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t). Pneumoconiosis-positive films and the higher ILO categories are a
# small minority: the (1 - p_t)^gamma factor stops the many easy negatives from dominating the gradient, and
# alpha_t rebalances the classes. Both are computed from log-probabilities, never from probabilities, so very
# confident logits give neither log(0) nor NaN.

def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def focal_loss_binary(logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
                      reduction: str = "mean") -> torch.Tensor:
    """Sigmoid focal loss; alpha_t = alpha for positives and 1 - alpha for negatives (None: no weighting).

    Written for soft targets as well (p_t = p y + (1 - p)(1 - y), the cross-entropy term as BCE), which equals
    equation 1 exactly for 0/1 targets and lets label smoothing be added later without a second loss.
    """
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t)
    one_minus_pt = targets * torch.sigmoid(-logits) + (1 - targets) * torch.sigmoid(logits)
    loss = one_minus_pt.pow(gamma) * ce
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def focal_loss_multiclass(logits: torch.Tensor, targets: torch.Tensor,
                          alpha: float | Sequence[float] | None = None, gamma: float = 2.0,
                          reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss over dim 1 (logits (N, C, ...), int64 targets (N, ...)).

    ``alpha`` as a sequence gives alpha_t = alpha[target] (one weight per ILO category, so the rare categories 2
    and 3 can be weighted up); a scalar multiplies every class; None is no weighting. With gamma 0 and alpha None
    this is plain cross-entropy.
    """
    log_probs = F.log_softmax(logits, dim=1)
    log_pt = log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    one_minus_pt = -torch.expm1(log_pt)  # 1 - p_t without cancellation when p_t is close to 1
    loss = -one_minus_pt.pow(gamma) * log_pt
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            loss = alpha * loss
        else:
            weights = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
            if weights.numel() != logits.shape[1]:
                raise ValueError(f"alpha has {weights.numel()} weights for {logits.shape[1]} classes")
            loss = weights[targets.long()] * loss
    return _reduce(loss, reduction)
