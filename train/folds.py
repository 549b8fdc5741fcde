"""Patient-grouped, class-stratified k-fold cross-validation and the brightness augmentation that goes with it.

Why grouped: two radiographs of one patient are far more alike than two patients, so a patient with an image in
the training part and another in the validation part inflates every validation metric. Every group (patient) is
therefore placed whole in one fold. Where no patient ID is known, pass one group per image (e.g. the file name).

Why stratified: folds of ~70 images with a class share that drifts between folds make per-fold accuracy, sensitivity
and AUC vary for reasons that have nothing to do with the model. Groups are assigned greedily, largest first, each to
the fold where it keeps the per-class share across folds most even (the criterion of scikit-learn's
StratifiedGroupKFold, re-implemented here with numpy because scikit-learn is not a dependency). With one image per
patient this gives every fold floor or ceil of n_c / k images of each class c.

Why augmentation comes after the split (design, not convenience): the paper enlarges the training data with eight
brightness levels per radiograph. If the copies were made first and the enlarged set then split, copies of one
radiograph would land in both training and validation, and validation would partly measure recognition of an image
already seen. Here the split is made on the original images only; ``expand_augmented`` is then applied to a fold's
*training* indices, so each copy carries the index of its source item and can only exist where its source is. The
validation indices are never expanded: validation always sees each original image once, unaltered.
The alternative variant ("random brightness") draws a factor per image and epoch from the same range and applies it
to training batches only; ``apply_brightness`` serves both.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

ArrayT = TypeVar("ArrayT")

BRIGHTNESS_RANGE = (0.7, 1.3)
"""Multiplicative brightness factors of the augmentation: +/-30 %.

The paper states eight brightness levels but not their values; +/-30 % covers the exposure differences seen between
radiography units without pushing lung fields into saturation (a factor of 1.3 clips only what was already above
~0.77 of full scale, i.e. bone and mediastinum, not the lung parenchyma where the opacities are)."""


def stratified_group_kfold(labels: Sequence[Hashable], groups: Sequence[Hashable], k: int = 10,
                           seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split item indices into ``k`` (train, validation) pairs: groups whole, class shares as equal as possible.

    ``labels[i]`` is item i's class (any hashable; an item's group may hold several classes), ``groups[i]`` its
    patient. Groups are processed largest first (a large group placed last could not be balanced any more); groups of
    equal size in a seeded random order, so ``seed`` changes the folds and the same seed always gives the same folds,
    whatever the input order. Each group goes to the fold minimising the mean over classes of the standard deviation
    across folds of (fold's count of the class / total count of the class); ties go to the fold with fewer items,
    then to the lowest fold number. No fold is left empty: once only as many groups remain as there are empty folds,
    they go to the empty folds.

    Returns ``k`` pairs of sorted int64 index arrays; every index is in exactly one validation array.
    """
    labels = list(labels)
    groups = list(groups)
    if len(labels) != len(groups):
        raise ValueError(f"labels ({len(labels)}) and groups ({len(groups)}) differ in length")
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2, got k={k}")
    group_names, group_of = _unique_inverse(groups)
    class_names, class_of = _unique_inverse(labels)
    n_groups, n_classes = len(group_names), len(class_names)
    if k > n_groups:
        raise ValueError(f"cannot make {k} folds from {n_groups} groups (patients): every fold needs at least one "
                         f"whole group; use k <= {n_groups}")
    # counts[g, c]: items of class c in group g
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_of, class_of), 1)
    class_totals = counts.sum(axis=0)
    groups_per_class = (counts > 0).sum(axis=0)
    sparse = [str(class_names[c]) for c in range(n_classes) if groups_per_class[c] < k]
    if sparse:
        warnings.warn(f"classes {sparse} occur in fewer than k={k} groups: some validation folds will lack them",
                      stacklevel=2)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)  # seeded tie-breaking among equal-sized groups ...
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]  # ... then largest first

    fold_counts = np.zeros((k, n_classes), dtype=np.int64)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for position, g in enumerate(order):
        remaining = n_groups - position
        empty = np.flatnonzero(fold_counts.sum(axis=1) == 0)
        candidates = empty if remaining <= len(empty) else np.arange(k)
        # Cost of each candidate fold after adding group g, evaluated for all candidates at once.
        trial = np.repeat(fold_counts[None], len(candidates), axis=0)  # (cand, k, C)
        trial[np.arange(len(candidates)), candidates] += counts[g]
        cost = (trial / class_totals).std(axis=1).mean(axis=1)
        sizes = fold_counts[candidates].sum(axis=1)
        best = np.lexsort((candidates, sizes, np.round(cost, 12)))[0]
        fold_of_group[g] = candidates[best]
        fold_counts[candidates[best]] += counts[g]

    item_fold = fold_of_group[group_of]
    all_idx = np.arange(len(labels), dtype=np.int64)
    return [(all_idx[item_fold != f], all_idx[item_fold == f]) for f in range(k)]


def check_no_leakage(train: Sequence[int] | np.ndarray, val: Sequence[int] | np.ndarray,
                     groups: Sequence[Hashable]) -> None:
    """Raise ValueError if an item or a group (patient) is on both sides of one split.

    Cheap enough to call on every fold of a real run, not only in the tests: a leak silently inflates results.
    ``train`` may be plain indices or the (source, copy) rows from ``expand_augmented``; copies count as their source.
    """
    train_idx = np.asarray(train)
    if train_idx.ndim == 2:
        train_idx = train_idx[:, 0]
    val_idx = np.asarray(val)
    shared_items = np.intersect1d(train_idx, val_idx)
    if shared_items.size:
        raise ValueError(f"{shared_items.size} items in both training and validation, e.g. {shared_items[:5]}")
    group_of = np.asarray(groups, dtype=object)
    shared_groups = set(group_of[train_idx]) & set(group_of[val_idx])
    if shared_groups:
        raise ValueError(f"{len(shared_groups)} patients in both training and validation, "
                         f"e.g. {sorted(map(str, shared_groups))[:5]}")


def expand_augmented(indices: Sequence[int] | np.ndarray, copies_per_item: int) -> np.ndarray:
    """The augmented training set of one fold: rows (source index, copy number), ``copies_per_item`` per source.

    Call it with a fold's *training* indices only (see the module docstring): every row names the item it is a copy
    of, so a copy cannot exist without its source in the same training set. Copy j of an item is meant to get
    ``brightness_levels(copies_per_item)[j]``. Rows are item-major (all copies of the first item, then the next), in
    the order of ``indices``; shuffle per epoch as usual. The copies replace the original: with the default factors
    (even n) the unaltered image is not among them; add it separately if wanted.
    """
    if copies_per_item < 1:
        raise ValueError(f"copies_per_item must be >= 1, got {copies_per_item}")
    indices = np.asarray(indices, dtype=np.int64).ravel()
    source = np.repeat(indices, copies_per_item)
    copy = np.tile(np.arange(copies_per_item, dtype=np.int64), len(indices))
    return np.stack([source, copy], axis=1)


def brightness_levels(n: int = 8) -> list[float]:
    """``n`` evenly spaced multiplicative brightness factors over ``BRIGHTNESS_RANGE`` (0.7 ... 1.3).

    For n=8: 0.7, 0.786, 0.871, 0.957, 1.043, 1.129, 1.214, 1.3 - symmetric about 1, so the augmented set is neither
    darker nor brighter on average than the originals. Evenly spaced because the paper gives no values and nothing
    favours any exposure in between.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return [1.0]
    return [float(f) for f in np.linspace(*BRIGHTNESS_RANGE, n)]


def apply_brightness(image: ArrayT, factor: float) -> ArrayT:
    """``image`` (values in [0, 1]) times ``factor``, clipped to [0, 1]; same type as ``image``.

    Multiplicative rather than additive: a longer or shorter exposure scales the detected signal, so black background
    stays black instead of turning grey. Only ``*`` and ``.clip`` are used, so torch tensors work as well as numpy
    arrays (a float32 array stays float32).
    """
    if factor < 0:
        raise ValueError(f"brightness factor must be >= 0, got {factor}")
    array: Any = image  # numpy or torch: both have * and .clip
    return (array * factor).clip(0, 1)


def _unique_inverse(values: list[Hashable]) -> tuple[list[Hashable], np.ndarray]:
    """Distinct values (sorted by their string form, so the result does not depend on input order) and codes."""
    names = sorted(set(values), key=lambda v: (str(type(v)), str(v)))
    code = {v: i for i, v in enumerate(names)}
    return names, np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values))
