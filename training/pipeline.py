"""Retraining end to end: locked split -> train each architecture -> evaluate -> gate -> promote (or not)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxr_triage.labels import DEMO_DISCLAIMER
from cxr_triage.registry import EnsembleSpec, Registry
from cxr_triage.settings import Settings
from training.config import check_overrides, setting, settings_values
from training.dataset import LOCKED_SPLIT_FILE, prepare
from training.gate import GateConfig, GateDecision, run_gate


@dataclass(frozen=True)
class RetrainConfig:
    """One retraining run. Architectures, epochs, size and threads default to the CXR_RETRAIN_* settings; the
    bootstrap resamples of the test-split evaluations are the gate's (`gate.n_boot`), so both use one number."""

    manifest: Path
    registry_dir: Path
    work_dir: Path
    architectures: tuple[str, ...] = setting("retrain_architectures", tuple)
    epochs: int = setting("retrain_epochs")
    size: int = setting("retrain_size")
    batch_size: int = 32
    threads: int = setting("retrain_threads")
    lr_find_iters: int = 60
    seed: int = 0
    gate: GateConfig = field(default_factory=GateConfig)
    promote: bool = True

    def __post_init__(self) -> None:
        if not self.architectures:
            raise ValueError("retraining needs at least one architecture")
        if self.epochs < 1 or self.size < 32:
            raise ValueError(f"epochs must be >= 1 and size >= 32, got {self.epochs}, {self.size}")

    @classmethod
    def from_settings(cls, settings: Settings, manifest: str | Path | None = None, **overrides: Any) -> RetrainConfig:
        """The run the settings describe (CXR_RETRAIN_*, CXR_GATE_*, the registry), as the retrain task runs it.

        `manifest` defaults to CXR_RETRAIN_MANIFEST. `overrides` replace fields of the run (an unknown key:
        TypeError); `n_boot` sets the bootstrap resamples of the gate and of the test-split evaluations.
        """
        source = manifest or settings.retrain_manifest
        if not source:
            raise ValueError("no manifest: set CXR_RETRAIN_MANIFEST or pass manifest=")
        check_overrides(cls, overrides, also=("n_boot",))
        values: dict[str, Any] = {
            "registry_dir": settings.models_dir,
            "work_dir": settings.effective_retrain_work_dir,
            **settings_values(cls, settings),
            **overrides,
        }
        gate = values.pop("gate", None) or GateConfig.from_settings(settings)
        if "n_boot" in values:
            gate = replace(gate, n_boot=int(values.pop("n_boot")))
        for name in ("registry_dir", "work_dir"):
            values[name] = Path(values[name])
        values["architectures"] = tuple(values["architectures"])
        for name in ("epochs", "size"):
            values[name] = int(values[name])
        return cls(manifest=Path(source), gate=gate, **values)


def retrain(config: RetrainConfig, *, log: Any = print) -> GateDecision:
    """Run the whole retraining and return the gate's decision (recorded in the registry either way)."""
    from training.evaluate import evaluate
    from training.train import FitConfig, fit

    config.work_dir.mkdir(parents=True, exist_ok=True)
    split_csv = config.work_dir / "split.csv"
    lock = config.registry_dir / LOCKED_SPLIT_FILE
    prepare(config.manifest, split_csv, seed=config.seed, locked=True, lock=lock if lock.is_file() else None)
    log(f"split written to {split_csv}")
    versions = []
    for architecture in config.architectures:
        fit_config = FitConfig(
            architecture=architecture,
            epochs=config.epochs,
            size=config.size,
            batch_size=config.batch_size,
            threads=config.threads,
            lr_find_iters=config.lr_find_iters,
        )
        version = fit(split_csv, config.registry_dir, fit_config, log=log)
        evaluate(
            config.registry_dir, [version], split_csv, split="test", n_boot=config.gate.n_boot, threads=config.threads
        )
        versions.append(version)
        log(f"trained and evaluated {version}")
    registry = Registry(config.registry_dir)
    name = f"retrain-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    registry.write_ensemble(EnsembleSpec(name=name, members=tuple(versions), note=DEMO_DISCLAIMER))
    if len(versions) > 1:
        evaluate(
            config.registry_dir, versions, split_csv, split="test", n_boot=config.gate.n_boot, threads=config.threads
        )
    decision = run_gate(
        config.registry_dir, name, split_csv, config.gate, promote=config.promote, threads=config.threads
    )
    log(f"gate {'ACCEPTED' if decision.accepted else 'REJECTED'} {name}: " + "; ".join(decision.reasons))
    return decision


__all__ = ["RetrainConfig", "retrain"]
