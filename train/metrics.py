"""Classification metrics of the cross-validation report, in numpy/scipy (scikit-learn is not a dependency), and
the bootstrap interval of a mean that the segmenter's evaluation gives its Dice figures.

Conventions, used everywhere here so that a threshold chosen on out-of-fold scores reproduces exactly the operating
point reported for it:
* label 1 is the positive class (disease), 0 the negative; a higher score means "more likely positive";
* an item is called positive when ``score >= threshold``;
* a rate with an empty denominator (e.g. sensitivity of a fold without positives) is NaN, not 0 or 1, so that it
  cannot pass for a result; the report writes it as "n/a".
"""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap, norm, rankdata


def _binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true ({y.size}) and scores ({s.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 (negative) and 1 (positive)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), s


def _both_classes(y: np.ndarray, what: str) -> None:
    if y.all() or not y.any():
        raise ValueError(f"{what} needs both positives and negatives; got {int(y.sum())} of {y.size} positive")


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score in decreasing order, starting at (0, 0) with +inf.

    Point i is the operating point of ``score >= thresholds[i]``. Tied scores form one point (a diagonal step), which
    is why the trapezoidal area under this curve equals ``roc_auc``'s tie-aware Mann-Whitney value.
    """
    y, s = _binary(y_true, scores)
    _both_classes(y, "an ROC curve")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative) + 1/2 P(tie).

    Computed as the Mann-Whitney U statistic from mid-ranks: U / (n_pos * n_neg).
    """
    y, s = _binary(y_true, scores)
    _both_classes(y, "AUC")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = rankdata(s)  # ties get the mean rank: the 1/2 of the Mann-Whitney statistic
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def delong_components(y_true, scores) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, V10, V01): DeLong et al. (1988)'s structural components by the fast mid-rank algorithm of Sun & Xu
    (2014).

    V10 (per positive: share of negatives it outranks) and V01 (per negative: share of positives that outrank it)
    come from three mid-rankings, O(n log n) instead of DeLong's O(n_pos * n_neg) pairs. Their means are the AUC;
    their (co)variances give the AUC's variance and, for two scores of the same cases, the paired test.
    """
    y, s = _binary(y_true, scores)
    pos, neg = s[y], s[~y]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least two positives and two negatives; got {m} and {n}")
    tx, ty = rankdata(pos), rankdata(neg)
    tz = rankdata(np.r_[pos, neg])
    auc = (tz[:m].sum() / m - (m + 1) / 2) / n
    v10 = (tz[:m] - tx) / n  # per positive
    v01 = 1.0 - (tz[m:] - ty) / m  # per negative
    return float(auc), v10, v01


def delong_variance(y_true, scores) -> tuple[float, float]:
    """(AUC, variance of the AUC) by DeLong et al. (1988) from ``delong_components``."""
    auc, v10, v01 = delong_components(y_true, scores)
    variance = v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size
    return auc, float(variance)


def auc_confidence_interval(y_true, scores, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, lower, upper): the normal-approximation interval AUC +/- z * DeLong SE, clipped to [0, 1].

    With perfectly separated classes DeLong's variance is 0 and the interval collapses to (1, 1); with few cases
    treat that as "very high", not as certainty (the report states n for this reason).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    auc, variance = delong_variance(y_true, scores)
    half = norm.ppf(0.5 + level / 2) * np.sqrt(max(variance, 0.0))
    return auc, float(max(auc - half, 0.0)), float(min(auc + half, 1.0))


def mean_interval(values, level: float = 0.95, resamples: int = 10_000) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of ``values`` and its percentile-bootstrap interval (scipy.stats.bootstrap,
    seeded, so a report is reproducible). Used for per-image Dice, and for paired per-image Dice differences between
    two models, where the interval says whether a change of the mean is more than which images happened to be
    held out. Fewer than two values give a degenerate interval (mean, mean, mean)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(data.mean())
    if data.size < 2 or np.all(data == data[0]):
        return mean, mean, mean
    result = bootstrap((data,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                       random_state=np.random.default_rng(0))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def _rate(num: int, den: int) -> float:
    return num / den if den else float("nan")


def binary_metrics(y_true, y_prob, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV and the four counts at ``y_prob >= threshold``."""
    y, p = _binary(y_true, y_prob)
    pred = p >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    tn = int((~pred & ~y).sum())
    fn = int((~pred & y).sum())
    return {"accuracy": _rate(tp + tn, y.size), "sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp),
            "ppv": _rate(tp, tp + fp), "npv": _rate(tn, tn + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def binary_summary(y_true, scores, threshold: float, level: float = 0.95) -> dict:
    """Everything the report shows for one binary fold (or the pooled out-of-fold predictions).

    ``binary_metrics`` plus n, threshold, auc, auc_ci [lo, hi] and confusion [[tn, fp], [fn, tp]] (rows true class,
    columns predicted, class 0 first, as ``confusion_matrix``). AUC/CI are NaN where a fold lacks a class or has
    fewer than two of one (DeLong needs two), so one odd fold does not abort a ten-fold run.
    """
    out = {"n": int(np.asarray(y_true).size), "threshold": float(threshold),
           **binary_metrics(y_true, scores, threshold)}
    try:
        auc, lo, hi = auc_confidence_interval(y_true, scores, level)
    except ValueError:
        y, _ = _binary(y_true, scores)
        auc = roc_auc(y_true, scores) if y.any() and not y.all() else float("nan")
        lo = hi = float("nan")
    out.update(auc=auc, auc_ci=[lo, hi], confusion=[[out["tn"], out["fp"]], [out["fn"], out["tp"]]])
    return out


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; row = true class, column = predicted class."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true ({t.size}) and y_pred ({p.size}) differ in length")
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.size and (v.min() < 0 or v.max() >= n_classes):
            raise ValueError(f"{name} holds classes outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def quadratic_weighted_kappa(y_true, y_pred, n_classes: int) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 / (n_classes - 1)^2: agreement on an ordinal scale.

    For ordered grades (e.g. ILO profusion 0/1/2/3) a miss by two grades costs four times a miss by one.
    kappa = 1 - sum(W * O) / sum(W * E), O the observed confusion matrix and E the one expected by chance from its
    marginals. NaN when chance disagreement is zero (both raters use one and the same single class), where kappa is
    undefined.
    """
    if n_classes < 2:
        raise ValueError("kappa needs at least two classes")
    observed = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    total = observed.sum()
    if total == 0:
        return float("nan")
    i, j = np.indices((n_classes, n_classes))
    weights = (i - j) ** 2 / (n_classes - 1) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    chance = (weights * expected).sum()
    if chance == 0:
        return float("nan")
    return float(1.0 - (weights * observed).sum() / chance)


def youden_threshold(y_true, scores) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 (``score >= t`` is positive).

    The rule for the final model when misses and false alarms are weighed equally. Among equal J the highest
    threshold wins (fewer false alarms for the same J). The returned value is an observed score, so applying it to
    the same out-of-fold scores reproduces the reported operating point exactly.
    """
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    j = (tpr - fpr)[1:]  # skip the +inf point (nothing positive)
    best = np.flatnonzero(j >= j.max() - 1e-12)  # tolerance: 2/3 - 0 and 1 - 1/3 are equal J in exact arithmetic
    return float(thresholds[1:][best[0]])  # first = highest threshold


def threshold_for_sensitivity(y_true, scores, target: float) -> float:
    """The highest threshold whose sensitivity is at least ``target``: best specificity for a screening target.

    The rule for screening, where a missed case costs more than a second look (e.g. target 0.95).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    _, tpr, thresholds = roc_curve(y_true, scores)
    reached = np.flatnonzero(tpr >= target - 1e-12)  # tolerance: e.g. 19/20 must count as reaching 0.95
    return float(thresholds[reached[0]])  # tpr ends at 1, so ``reached`` is never empty; [0] = highest threshold


def multiclass_metrics(y_true, probs) -> dict:
    """Accuracy, confusion matrix and quadratic weighted kappa of the arg-max prediction of ``probs`` (N, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    y = np.asarray(y_true, dtype=np.int64).ravel()
    if y.size != probs.shape[0]:
        raise ValueError(f"y_true ({y.size}) and probs ({probs.shape[0]}) differ in length")
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    return {"n": int(y.size), "accuracy": _rate(int((pred == y).sum()), y.size),
            "confusion": confusion_matrix(y, pred, n_classes),
            "qwk": quadratic_weighted_kappa(y, pred, n_classes)}
