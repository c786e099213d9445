"""Metric code against hand-computed values on tiny examples."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    bootstrap_ci,
    expected_calibration_error,
    macro_auroc,
    per_class_auroc,
    summarise,
    top_k_accuracy,
)

# Classes: 0 = COVID-19, 1 = Pneumonia, 2 = No finding.
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],  # correct, conf 0.7
        [0.3, 0.6, 0.1],  # wrong (pred 1), true class 2nd -> top-2 hit
        [0.1, 0.8, 0.1],  # correct, conf 0.8
        [0.5, 0.1, 0.4],  # wrong (pred 0), true class 3rd -> top-2 miss
        [0.2, 0.2, 0.6],  # correct, conf 0.6
        [0.1, 0.3, 0.6],  # correct, conf 0.6
    ]
)


def test_accuracy_top2_confusion_prf() -> None:
    m = summarise(Y, P)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert top_k_accuracy(Y, P, 2) == pytest.approx(5 / 6)
    assert m["top2_accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    # COVID-19: predicted for rows 0 and 3 -> precision 1/2; recall 1/2.
    assert m["per_class"]["COVID-19"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["COVID-19"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["No finding"]["f1"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_one_vs_rest_auroc_by_hand() -> None:
    auc = per_class_auroc(Y, P)
    # COVID-19 scores: positives {0.7, 0.3}, negatives {0.1, 0.5, 0.2, 0.1}: pairs won 4 + 3 = 7 of 8.
    assert auc["COVID-19"] == pytest.approx(7 / 8)
    # Pneumonia: positives {0.8, 0.1}, negatives {0.2, 0.6, 0.2, 0.3}: 4 + 0 = 4 of 8.
    assert auc["Pneumonia"] == pytest.approx(4 / 8)
    # No finding: positives {0.6, 0.6}, negatives {0.1, 0.1, 0.1, 0.4}: 8 of 8.
    assert auc["No finding"] == pytest.approx(1.0)
    assert macro_auroc(Y, P) == pytest.approx((7 / 8 + 0.5 + 1.0) / 3)
    # A class absent from the subset has no AUROC, and the macro mean uses the defined ones.
    sub = per_class_auroc(Y[2:], P[2:])
    assert sub["COVID-19"] is None
    assert macro_auroc(Y[2:], P[2:]) == pytest.approx(np.mean([v for v in sub.values() if v is not None]))


def test_ece_by_hand() -> None:
    # Bins (10 wide): 0.7 -> bin 7 (acc 1, conf 0.7); 0.6, 0.6, 0.6 -> bin 6 (wrong, right, right:
    # acc 2/3, conf 0.6); 0.8 -> bin 8 (acc 1); 0.5 -> bin 5 (acc 0).
    expected = (1 / 6) * 0.3 + (3 / 6) * abs(2 / 3 - 0.6) + (1 / 6) * 0.2 + (1 / 6) * 0.5
    assert expected_calibration_error(Y, P) == pytest.approx(expected)
    perfect = np.eye(3)[Y]
    assert expected_calibration_error(Y, perfect) == pytest.approx(0.0)


def test_bootstrap_resamples_groups() -> None:
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    boot = bootstrap_ci(Y, P, groups, n_boot=200, seed=0)
    assert boot["n_groups"] == 3
    lo, hi = boot["accuracy_95ci"]
    # Group accuracies are 1/2, 1/2 and 1, so every resample's accuracy lies in [1/2, 1].
    assert 0.5 - 1e-9 <= lo <= 4 / 6 <= hi <= 1.0
    again = bootstrap_ci(Y, P, groups, n_boot=200, seed=0)
    assert again == boot
    perfect = bootstrap_ci(Y, np.eye(3)[Y], groups, n_boot=50, seed=0)
    assert perfect["accuracy_95ci"] == [1.0, 1.0]


def test_bootstrap_gives_per_class_intervals_around_the_point_estimates() -> None:
    import numpy as np

    from training.metrics import bootstrap_ci, per_class_auroc

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    probs = rng.dirichlet(np.ones(3), size=len(y))
    probs[np.arange(len(y)), y] += 0.8
    probs /= probs.sum(axis=1, keepdims=True)
    boot = bootstrap_ci(y, probs, np.arange(len(y)), n_boot=300, seed=1)
    point_auc = per_class_auroc(y, probs)
    for c, name in enumerate(("COVID-19", "Pneumonia", "No finding")):
        lo, hi = boot["auroc_95ci"][name]
        assert lo <= point_auc[name] <= hi
        recall = float((probs[y == c].argmax(axis=1) == c).mean())
        lo, hi = boot["recall_95ci"][name]
        assert lo <= recall <= hi and hi - lo < 0.5
