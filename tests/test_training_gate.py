"""The promotion gate: accept and reject paths, with reasons, and its record in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_triage.registry import Registry
from tests.conftest import make_tiny_registry
from training.dataset import prepare
from training.fixtures import make_dataset
from training.gate import GateConfig, decide, run_gate

CONFIG = GateConfig(max_auroc_drop=0.02, min_macro_auroc=0.7, min_covid_sensitivity=0.7, max_ece=0.3, n_boot=200)


def _data(n_per_class: int = 30) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(3), n_per_class)
    groups = np.arange(len(y)).astype(str)
    return y, groups


def _probs(y: np.ndarray, confidence: float, seed: int) -> np.ndarray:
    """Predictions that put `confidence` on the true class for most rows, with some noise."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3), size=len(y)) * (1 - confidence)
    probs[np.arange(len(y)), y] += confidence
    normalised: np.ndarray = probs / probs.sum(axis=1, keepdims=True)
    return normalised


def test_first_model_is_promoted_when_it_clears_the_floors() -> None:
    y, groups = _data()
    decision = decide(y, _probs(y, 0.6, 1), None, groups, CONFIG, candidate_name="c", promoted_name=None)
    assert decision.accepted, decision.reasons
    assert all(reason.startswith("pass") for reason in decision.reasons)


def test_first_model_below_the_auroc_floor_is_rejected() -> None:
    y, groups = _data()
    random = np.random.default_rng(3).dirichlet(np.ones(3), size=len(y))
    decision = decide(y, random, None, groups, CONFIG, candidate_name="c", promoted_name=None)
    assert not decision.accepted
    assert decision.reasons[0].startswith("FAIL: first model, macro AUROC")


def test_candidate_clearly_worse_than_the_promoted_model_is_rejected() -> None:
    y, groups = _data()
    promoted, candidate = _probs(y, 0.6, 1), _probs(y, 0.15, 2)
    decision = decide(y, candidate, promoted, groups, CONFIG, candidate_name="new", promoted_name="old")
    assert not decision.accepted
    assert decision.reasons[0].startswith("FAIL: macro AUROC vs old")
    assert decision.metrics["auroc_delta"]["delta_95ci"][1] < 0


def test_candidate_as_good_as_the_promoted_model_is_accepted() -> None:
    y, groups = _data()
    decision = decide(y, _probs(y, 0.6, 5), _probs(y, 0.6, 6), groups, CONFIG, candidate_name="n", promoted_name="o")
    assert decision.accepted, decision.reasons


def test_low_covid_sensitivity_rejects_even_a_good_auroc() -> None:
    y, groups = _data()
    probs = _probs(y, 0.6, 1)
    covid = y == 0
    probs[covid] = probs[covid][:, [1, 0, 2]]  # COVID-19 cases now look like pneumonia
    decision = decide(y, probs, None, groups, CONFIG, candidate_name="c", promoted_name=None)
    assert not decision.accepted
    assert any(r.startswith("FAIL: COVID-19 sensitivity") for r in decision.reasons)


def test_gate_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_ece"):
        GateConfig(max_ece=1.5)


def test_run_gate_records_the_decision_and_leaves_promotion_alone_on_reject(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models", size=32)
    manifest = make_dataset(tmp_path / "data", patients_per_label=4)
    split_csv = tmp_path / "split.csv"
    prepare(manifest, split_csv, seed=0)
    registry.promote("test")
    strict = GateConfig(min_macro_auroc=0.99, min_covid_sensitivity=0.99, max_ece=0.01, n_boot=100)
    from cxr_triage.registry import EnsembleSpec

    registry.write_ensemble(EnsembleSpec(name="candidate", members=("mobilenetv2_100-test",)))
    decision = run_gate(registry.root, "candidate", split_csv, strict, threads=1)
    assert not decision.accepted and decision.promoted_before == "test"
    assert Registry(registry.root).promoted_name() == "test"
    records = [json.loads(line) for line in (registry.root / "gate" / "decisions.jsonl").read_text().splitlines()]
    assert records[-1]["candidate"] == "candidate" and records[-1]["accepted"] is False
    assert records[-1]["reasons"] == decision.reasons
    assert len(pd.read_csv(split_csv)) == 12
