"""Run configurations come from Settings in one place: the gate's thresholds, the retraining's parameters and the
bootstrap resamples of both the gate and the test-split evaluations."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cxr_triage.settings import Settings
from training.config import N_BOOT, setting_default
from training.gate import GateConfig, GateDecision
from training.pipeline import RetrainConfig


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(home=tmp_path / "home", models_dir=tmp_path / "models", **values)


def test_defaults_are_the_settings_defaults() -> None:
    gate = GateConfig()
    assert gate.max_auroc_drop == Settings.model_fields["gate_max_auroc_drop"].default
    assert gate.min_macro_auroc == Settings.model_fields["gate_min_macro_auroc"].default
    assert gate.min_covid_sensitivity == Settings.model_fields["gate_min_covid_sensitivity"].default
    assert gate.max_ece == Settings.model_fields["gate_max_ece"].default
    assert gate.n_boot == N_BOOT
    config = RetrainConfig(manifest=Path("m.csv"), registry_dir=Path("models"), work_dir=Path("work"))
    assert config.architectures == tuple(setting_default("retrain_architectures"))
    assert (config.epochs, config.size, config.threads) == (
        setting_default("retrain_epochs"),
        setting_default("retrain_size"),
        setting_default("retrain_threads"),
    )
    assert config.gate == gate


def test_gate_config_from_settings_takes_the_thresholds_and_overrides(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, gate_max_auroc_drop=0.05, gate_min_macro_auroc=0.6, gate_min_covid_sensitivity=0.9, gate_max_ece=0.05
    )
    gate = GateConfig.from_settings(settings, n_boot=200)
    assert (gate.max_auroc_drop, gate.min_macro_auroc, gate.min_covid_sensitivity, gate.max_ece) == (
        0.05,
        0.6,
        0.9,
        0.05,
    )
    assert gate.n_boot == 200
    with pytest.raises(TypeError, match=r"unknown GateConfig setting\(s\) max_auc;"):
        GateConfig.from_settings(settings, max_auc=0.1)


def test_retrain_config_from_settings(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        retrain_architectures=["densenet169", "mobilenetv2_100"],
        retrain_epochs=3,
        retrain_size=64,
        retrain_threads=1,
        gate_max_ece=0.3,
        retrain_manifest=tmp_path / "m.csv",
    )
    config = RetrainConfig.from_settings(settings, epochs="2", batch_size=4, n_boot=150)
    assert config.manifest == tmp_path / "m.csv"
    assert config.registry_dir == tmp_path / "models"
    assert config.work_dir == tmp_path / "home" / "retrain"
    assert config.architectures == ("densenet169", "mobilenetv2_100")
    assert (config.epochs, config.size, config.threads, config.batch_size) == (2, 64, 1, 4)
    assert config.gate == GateConfig.from_settings(settings, n_boot=150)
    assert RetrainConfig.from_settings(settings, "other.csv").manifest == Path("other.csv")


def test_retrain_config_refuses_unknown_overrides_and_a_missing_manifest(tmp_path: Path) -> None:
    settings = _settings(tmp_path, retrain_manifest=tmp_path / "m.csv")
    with pytest.raises(TypeError, match=r"unknown RetrainConfig setting\(s\) epoch;"):
        RetrainConfig.from_settings(settings, epoch=3)
    with pytest.raises(ValueError, match="no manifest"):
        RetrainConfig.from_settings(_settings(tmp_path))


def test_n_boot_reaches_the_evaluations_and_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline with fakes for training, evaluation and the gate: every step gets the settings' values."""
    import training.pipeline as pipeline

    calls: dict[str, list[Any]] = {"fit": [], "evaluate": [], "gate": []}
    fake_train = types.ModuleType("training.train")
    fake_train.FitConfig = lambda **kwargs: kwargs  # type: ignore[attr-defined]

    def fit(split_csv: Path, registry_dir: Path, cfg: dict[str, Any], log: Any = print) -> str:
        calls["fit"].append(cfg)
        return f"{cfg['architecture']}-v1"

    fake_train.fit = fit  # type: ignore[attr-defined]
    fake_evaluate = types.ModuleType("training.evaluate")
    fake_evaluate.evaluate = lambda *args, **kwargs: calls["evaluate"].append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.train", fake_train)
    monkeypatch.setitem(sys.modules, "training.evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline, "prepare", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "Registry", lambda root: types.SimpleNamespace(write_ensemble=lambda spec: None))

    def run_gate(registry_dir: Path, name: str, split_csv: Path, config: GateConfig, **kwargs: Any) -> GateDecision:
        calls["gate"].append(config)
        return GateDecision(candidate=name, promoted_before=None, accepted=True, reasons=[], metrics={}, config={})

    monkeypatch.setattr(pipeline, "run_gate", run_gate)
    settings = _settings(
        tmp_path, retrain_architectures=["a", "b"], retrain_epochs=2, retrain_size=32, gate_max_ece=0.3
    )
    pipeline.retrain(RetrainConfig.from_settings(settings, tmp_path / "m.csv", n_boot=123), log=lambda _: None)
    assert [(c["architecture"], c["epochs"], c["size"]) for c in calls["fit"]] == [("a", 2, 32), ("b", 2, 32)]
    assert [kwargs["n_boot"] for kwargs in calls["evaluate"]] == [123, 123, 123]  # each member, then the ensemble
    assert [(g.n_boot, g.max_ece) for g in calls["gate"]] == [(123, 0.3)]


def test_the_retrain_task_builds_its_run_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.pipeline
    import workers.tasks

    settings = _settings(tmp_path, retrain_manifest=tmp_path / "m.csv", retrain_epochs=4, gate_min_macro_auroc=0.5)
    seen: list[RetrainConfig] = []

    def run(config: RetrainConfig, log: Any = print) -> GateDecision:
        seen.append(config)
        return GateDecision(candidate="c", promoted_before=None, accepted=False, reasons=["r"], metrics={}, config={})

    monkeypatch.setattr(workers.tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(training.pipeline, "retrain", run)
    result = workers.tasks.retrain.run(n_boot=300, size=48)
    assert result["candidate"] == "c" and not result["accepted"]
    assert seen == [RetrainConfig.from_settings(settings, n_boot=300, size=48)]
    assert (seen[0].epochs, seen[0].size, seen[0].gate.n_boot, seen[0].gate.min_macro_auroc) == (4, 48, 300, 0.5)
    with pytest.raises(TypeError, match=r"unknown RetrainConfig setting\(s\) n_bootstrap;"):
        workers.tasks.retrain.run(n_bootstrap=300)
