"""Classification metrics for the 3-class triage output: AUROC, top-2, per-class PRF, ECE, patient bootstrap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from cxr_triage.labels import CLASS_LABELS
from training.config import N_BOOT

N_CLASSES = len(CLASS_LABELS)


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == y)) if len(y) else float("nan")


def top_k_accuracy(y: np.ndarray, probs: np.ndarray, k: int = 2) -> float:
    """Fraction of rows whose true class is among the k highest probabilities (ties: lower index first)."""
    if not len(y):
        return float("nan")
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean([yi in row for yi, row in zip(y, order, strict=True)]))


def per_class_auroc(y: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """One-vs-rest AUROC per class; None where the class (or its complement) is absent."""
    out: dict[str, float | None] = {}
    for c, name in enumerate(CLASS_LABELS):
        pos = y == c
        out[name] = float(roc_auc_score(pos, probs[:, c])) if 0 < pos.sum() < len(y) else None
    return out


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean of the defined one-vs-rest AUROCs (None if none is defined)."""
    values = [v for v in per_class_auroc(y, probs).values() if v is not None]
    return float(np.mean(values)) if values else None


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-1 confidence over n_bins equal-width bins: sum_b n_b/N * |acc_b - conf_b|."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reliability_bins(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Per-bin count, mean confidence and accuracy (for the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    return [
        {
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "count": int((bins == b).sum()),
            "confidence": float(conf[bins == b].mean()) if (bins == b).any() else float("nan"),
            "accuracy": float(correct[bins == b].mean()) if (bins == b).any() else float("nan"),
        }
        for b in range(n_bins)
    ]


def brier(y: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_c (p_c - 1[y = c])^2."""
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def confusion(y: np.ndarray, probs: np.ndarray) -> list[list[int]]:
    """Confusion matrix, rows = true class, columns = predicted class (CLASS_LABELS order)."""
    cm = np.zeros((N_CLASSES, N_CLASSES), dtype=int)
    for t, p in zip(y, probs.argmax(axis=1), strict=True):
        cm[t, p] += 1
    return cm.tolist()


def group_resamples(groups: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of `n_boot` bootstrap resamples of patient groups (drawn with replacement, all rows of a group)."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


def bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """95 % percentile CIs for accuracy and macro AUROC, resampling groups (patients) with replacement."""
    n_groups = len(np.unique(groups))
    accs: list[float] = []
    aucs: list[float] = []
    class_aucs: dict[str, list[float]] = {name: [] for name in CLASS_LABELS}
    recalls: dict[str, list[float]] = {name: [] for name in CLASS_LABELS}
    for idx in group_resamples(groups, n_boot, seed):
        yb, pb = y[idx], probs[idx]
        accs.append(accuracy(yb, pb))
        for c, name in enumerate(CLASS_LABELS):
            if (yb == c).any():
                recalls[name].append(float((pb[yb == c].argmax(axis=1) == c).mean()))
        if len(np.unique(yb)) == len(np.unique(y)):  # same classes as the full set, so comparable
            auc = macro_auroc(yb, pb)
            if auc is not None:
                aucs.append(auc)
            for name, value in per_class_auroc(yb, pb).items():
                if value is not None:
                    class_aucs[name].append(value)

    def ci(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    return {
        "n_boot": n_boot,
        "unit": "patient group",
        "n_groups": n_groups,
        "accuracy_95ci": ci(accs),
        "macro_auroc_95ci": ci(aucs),
        "macro_auroc_resamples_used": len(aucs),
        "auroc_95ci": {name: ci(values) for name, values in class_aucs.items()},
        "recall_95ci": {name: ci(values) for name, values in recalls.items()},
    }


def summarise(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None, *, n_boot: int = 0, seed: int = 0
) -> dict[str, Any]:
    """All metrics for one set of rows; bootstrap CIs when n_boot > 0 and groups are given."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    prec, rec, f1, support = precision_recall_fscore_support(
        y, probs.argmax(axis=1), labels=list(range(N_CLASSES)), zero_division=0
    )
    predicted = np.bincount(probs.argmax(axis=1), minlength=N_CLASSES) if len(y) else np.zeros(N_CLASSES)
    out: dict[str, Any] = {
        "n_images": len(y),
        "n_groups": len(np.unique(groups)) if groups is not None else None,
        "accuracy": accuracy(y, probs),
        "top2_accuracy": top_k_accuracy(y, probs, 2),
        "macro_auroc": macro_auroc(y, probs),
        "auroc": per_class_auroc(y, probs),
        "per_class": {
            name: {
                # Undefined (None) rather than 0 when the class is never predicted / absent from the rows.
                "precision": float(prec[c]) if predicted[c] else None,
                "recall": float(rec[c]) if support[c] else None,
                "f1": float(f1[c]) if support[c] else None,
                "support": int(support[c]),
            }
            for c, name in enumerate(CLASS_LABELS)
        },
        "macro_f1": float(np.mean(f1[support > 0])) if (support > 0).any() else None,
        "confusion_matrix": confusion(y, probs),
        "ece_10bins": expected_calibration_error(y, probs) if len(y) else None,
        "brier": brier(y, probs) if len(y) else None,
    }
    if n_boot > 0 and groups is not None and len(y):
        out["bootstrap"] = bootstrap_ci(y, probs, np.asarray(groups), n_boot=n_boot, seed=seed)
    return out


def binary_auroc_ci(
    positive: np.ndarray, score: np.ndarray, groups: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """AUROC of `score` for `positive` (bool) with a 95 % patient-group bootstrap CI; None when one class is absent."""

    positive, score, groups = np.asarray(positive, bool), np.asarray(score, float), np.asarray(groups)
    out: dict[str, Any] = {
        "n_images": len(positive),
        "n_positive": int(positive.sum()),
        "auroc": None,
        "auroc_95ci": None,
    }
    if positive.all() or not positive.any():
        return out
    out["auroc"] = float(roc_auc_score(positive, score))
    values: list[float] = []
    for idx in group_resamples(groups, n_boot, seed):
        if 0 < positive[idx].sum() < len(idx):
            values.append(float(roc_auc_score(positive[idx], score[idx])))
    if values:
        out["auroc_95ci"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    out["n_groups"] = len(np.unique(groups))
    return out


def within_source(
    y: np.ndarray, probs: np.ndarray, sources: np.ndarray, groups: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """Shortcut checks: discrimination where the image source cannot give the answer away.

    - `cohen_covid_vs_pneumonia`: Cohen images labelled COVID-19 or Pneumonia (adult web/paper figures from one
      collection), scored by P(COVID-19) / (P(COVID-19) + P(Pneumonia)); AUROC with patient-bootstrap CI.
    - `nih_pneumonia_vs_no_finding`: NIH ChestX-ray14 Pneumonia vs No finding (one hospital's PACS exports).
    - `leave_one_source_out`: pooled macro AUROC with each source's images removed from the evaluated split (an
      evaluation-side view; the models were trained on every source).
    """
    covid, pneu, normal = (CLASS_LABELS.index(c) for c in ("COVID-19", "Pneumonia", "No finding"))
    y, probs, sources, groups = np.asarray(y), np.asarray(probs), np.asarray(sources), np.asarray(groups)
    out: dict[str, Any] = {}
    for key, source, positive, negative in (
        ("cohen_covid_vs_pneumonia", "cohen", covid, pneu),
        ("nih_pneumonia_vs_no_finding", "nih_cxr14", pneu, normal),
    ):
        mask = (sources == source) & np.isin(y, [positive, negative])
        p = probs[mask]
        score = p[:, positive] / np.clip(p[:, positive] + p[:, negative], 1e-12, None)
        out[key] = binary_auroc_ci(y[mask] == positive, score, groups[mask], n_boot=n_boot, seed=seed)
    out["leave_one_source_out"] = {
        str(s): {
            "macro_auroc": macro_auroc(y[sources != s], probs[sources != s]),
            "n_images": int((sources != s).sum()),
        }
        for s in sorted(set(sources.tolist()))
    }
    return out
