"""The champion gate's statistics: paired DeLong against its definition by brute force, its behaviour under the null,
calibration error by hand, and the gate's decisions (a better candidate passes, a shuffled-label one is refused)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from train import gate as G

Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
A = np.array([0.9, 0.8, 0.4, 0.4, 0.7, 0.4, 0.2, 0.1, 0.3])  # ties across and within classes
B = np.array([0.6, 0.9, 0.5, 0.2, 0.5, 0.3, 0.6, 0.1, 0.2])


def brute_force(y, a, b):
    """DeLong's paired variance straight from the pair kernel psi (1 concordant, 1/2 tie, 0 discordant)."""
    y = np.asarray(y, bool)

    def components(s):
        d = s[y][:, None] - s[~y][None, :]
        psi = (d > 0) + 0.5 * (d == 0)
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    auc_a, v10_a, v01_a = components(np.asarray(a, float))
    auc_b, v10_b, v01_b = components(np.asarray(b, float))
    m, n = v10_a.size, v01_a.size

    def cov(u, v):
        return ((u - u.mean()) * (v - v.mean())).sum() / (u.size - 1)

    var = ((cov(v10_a, v10_a) + cov(v10_b, v10_b) - 2 * cov(v10_a, v10_b)) / m
           + (cov(v01_a, v01_a) + cov(v01_b, v01_b) - 2 * cov(v01_a, v01_b)) / n)
    return auc_a, auc_b, var


def test_paired_delong_matches_the_pairwise_definition():
    auc_a, auc_b, var = brute_force(Y, A, B)
    r = G.paired_delong(Y, A, B)
    assert (r.auc_a, r.auc_b) == (pytest.approx(auc_a), pytest.approx(auc_b))
    assert r.diff == pytest.approx(auc_a - auc_b) and r.variance == pytest.approx(var)
    assert r.z == pytest.approx((auc_a - auc_b) / math.sqrt(var))
    half = 1.959963984540054 * math.sqrt(var)
    assert r.diff_ci == (pytest.approx(r.diff - half), pytest.approx(r.diff + half))
    # p-values from the normal distribution: two-sided 2 * (1 - Phi(|z|)), one-sided Phi(z)
    phi = 0.5 * (1 + math.erf(r.z / math.sqrt(2)))
    assert r.p_a_worse == pytest.approx(phi) and r.p_value == pytest.approx(2 * min(phi, 1 - phi))
    # swapping the models flips the sign and the one-sided p, not the two-sided p
    s = G.paired_delong(Y, B, A)
    assert s.diff == pytest.approx(-r.diff) and s.variance == pytest.approx(r.variance)
    assert s.p_value == pytest.approx(r.p_value) and s.p_a_worse == pytest.approx(1 - r.p_a_worse)

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    a, b = rng.normal(y, 1.0), rng.integers(0, 4, 60) + 0.5 * y  # continuous against heavily tied scores
    auc_a, auc_b, var = brute_force(y, a, b)
    r = G.paired_delong(y, a, b)
    assert r.diff == pytest.approx(auc_a - auc_b) and r.variance == pytest.approx(var)


def test_identical_scores_differ_by_nothing():
    r = G.paired_delong(Y, A, A)
    assert r.diff == 0 and r.variance == 0 and r.z == 0
    assert r.p_value == 1.0 and r.p_a_worse == 0.5 and r.diff_ci == (0.0, 0.0)


def test_perfect_against_random_is_significant_and_the_null_holds_its_level():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(40)].astype(int)
    perfect = y + rng.random(80) * 0.5
    random = rng.random(80)
    r = G.paired_delong(y, random, perfect)
    assert r.auc_b == 1.0 and r.diff < -0.3 and r.diff_ci[1] < 0
    assert r.p_value < 1e-6 and r.p_a_worse < 1e-6
    assert G.paired_delong(y, perfect, random).p_a_worse > 1 - 1e-6
    # Two equally good models (independent noise on one signal): the test rejects about alpha of the time.
    rejected = 0
    runs = 400
    for _ in range(runs):
        y = rng.integers(0, 2, 80)
        signal = rng.normal(y * 1.0, 1.0)
        rejected += G.paired_delong(y, signal + rng.normal(0, 0.7, 80), signal + rng.normal(0, 0.7, 80)
                                    ).p_value < 0.05
    assert 0.02 <= rejected / runs <= 0.09, rejected / runs


def test_paired_delong_refuses_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        G.paired_delong(Y, A, B[:-1])
    with pytest.raises(ValueError, match="two positives and two negatives"):
        G.paired_delong([1, 0, 0], [0.9, 0.1, 0.2], [0.5, 0.4, 0.3])


def test_expected_calibration_error_by_hand():
    # bin [0.1, 0.2): 0.1, 0.15 with 0 of 2 positive -> |0 - 0.125| * 2
    # bin [0.8, 0.9): 0.8, 0.85 with 2 of 2 positive -> |1 - 0.825| * 2
    # bin [0.9, 1.0]: 1.0 (the last bin includes 1) with 0 of 1 positive -> |0 - 1| * 1
    y = [0, 0, 1, 1, 0]
    p = [0.1, 0.15, 0.8, 0.85, 1.0]
    curve = G.reliability_curve(y, p, bins=10)
    assert curve.counts == (0, 2, 0, 0, 0, 0, 0, 0, 2, 1) and curve.n == 5
    assert curve.mean_predicted[1] == pytest.approx(0.125) and curve.observed[8] == 1.0
    assert math.isnan(curve.observed[0]) and curve.edges[0] == 0 and curve.edges[-1] == 1
    assert G.expected_calibration_error(y, p) == pytest.approx((0.25 + 0.35 + 1.0) / 5)
    # calibrated within every bin -> 0; always 1 for half positives -> 0.5
    assert G.expected_calibration_error([0, 1, 0, 0, 1, 1], [0.5, 0.5, 0.0, 0.0, 1.0, 1.0]) == pytest.approx(0)
    assert G.expected_calibration_error([0, 1, 0, 1], [1.0] * 4) == pytest.approx(0.5)
    assert G.expected_calibration_error([0, 1], [0.3, 0.3], bins=1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        G.reliability_curve([0, 1], [0.2, 1.2])


def test_reliability_figure_is_a_png(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    curves = {"candidate": G.reliability_curve(y, rng.random(200)),
              "champion": G.reliability_curve(y, np.clip(y * 0.6 + rng.random(200) * 0.4, 0, 1))}
    for target, curve in ((tmp_path / "two.png", curves), (tmp_path / "one.png", curves["candidate"])):
        G.plot_reliability(curve, target)
        head = target.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 300 and height > 300


def models(seed: int = 3, n: int = 120):
    """Hold-out labels, a champion with a fair signal, a better candidate, and one trained on shuffled labels."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
    champion = 1 / (1 + np.exp(-rng.normal((y - 0.5) * 1.5, 1.0)))
    better = 1 / (1 + np.exp(-rng.normal((y - 0.5) * 4.0, 1.0)))
    shuffled = 1 / (1 + np.exp(-rng.normal((rng.permutation(y) - 0.5) * 4.0, 1.0)))
    return y, champion, better, shuffled


def test_gate_accepts_a_better_candidate_and_refuses_one_trained_on_shuffled_labels():
    y, champion, better, shuffled = models()
    floors = {"alpha": 0.05, "min_sensitivity": 0.6, "min_specificity": 0.6}
    accepted = G.evaluate_gate(y, better, 0.5, champion, **floors)
    assert accepted.passed and accepted.reasons == ()
    assert accepted.auc_difference is not None and accepted.auc_difference > 0
    assert accepted.candidate_auc > accepted.champion_auc
    lo, hi = accepted.auc_difference_ci
    assert lo < accepted.auc_difference < hi and accepted.p_worse > 0.5
    assert accepted.candidate_sensitivity >= 0.6 and accepted.candidate_specificity >= 0.6
    assert 0 <= accepted.candidate_ece <= 1 and 0 <= accepted.champion_ece <= 1
    assert (accepted.n, accepted.positives) == (120, 60)

    refused = G.evaluate_gate(y, shuffled, 0.5, champion, **floors)
    assert not refused.passed
    assert any("significantly lower than the champion" in r for r in refused.reasons), refused.reasons
    assert refused.p_worse < 0.05 and refused.auc_difference < 0 and refused.auc_difference_ci[1] < 0

    text = json.dumps(refused.to_json(), allow_nan=False)  # strict JSON: NaN would be refused here
    assert json.loads(text)["reasons"] == list(refused.reasons)


def test_gate_floors_and_the_first_model():
    y, champion, better, _ = models()
    # no champion yet: only the floors decide, and there is no AUC difference to report
    first = G.evaluate_gate(y, better, 0.5, alpha=0.05, min_sensitivity=0.6, min_specificity=0.6)
    assert first.passed and first.auc_difference is None and first.champion_auc is None
    # a threshold that calls everything positive: sensitivity 1, specificity 0
    low = G.evaluate_gate(y, better, 0.0, champion, alpha=0.05, min_sensitivity=0.8, min_specificity=0.5)
    assert not low.passed and low.candidate_specificity == 0
    assert [r for r in low.reasons if r.startswith("specificity 0.000")] and len(low.reasons) == 1
    high = G.evaluate_gate(y, better, 1.01, champion, alpha=0.05, min_sensitivity=0.8, min_specificity=0.5)
    assert not high.passed and [r for r in high.reasons if r.startswith("sensitivity 0.000")]


def test_gate_refuses_a_hold_out_it_cannot_judge_on():
    one_class = G.evaluate_gate([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9], 0.5, [0.2, 0.2, 0.2, 0.2], alpha=0.05,
                                min_sensitivity=0, min_specificity=0)
    assert not one_class.passed and "one class only" in one_class.reasons[0]
    assert one_class.candidate_auc is None and one_class.candidate_sensitivity is None
    json.dumps(one_class.to_json(), allow_nan=False)
    single = G.evaluate_gate([1, 0, 0, 0], [0.9, 0.2, 0.3, 0.1], 0.5, alpha=0.05, min_sensitivity=0,
                             min_specificity=0)
    assert not single.passed and "fewer than two" in single.reasons[0]
    empty = G.evaluate_gate([], [], 0.5, alpha=0.05, min_sensitivity=0, min_specificity=0)
    assert not empty.passed and "empty" in empty.reasons[0]
    with pytest.raises(ValueError, match="differ in length"):
        G.evaluate_gate([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], 0.5, [0.1, 0.9], alpha=0.05, min_sensitivity=0,
                        min_specificity=0)
