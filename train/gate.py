"""The champion gate's statistics: paired DeLong test of two AUCs on the same hold-out, calibration (ECE and the
reliability figure), and the decision whether a candidate may replace the champion.

Conventions are those of ``train.metrics`` (label 1 positive, ``score >= threshold`` called positive, NaN for a rate
with an empty denominator). The gate refuses rather than guesses: a hold-out it cannot judge on (one class only,
fewer than two of a class) is a reason to refuse, never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

from .metrics import _binary, auc_confidence_interval, binary_metrics, delong_components
from .report import DPI


@dataclass(frozen=True)
class PairedAUC:
    """Two AUCs on the same cases and DeLong's test of their difference (``diff = auc_a - auc_b``)."""

    auc_a: float
    auc_b: float
    diff: float
    diff_ci: tuple[float, float]  # normal-approximation interval at ``level``
    variance: float  # of the difference
    z: float
    p_value: float  # two-sided: the AUCs differ
    p_a_worse: float  # one-sided: a's AUC is lower than b's
    level: float = 0.95


def paired_delong(y_true, scores_a, scores_b, level: float = 0.95) -> PairedAUC:
    """DeLong et al. (1988) for two correlated ROC curves, with Sun & Xu (2014)'s fast structural components.

    Var(A - B) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + S01_bb - 2 S01_ab) / n, where S10 / S01 are the
    covariances over positives / negatives of the two scores' components: pairing removes the variance the two
    models share on the same images, which is why the test is sharper than comparing two separate intervals.
    A zero variance (e.g. identical scores) gives z = 0 when the AUCs are equal (p = 1, one-sided 0.5) and an
    infinite z otherwise.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, a = _binary(y_true, scores_a)
    _, b = _binary(y_true, scores_b)
    if a.shape != b.shape:
        raise ValueError(f"the two score vectors differ in length ({a.size} and {b.size})")
    auc_a, v10_a, v01_a = delong_components(y, a)
    auc_b, v10_b, v01_b = delong_components(y, b)
    s10 = np.cov(np.vstack([v10_a, v10_b]), ddof=1)
    s01 = np.cov(np.vstack([v01_a, v01_b]), ddof=1)
    contrast = np.array([1.0, -1.0])
    variance = max(float(contrast @ s10 @ contrast / v10_a.size + contrast @ s01 @ contrast / v01_a.size), 0.0)
    diff = auc_a - auc_b
    if variance > 0:
        z = diff / math.sqrt(variance)
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    half = float(norm.ppf(0.5 + level / 2)) * math.sqrt(variance)
    return PairedAUC(auc_a=auc_a, auc_b=auc_b, diff=diff, diff_ci=(diff - half, diff + half), variance=variance,
                     z=z, p_value=float(min(1.0, 2 * norm.sf(abs(z)))), p_a_worse=float(norm.cdf(z)), level=level)


# --- calibration --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReliabilityCurve:
    """Equal-width probability bins: how many predictions fell in each, their mean, and the observed rate."""

    edges: tuple[float, ...]  # bins + 1 edges from 0 to 1
    counts: tuple[int, ...]
    mean_predicted: tuple[float, ...]  # NaN for an empty bin
    observed: tuple[float, ...]  # share of positives; NaN for an empty bin

    @property
    def n(self) -> int:
        return sum(self.counts)

    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |observed - predicted| over the non-empty bins."""
        if self.n == 0:
            return float("nan")
        return float(sum(c * abs(o - p) for c, o, p in zip(self.counts, self.observed, self.mean_predicted,
                                                            strict=True) if c) / self.n)


def reliability_curve(y_true, probabilities, bins: int = 10) -> ReliabilityCurve:
    """Bin ``probabilities`` (in [0, 1]) into ``bins`` equal-width bins; the last bin includes 1."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _binary(y_true, probabilities)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts, means, observed = [], [], []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        counts.append(count)
        means.append(float(p[inside].mean()) if count else float("nan"))
        observed.append(float(y[inside].mean()) if count else float("nan"))
    return ReliabilityCurve(tuple(float(e) for e in edges), tuple(counts), tuple(means), tuple(observed))


def expected_calibration_error(y_true, probabilities, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width bins (Naeini et al. 2015; Guo et al. 2017)."""
    return reliability_curve(y_true, probabilities, bins).ece()


def plot_reliability(curves: ReliabilityCurve | Mapping[str, ReliabilityCurve], path: Path | str,
                     title: str = "Reliability on the hold-out") -> Path:
    """Reliability diagram (observed rate against mean predicted probability per bin) of one or several models,
    labelled with their ECE, above a histogram of the predictions; returns ``path``."""
    named = {"model": curves} if isinstance(curves, ReliabilityCurve) else dict(curves)
    fig = Figure(figsize=(5.5, 7.5), layout="constrained")  # no pyplot: see train/report.py
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
    width = 1.0 / max(len(next(iter(named.values())).counts), 1) if named else 0.1
    for k, (label, curve) in enumerate(named.items()):
        keep = [i for i, c in enumerate(curve.counts) if c]
        ax.plot([curve.mean_predicted[i] for i in keep], [curve.observed[i] for i in keep], marker="o",
                label=f"{label} (ECE {curve.ece():.3f}, n {curve.n})")
        centres = np.asarray(curve.edges[:-1]) + width * (k + 0.5) / len(named)
        hist.bar(centres, curve.counts, width=width / len(named), label=label, alpha=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed share of positives",
           title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    hist.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    return path


# --- the gate -----------------------------------------------------------------------------------------------------

def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class GateReport:
    """Whether a candidate may be promoted, and why (every reason a reader needs to act on a refusal)."""

    passed: bool
    reasons: tuple[str, ...]  # why it was refused; empty when it passed
    n: int
    positives: int
    threshold: float
    alpha: float
    min_sensitivity: float
    min_specificity: float
    candidate_auc: float | None
    candidate_auc_ci: tuple[float | None, float | None]
    candidate_sensitivity: float | None
    candidate_specificity: float | None
    candidate_ece: float | None
    champion_auc: float | None = None
    champion_ece: float | None = None
    auc_difference: float | None = None  # candidate - champion
    auc_difference_ci: tuple[float | None, float | None] | None = None
    p_value: float | None = None  # two-sided DeLong
    p_worse: float | None = None  # one-sided DeLong: the candidate's AUC is lower

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (NaN and infinities become null; tuples become lists)."""
        def plain(value: Any) -> Any:
            if isinstance(value, float):
                return _number(value)
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {k: plain(v) for k, v in asdict(self).items()}


def evaluate_gate(y_true, p_candidate, threshold: float, p_champion=None, *, alpha: float, min_sensitivity: float,
                  min_specificity: float, bins: int = 10) -> GateReport:
    """The promotion gate on the frozen hold-out (the same images for both models).

    Refused when the hold-out cannot judge (one class only, or fewer than two of a class: DeLong needs two), when
    the candidate's AUC is significantly lower than the champion's (one-sided paired DeLong p < ``alpha``), or when
    its sensitivity or specificity at its own stored ``threshold`` is below the floor. Calibration (ECE) is
    reported for both models, not gated: a well-ranked model can be recalibrated, a badly ranked one cannot.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y, p = _binary(y_true, p_candidate)
    champion = None if p_champion is None else _binary(y, p_champion)[1]
    if champion is not None and champion.shape != p.shape:
        raise ValueError(f"candidate ({p.size}) and champion ({champion.size}) scores differ in length")
    n, positives = int(y.size), int(y.sum())
    reasons: list[str] = []
    at_threshold = binary_metrics(y, p, threshold) if n else {"sensitivity": float("nan"),
                                                                "specificity": float("nan")}
    sens, spec = at_threshold["sensitivity"], at_threshold["specificity"]
    auc = lo = hi = float("nan")
    paired: PairedAUC | None = None
    if n == 0:
        reasons.append("the hold-out is empty: nothing to judge the candidate on")
    elif positives in (0, n):
        reasons.append(f"the hold-out has one class only ({positives} of {n} positive): AUC, sensitivity and "
                       f"specificity cannot all be measured; label more hold-out images of the other class")
    elif min(positives, n - positives) < 2:
        reasons.append(f"the hold-out has fewer than two images of a class ({positives} positive, "
                       f"{n - positives} negative): the DeLong test needs at least two of each")
    else:
        auc, lo, hi = auc_confidence_interval(y, p)
        if champion is not None:
            paired = paired_delong(y, p, champion)
            if paired.p_a_worse < alpha:
                reasons.append(f"the candidate's AUC {paired.auc_a:.3f} is significantly lower than the champion's "
                               f"{paired.auc_b:.3f} (difference {paired.diff:+.3f}, 95 % CI {paired.diff_ci[0]:+.3f} "
                               f"to {paired.diff_ci[1]:+.3f}; one-sided DeLong p = {paired.p_a_worse:.3g} < "
                               f"alpha {alpha:g})")
        if sens < min_sensitivity:
            reasons.append(f"sensitivity {sens:.3f} at the threshold {threshold:.3f} is below the floor "
                           f"{min_sensitivity:.3f}")
        if spec < min_specificity:
            reasons.append(f"specificity {spec:.3f} at the threshold {threshold:.3f} is below the floor "
                           f"{min_specificity:.3f}")
    ece = expected_calibration_error(y, p, bins) if n else float("nan")
    champion_ece = expected_calibration_error(y, champion, bins) if champion is not None and n else None
    return GateReport(
        passed=not reasons, reasons=tuple(reasons), n=n, positives=positives, threshold=float(threshold),
        alpha=alpha, min_sensitivity=min_sensitivity, min_specificity=min_specificity,
        candidate_auc=_number(auc), candidate_auc_ci=(_number(lo), _number(hi)),
        candidate_sensitivity=_number(sens), candidate_specificity=_number(spec), candidate_ece=_number(ece),
        champion_auc=None if paired is None else paired.auc_b, champion_ece=_number(champion_ece),
        auc_difference=None if paired is None else paired.diff,
        auc_difference_ci=None if paired is None else paired.diff_ci,
        p_value=None if paired is None else paired.p_value, p_worse=None if paired is None else paired.p_a_worse,
    )
