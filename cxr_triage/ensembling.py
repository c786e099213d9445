"""How member probabilities become the ensemble's output: weighted mean, temperature, operating point, label.

The same functions serve the workers (one image at a time or in batches) and training (selection, calibration,
evaluation), so what is measured is what runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxr_triage.labels import CLASS_LABELS, COVID19

_EPS = 1e-7


@dataclass(frozen=True)
class OperatingPoint:
    """Thresholds chosen on the validation split; STAT at `stat_threshold`, routine at `routine_threshold`.

    `stat_threshold` also decides the COVID-19 label: an image whose COVID-19 probability reaches it is labelled
    COVID-19 even when another class is more probable (the triage errs towards the urgent finding).
    """

    stat_threshold: float = 0.5
    routine_threshold: float = 0.8

    def __post_init__(self) -> None:
        for name in ("stat_threshold", "routine_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


def combine(member_probs: np.ndarray, weights: Sequence[float] | None = None, temperature: float = 1.0) -> np.ndarray:
    """(M, N, C) member probabilities -> (N, C): weighted mean, then temperature scaling of its log.

    Temperature T > 1 softens over-confident outputs: p_T = softmax(log(p) / T). Weights are normalised.
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"member probabilities must be (members, images, classes), got {probs.shape}")
    w = np.ones(probs.shape[0]) if weights is None or len(weights) == 0 else np.asarray(weights, dtype=np.float64)
    if w.shape != (probs.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per member, got {list(w)} for {probs.shape[0]} members")
    mean = np.tensordot(w / w.sum(), probs, axes=1)
    return apply_temperature(mean, temperature)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return np.asarray(out / out.sum(axis=-1, keepdims=True))


def labels_at(probs: np.ndarray, point: OperatingPoint) -> np.ndarray:
    """Label index per image: COVID-19 when its probability reaches the STAT threshold, else the argmax."""
    probs = np.asarray(probs)
    covid = CLASS_LABELS.index(COVID19)
    out = probs.argmax(axis=-1)
    return np.where(probs[..., covid] >= point.stat_threshold, covid, out)
