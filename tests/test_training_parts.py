"""Cross-validation parts of the training pipeline: folds, augmentation after the split, metrics, report files.

Fast (no training, no images read): the folds are checked on the real labels.csv, the metrics against values
computed by hand, the report by the files it writes.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter, defaultdict

import numpy as np
import pytest

from train import folds as F
from train import metrics as M
from train import report as R
from train.datasets import data_dir, read_lung_masks

# --- folds ---------------------------------------------------------------------------------------------------------


def synthetic_groups(n_groups: int = 120, seed: int = 1) -> tuple[list[int], list[str]]:
    """Patients with 1-5 images each; labels mostly per patient, some patients mixed (e.g. follow-up became ill)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(n_groups):
        size = int(rng.integers(1, 6))
        base = int(rng.random() < 0.35)
        for _ in range(size):
            labels.append(base if rng.random() > 0.1 else 1 - base)
            groups.append(f"P{g:04d}")
    return labels, groups


def assert_partition(splits, n_items: int, groups) -> None:
    groups = np.asarray(groups)
    seen = np.zeros(n_items, dtype=int)
    fold_of_group: dict[str, set[int]] = defaultdict(set)
    for f, (train, val) in enumerate(splits):
        assert len(val) > 0, f"fold {f} is empty"
        assert np.intersect1d(train, val).size == 0
        assert np.array_equal(np.union1d(train, val), np.arange(n_items)), "train + val must cover every item"
        seen[val] += 1
        for g in set(groups[val]):
            fold_of_group[g].add(f)
        F.check_no_leakage(train, val, groups)
        assert not set(groups[train]) & set(groups[val])
    assert (seen == 1).all(), "every index must be in exactly one validation fold"
    assert all(len(fs) == 1 for fs in fold_of_group.values()), "a patient was split across folds"


def test_folds_keep_patients_whole_and_cover_every_index_once():
    labels, groups = synthetic_groups()
    splits = F.stratified_group_kfold(labels, groups, k=10, seed=0)
    assert len(splits) == 10
    assert_partition(splits, len(labels), groups)


def test_folds_are_deterministic_per_seed_and_independent_of_input_order():
    labels, groups = synthetic_groups()
    a = F.stratified_group_kfold(labels, groups, k=5, seed=3)
    b = F.stratified_group_kfold(labels, groups, k=5, seed=3)
    c = F.stratified_group_kfold(labels, groups, k=5, seed=4)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True)), "the seed must matter"

    def fold_by_group(splits, grp):
        return {grp[i]: f for f, (_, val) in enumerate(splits) for i in val}

    perm = np.random.default_rng(0).permutation(len(labels))
    shuffled = F.stratified_group_kfold([labels[i] for i in perm], [groups[i] for i in perm], k=5, seed=3)
    assert fold_by_group(shuffled, [groups[i] for i in perm]) == fold_by_group(a, groups)


def test_folds_refuse_more_folds_than_patients():
    with pytest.raises(ValueError, match="cannot make 5 folds from 4 groups"):
        F.stratified_group_kfold([0, 1, 0, 1, 0, 1], ["a", "a", "b", "c", "d", "d"], k=5)
    with pytest.raises(ValueError, match="k >= 2"):
        F.stratified_group_kfold([0, 1], ["a", "b"], k=1)
    with pytest.raises(ValueError, match="differ in length"):
        F.stratified_group_kfold([0, 1], ["a"], k=2)
    # k == number of groups works: leave-one-patient-out (with a warning: some folds must lack a class)
    with pytest.warns(UserWarning, match="fewer than k=4 groups"):
        splits = F.stratified_group_kfold([0, 1, 0, 1, 0, 1], ["a", "a", "b", "c", "d", "d"], k=4)
    assert_partition(splits, 6, ["a", "a", "b", "c", "d", "d"])


def test_no_fold_is_left_empty_even_with_one_dominant_patient():
    labels = [0] * 50 + [1, 0, 1]
    groups = ["big"] * 50 + ["x", "y", "z"]
    with pytest.warns(UserWarning):
        splits = F.stratified_group_kfold(labels, groups, k=4)
    assert_partition(splits, len(labels), groups)


@pytest.fixture(scope="module")
def lung_samples():
    path = data_dir() / "cxr-lung-masks" / "labels.csv"
    if not path.exists():
        pytest.fail(f"{path} missing: set PNEUMO_DATA_DIR to the shared data folder")
    return read_lung_masks()


def test_folds_on_the_real_labels_are_stratified_and_grouped(lung_samples):
    labels = [int(s.finding == "tuberculosis") for s in lung_samples]
    groups = [s.patient_id for s in lung_samples]
    assert groups[0] == lung_samples[0].file.rsplit("_", 1)[0] and not groups[0].endswith((".png", "_0", "_1"))
    splits = F.stratified_group_kfold(labels, groups, k=10, seed=0)
    assert_partition(splits, len(labels), groups)
    y = np.asarray(labels)
    overall = y.mean()
    sizes = [len(val) for _, val in splits]
    assert max(sizes) - min(sizes) <= 2, sizes
    for _, val in splits:
        assert abs(y[val].mean() - overall) < 0.02, (y[val].mean(), overall)

    # Stratifying on source x finding keeps both the class and the hospital share even.
    combined = [f"{s.source}/{s.finding}" for s in lung_samples]
    splits = F.stratified_group_kfold(combined, groups, k=10, seed=0)
    assert_partition(splits, len(labels), groups)
    montgomery = np.array([s.source == "montgomery" for s in lung_samples])
    for _, val in splits:
        assert abs(y[val].mean() - overall) < 0.03
        assert abs(montgomery[val].mean() - montgomery.mean()) < 0.03


def test_augmented_copies_stay_with_their_source_in_training():
    labels, groups = synthetic_groups()
    levels = F.brightness_levels(8)
    for train, val in F.stratified_group_kfold(labels, groups, k=10, seed=0):
        expanded = F.expand_augmented(train, 8)
        assert expanded.shape == (8 * len(train), 2)
        sources, copies = expanded[:, 0], expanded[:, 1]
        assert set(sources) == set(train.tolist()), "copies come from the training indices only"
        assert not np.isin(sources, val).any(), "an augmented copy landed in validation"
        assert set(Counter(sources.tolist()).values()) == {8}
        assert all(sorted(copies[sources == i].tolist()) == list(range(8)) for i in train[:5])
        assert copies.max() < len(levels)
        F.check_no_leakage(expanded, val, groups)
    # the leak check catches a copy whose source (or patient) is in validation
    train, val = F.stratified_group_kfold(labels, groups, k=10, seed=0)[0]
    leaked = np.vstack([F.expand_augmented(train, 8), [[val[0], 0]]])
    with pytest.raises(ValueError, match="both training and validation"):
        F.check_no_leakage(leaked, val, groups)
    with pytest.raises(ValueError):
        F.expand_augmented(train, 0)


def test_brightness_levels_and_application():
    levels = F.brightness_levels()
    assert len(levels) == 8
    assert levels[0] == pytest.approx(0.7) and levels[-1] == pytest.approx(1.3)
    assert np.all(np.diff(levels) > 0) and np.allclose(np.diff(levels), np.diff(levels)[0])
    assert np.mean(levels) == pytest.approx(1.0)
    assert F.brightness_levels(1) == [1.0]

    image = np.array([[0.0, 0.5], [0.8, 1.0]], dtype=np.float32)
    bright = F.apply_brightness(image, 1.3)
    assert bright.dtype == np.float32
    assert np.allclose(bright, [[0.0, 0.65], [1.0, 1.0]])
    assert np.allclose(F.apply_brightness(image, 0.7), image * 0.7)
    with pytest.raises(ValueError):
        F.apply_brightness(image, -0.1)


# --- metrics -------------------------------------------------------------------------------------------------------

# Positives 0.9, 0.6, 0.4 against negatives 0.7, 0.4, 0.2, 0.1, pair by pair:
#   0.9 beats all four (4); 0.6 beats 0.4, 0.2, 0.1 (3); 0.4 ties 0.4 (1/2) and beats 0.2, 0.1 (2)
#   -> 9.5 concordant of 12 pairs.
HAND_Y = [1, 1, 1, 0, 0, 0, 0]
HAND_S = [0.9, 0.6, 0.4, 0.7, 0.4, 0.2, 0.1]
HAND_AUC = 9.5 / 12


def pairwise_auc(y, s) -> float:
    y, s = np.asarray(y, bool), np.asarray(s, float)
    diff = s[y][:, None] - s[~y][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_hand_example_and_roc_area():
    assert M.roc_auc(HAND_Y, HAND_S) == pytest.approx(HAND_AUC)
    fpr, tpr, thr = M.roc_curve(HAND_Y, HAND_S)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.isinf(thr[0])
    assert np.all(np.diff(thr[1:]) < 0), "one point per distinct score, decreasing"
    assert np.trapezoid(tpr, fpr) == pytest.approx(HAND_AUC), "tie = diagonal step: area equals Mann-Whitney"
    # the tied score 0.4 is one point: 3/3 positives and 2/4 negatives at score >= 0.4
    i = list(thr).index(0.4)
    assert (tpr[i], fpr[i]) == (1.0, 0.5)


def test_auc_perfect_inverted_random_and_ties():
    y = [0, 0, 1, 1]
    assert M.roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    assert abs(M.roc_auc(y, rng.random(4000)) - 0.5) < 0.03
    s = rng.integers(0, 5, 4000)  # heavy ties
    assert M.roc_auc(y, s) == pytest.approx(pairwise_auc(y, s))
    with pytest.raises(ValueError, match="both positives and negatives"):
        M.roc_auc([1, 1], [0.2, 0.3])


def test_delong_matches_the_pairwise_definition_and_ci_narrows():
    # DeLong's structural components straight from the pair kernel psi (1, 1/2, 0), by brute force.
    y, s = np.asarray(HAND_Y, bool), np.asarray(HAND_S)
    psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / y.sum() + v01.var(ddof=1) / (~y).sum()
    auc, var = M.delong_variance(HAND_Y, HAND_S)
    assert auc == pytest.approx(HAND_AUC) and var == pytest.approx(variance)
    auc, lo, hi = M.auc_confidence_interval(HAND_Y, HAND_S)
    half = 1.959963984540054 * math.sqrt(variance)
    assert (lo, hi) == (pytest.approx(max(auc - half, 0)), pytest.approx(min(auc + half, 1)))
    _, lo90, hi90 = M.auc_confidence_interval(HAND_Y, HAND_S, level=0.90)
    assert lo90 > lo and hi90 <= hi

    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400, 4000):
        labels = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
        scores = rng.normal(labels * 1.0, 1.0)
        auc, lo, hi = M.auc_confidence_interval(labels, scores)
        assert 0 <= lo <= auc <= hi <= 1
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert M.auc_confidence_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="two positives and two negatives"):
        M.auc_confidence_interval([0, 1, 1], [0.1, 0.5, 0.9])


YOUDEN_Y = [0, 0, 0, 1, 1, 1]
YOUDEN_S = [0.1, 0.3, 0.6, 0.4, 0.8, 0.9]
# threshold: 0.9 0.8 0.6 0.4 0.3 0.1  -> sensitivity 1/3 2/3 2/3 1 1 1, 1 - specificity 0 0 1/3 1/3 2/3 1
# J = 1/3, 2/3, 1/3, 2/3, 1/3, 0: maximum 2/3 at 0.8 and 0.4, the higher (fewer false alarms) is chosen.


def test_mean_interval_covers_the_mean_narrows_with_n_and_is_reproducible():
    rng = np.random.default_rng(3)
    small, large = rng.normal(0.96, 0.03, 30), rng.normal(0.96, 0.03, 600)
    mean, low, high = M.mean_interval(small)
    assert low < mean < high and mean == pytest.approx(small.mean())
    # about 1.96 standard errors either side for a roughly normal sample
    assert (high - low) / 2 == pytest.approx(1.96 * small.std(ddof=1) / math.sqrt(small.size), rel=0.2)
    _, low_l, high_l = M.mean_interval(large)
    assert high_l - low_l < (high - low) / 3
    assert M.mean_interval(small) == (mean, low, high)  # seeded: a report is reproducible
    assert M.mean_interval([0.9]) == (0.9, 0.9, 0.9) and M.mean_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        M.mean_interval([])


def test_paired_dice_differences_match_cases_and_say_when_a_change_is_inside_the_noise():
    from train.evaluate_segmenter import paired_differences

    rng = np.random.default_rng(5)
    reference = [{"group": "clean", "file": f"c{i}.png", "dice": float(d)} for i, d in
                 enumerate(rng.uniform(0.93, 0.99, 60))]
    reference += [{"group": "films", "file": f"t{i}.png", "dice": 0.92, "heart_in_mask": 0.9 if i == 1 else 0.2}
                  for i in range(10)]
    noisy = [dict(r, dice=r["dice"] + float(rng.normal(0, 0.01))) for r in reference]
    better = [dict(r, dice=r["dice"] + 0.01) for r in reference]
    out = paired_differences(noisy, reference, ["t1.png", "t2.png", "t3.png"])
    assert set(out) == {"clean", "densest_decile", "clean_heart_excluded", "densest_decile_heart_excluded"}
    assert out["densest_decile"]["n"] == 3
    assert out["densest_decile_heart_excluded"]["n"] == 2  # t1's mask holds the heart shadow
    assert out["clean_heart_excluded"]["n"] == 60
    low, high = out["clean"]["ci95"]
    assert low < 0 < high  # noise only: the interval holds 0
    shifted = paired_differences(better, reference, [])
    assert shifted["clean"]["mean"] == pytest.approx(0.01) and shifted["clean"]["ci95"] == [0.01, 0.01]
    with pytest.raises(ValueError, match="not the same cases"):
        paired_differences(list(reversed(noisy)), reference, [])


def test_binary_metrics_and_thresholds():
    m = M.binary_metrics(YOUDEN_Y, YOUDEN_S, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        assert m[key] == pytest.approx(2 / 3)
    at = M.binary_metrics(YOUDEN_Y, YOUDEN_S, 0.4)  # >= threshold is positive
    assert (at["tp"], at["fp"]) == (3, 1)
    assert math.isnan(M.binary_metrics([0, 0], [0.1, 0.9], 0.5)["sensitivity"])

    assert M.youden_threshold(YOUDEN_Y, YOUDEN_S) == 0.8
    assert M.youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.8]) == 0.35
    assert M.threshold_for_sensitivity(YOUDEN_Y, YOUDEN_S, 1.0) == 0.4
    assert M.threshold_for_sensitivity(YOUDEN_Y, YOUDEN_S, 0.5) == 0.8
    assert M.threshold_for_sensitivity(YOUDEN_Y, YOUDEN_S, 2 / 3) == 0.8
    t = M.threshold_for_sensitivity(HAND_Y, HAND_S, 0.9)
    assert M.binary_metrics(HAND_Y, HAND_S, t)["sensitivity"] >= 0.9
    with pytest.raises(ValueError):
        M.threshold_for_sensitivity(YOUDEN_Y, YOUDEN_S, 0.0)

    summary = M.binary_summary(YOUDEN_Y, YOUDEN_S, 0.5)
    assert summary["confusion"] == [[2, 1], [1, 2]] and summary["n"] == 6
    assert summary["auc"] == pytest.approx(M.roc_auc(YOUDEN_Y, YOUDEN_S)) and len(summary["auc_ci"]) == 2
    lonely = M.binary_summary([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9], 0.5)  # one positive: AUC yes, DeLong no
    assert lonely["auc"] == 1.0 and all(math.isnan(v) for v in lonely["auc_ci"])


def test_confusion_matrix_and_quadratic_weighted_kappa():
    cm = M.confusion_matrix([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert M.confusion_matrix([0, 1], [1, 1], 3).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        M.confusion_matrix([0, 3], [0, 1], 3)

    assert M.quadratic_weighted_kappa([0, 1, 2, 3, 3], [0, 1, 2, 3, 3], 4) == 1.0
    assert M.quadratic_weighted_kappa([0, 1, 2, 3], [3, 2, 1, 0], 4) == pytest.approx(-1.0)
    # By hand: O has off-diagonal (1,2) and (2,1), weight 1/4 each -> sum W*O = 1/2. Marginals 1,1,2 for both
    # raters, E = outer / 4; sum W*E = 2*(1/4)(1/4) + 2*1*(1/2) + 2*(1/4)(1/2) = 11/8. kappa = 1 - (1/2)/(11/8).
    assert M.quadratic_weighted_kappa([0, 1, 2, 2], [0, 2, 2, 1], 3) == pytest.approx(7 / 11)
    assert math.isnan(M.quadratic_weighted_kappa([1, 1], [1, 1], 4))

    probs = np.eye(4)[[0, 1, 2, 3, 2]] * 0.7 + 0.075
    mm = M.multiclass_metrics([0, 1, 2, 3, 3], probs)
    assert mm["accuracy"] == pytest.approx(0.8)
    assert mm["confusion"][3, 2] == 1 and mm["confusion"].trace() == 4
    assert 0 < mm["qwk"] < 1


# --- report --------------------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300, (width, height)
    assert len(data) > min_bytes, f"{path.name} has only {len(data)} bytes"


def test_report_writes_figures_and_tables(tmp_path):
    rng = np.random.default_rng(0)
    labels, groups = synthetic_groups(60)
    y = np.asarray(labels)
    scores = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    per_fold, curves, histories = [], [], []
    for f, (_, val) in enumerate(F.stratified_group_kfold(labels, groups, k=5, seed=0)):
        per_fold.append({"fold": f + 1, **M.binary_summary(y[val], scores[val], 0.5)})
        fpr, tpr, _ = M.roc_curve(y[val], scores[val])
        curves.append((fpr, tpr, f"fold {f + 1}", per_fold[-1]["auc"]))
        histories.append([{"epoch": e + 1, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1) + 0.1,
                           "train_acc": 0.6 + 0.03 * e, "val_acc": 0.55 + 0.025 * e} for e in range(8)])
    threshold = M.youden_threshold(y, scores)
    pooled = M.binary_summary(y, scores, threshold)
    fpr, tpr, _ = M.roc_curve(y, scores)
    curves.append((fpr, tpr, "pooled", pooled["auc"]))

    R.plot_roc(curves, tmp_path / "roc.png")
    R.plot_confusion(pooled["confusion"], ["normal", "tuberculosis"], tmp_path / "confusion.png")
    R.plot_history(histories, tmp_path / "history.png")
    R.plot_history({"epochs": [{"epoch": 1, "train_loss": 0.9, "val_loss": 1.0, "val_score": 0.5},
                               {"epoch": 2, "train_loss": 0.7, "val_loss": 0.8, "val_score": 0.6}]},
                   tmp_path / "history_engine.png")  # train.engine's history.json, no accuracy
    for name in ("roc.png", "confusion.png", "history.png", "history_engine.png"):
        assert_png(tmp_path / name)

    md_path = R.write_report(tmp_path, {"title": "TB vs normal", "k": 5, "threshold_rule": "Youden",
                                        "threshold": threshold, "class_names": ["normal", "tuberculosis"],
                                        "pooled": pooled}, per_fold)
    md = md_path.read_text()
    pooled_row = next(line for line in md.splitlines() if line.startswith("| **pooled** |"))
    assert f"{pooled['accuracy']:.3f}" in pooled_row
    lo, hi = pooled["auc_ci"]
    assert f"{pooled['auc']:.3f} ({lo:.3f}–{hi:.3f})" in pooled_row
    assert f"{pooled['sensitivity']:.3f}" in pooled_row and f"{pooled['specificity']:.3f}" in pooled_row
    assert f"{pooled['tn']} {pooled['fp']} / {pooled['fn']} {pooled['tp']}" in pooled_row
    assert "| Fold | n | Threshold | Accuracy | AUC (95 % CI) | Sensitivity | Specificity | Confusion |" in md
    assert sum(line.startswith("| ") and line[2].isdigit() for line in md.splitlines()) >= 5, "one row per fold"
    assert "| mean ± SD |" in md and "QWK" not in md
    assert f"| normal | {pooled['tn']} | {pooled['fp']} |" in md
    assert "![roc.png](roc.png)" in md and "**threshold_rule**: Youden" in md

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"]["pooled"]["confusion"] == pooled["confusion"]
    assert len(data["per_fold"]) == 5


def test_report_four_classes_has_qwk_and_strict_json(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200) + np.eye(4)[y] * 0.5
    per_fold = [{"fold": f + 1, **M.multiclass_metrics(y[f::2], probs[f::2])} for f in range(2)]
    per_fold[1]["qwk"] = float("nan")  # an undefined kappa must not break the JSON
    pooled = M.multiclass_metrics(y, probs)
    md = R.write_report(tmp_path, {"class_names": ["0", "1", "2", "3"], "pooled": pooled}, per_fold).read_text()
    assert "QWK" in md and f"{pooled['qwk']:.3f}" in md and "n/a" in md
    assert "| true \\ predicted | 0 | 1 | 2 | 3 |" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["per_fold"][1]["qwk"] is None
    R.plot_confusion(pooled["confusion"], ["0", "1", "2", "3"], tmp_path / "confusion4.png")
    assert_png(tmp_path / "confusion4.png")


def test_folding_batch_norms_keeps_the_unet_function():
    """ai.segment runs the U-Net with its batch norms folded into the convolutions: same output, fewer passes."""
    import copy

    import torch

    from ai.unet import UNet

    torch.manual_seed(0)
    net = UNet(base_width=4)
    net.train()
    for _ in range(3):  # non-trivial running statistics
        net(torch.rand(2, 1, 64, 64))
    net.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = net(x)
        fused = copy.deepcopy(net).fuse_for_inference()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert torch.allclose(fused(x), expected, atol=1e-4)
        channels_last = fused.to(memory_format=torch.channels_last)
        assert torch.allclose(channels_last(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4)
    with pytest.raises(RuntimeError, match="eval mode"):
        UNet(base_width=4).fuse_for_inference()


def test_cosine_learning_rate_falls_from_lr_to_its_floor_and_resumes_on_the_same_curve():
    from train.engine import COSINE_FLOOR, FitConfig, epoch_lr

    constant = FitConfig(epochs=5, lr=3e-4)
    assert [epoch_lr(constant, e) for e in range(5)] == [3e-4] * 5
    cosine = FitConfig(epochs=5, lr=3e-4, lr_schedule="cosine")
    rates = [epoch_lr(cosine, e) for e in range(5)]
    assert rates[0] == pytest.approx(3e-4) and rates[-1] == pytest.approx(COSINE_FLOOR * 3e-4)
    assert rates[2] == pytest.approx(3e-4 * (COSINE_FLOOR + (1 - COSINE_FLOOR) / 2))  # half way down
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    # a pure function of the epoch: a run resumed after epoch 3 gets epoch 3's rate again
    assert epoch_lr(FitConfig(epochs=5, lr=3e-4, lr_schedule="cosine"), 3) == rates[3]
    assert epoch_lr(FitConfig(epochs=1, lr=1e-3, lr_schedule="cosine"), 0) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        epoch_lr(FitConfig(lr_schedule="step"), 0)


def test_training_precision_autocasts_as_chosen_and_keeps_float32_weights(tmp_path):
    import torch

    from ai.unet import UNet
    from train.engine import FitConfig, amp_dtype, fit
    from train.losses import batch_dice, dice_bce_loss

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("auto", cpu) is None and amp_dtype("fp32", cpu) is None and amp_dtype("fp32", cuda) is None
    assert amp_dtype("auto", cuda) == torch.float16
    assert amp_dtype("bf16", cpu) == amp_dtype("bf16", cuda) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        amp_dtype("fp8", cpu)

    seen: list[torch.dtype] = []
    model = UNet(base_width=4)
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=generator)
    y = (x > 0.5).float()
    before = [p.detach().clone() for p in model.parameters()]
    history = fit(model, lambda _epoch: [(x, y)], lambda: [(x, y)], dice_bce_loss, batch_dice,
                  FitConfig(epochs=1, lr=1e-3, device="cpu", out_dir=tmp_path, progress=False, precision="bf16"))
    assert seen[0] == torch.bfloat16  # the training pass ran in bfloat16 ...
    assert seen[-1] == torch.float32  # ... the validation in float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it learned
    assert math.isfinite(history.epochs[0]["train_loss"])


def test_an_evaluation_against_its_reference_lists_each_changed_decision_and_category():
    from train.evaluate_classifier import against_reference

    def row(file: str, probability: float, categories: list[float]) -> dict:
        return {"file": file, "probability": probability, "categories": categories}

    reference = {"threshold": 0.5, "binary": {"auc": 0.9}, "rows": [
        row("a", 0.49, [0.6, 0.4, 0, 0]), row("b", 0.8, [0.1, 0.2, 0.45, 0.25]), row("c", 0.1, [0.9, 0.1, 0, 0]),
        {"file": "d", "refused": "lung_area_implausible"}]}
    result = {"threshold": 0.5, "binary": {"auc": 0.91}, "rows": [
        row("a", 0.51, [0.6, 0.4, 0, 0]), row("b", 0.79, [0.1, 0.2, 0.3, 0.4]), row("c", 0.1, [0.9, 0.1, 0, 0]),
        row("d", 0.2, [0.9, 0.1, 0, 0])]}
    out = against_reference(result, reference)
    assert out["images_compared"] == 4
    assert [(c["file"], c["before"], c["now"]) for c in out["decisions_changed"]] == [
        ("a", "absent", "present"), ("d", "refused:lung_area_implausible", "absent")]
    assert out["most_likely_categories_changed"] == [{"file": "b", "before": 2, "now": 3}]
    assert out["max_probability_difference"] == pytest.approx(0.02)
    assert out["auc_difference"] == pytest.approx(0.01)


# --- the segmenter's soft targets ------------------------------------------------------------------------------


def test_a_soft_mask_keeps_the_grey_level_that_the_binary_mask_thresholds(tmp_path):
    from PIL import Image

    from train.datasets import load_mask

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:50, 13:41] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    soft, binary = load_mask(path, 27, soft=True), load_mask(path, 27)
    assert soft.min() >= 0 and soft.max() <= 1
    assert ((soft > 0) & (soft < 1)).any()  # the shrunk edge is partial
    assert np.array_equal(binary, (soft > 127 / 255).astype(np.float32))
    assert np.array_equal(load_mask(path, soft=True), mask / 255)


def test_the_soft_masks_warp_bilinearly_and_binary_masks_stay_binary():
    import torch

    from train.augment import AugmentConfig, geometry

    images = torch.rand(2, 1, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    cfg = AugmentConfig(rotation_deg=8.0, scale=(0.9, 0.9), shift=0.0)
    _, nearest = geometry(images, masks, cfg, torch.Generator().manual_seed(1))
    _, bilinear = geometry(images, masks, cfg, torch.Generator().manual_seed(1), mask_mode="bilinear")
    assert set(nearest.unique().tolist()) <= {0.0, 1.0}
    assert ((bilinear > 0.01) & (bilinear < 0.99)).any()
    assert (bilinear - nearest).abs().mean() < 0.05


def test_lovasz_hinge_is_twice_the_jaccard_loss_at_unit_logits_and_pulls_towards_the_truth():
    """At logits of +/-1 the hinge errors are 0 or 2, so the loss is 2 * (1 - IoU) per image, averaged; a perfect
    confident prediction costs nothing; the gradient raises the logits of missed lung and lowers false ones."""
    import torch

    from train.losses import dice_iou, lovasz_hinge

    gen = torch.Generator().manual_seed(3)
    truth = (torch.rand(4, 1, 24, 24, generator=gen) > 0.5).float()
    guess = (torch.rand(4, 1, 24, 24, generator=gen) > 0.4).float()
    expected = np.mean([2 * (1 - dice_iou(g.numpy() > 0, t.numpy() > 0)[1])
                        for g, t in zip(guess, truth, strict=True)])
    assert lovasz_hinge(2 * guess - 1, truth).item() == pytest.approx(expected, rel=1e-5)
    assert lovasz_hinge(5 * (2 * truth - 1), truth).item() == 0.0
    logits = torch.zeros(4, 1, 24, 24, requires_grad=True)
    lovasz_hinge(logits, truth).backward()
    assert (logits.grad[truth > 0.5] <= 0).all() and (logits.grad[truth < 0.5] >= 0).all()
    assert logits.grad.abs().sum() > 0
