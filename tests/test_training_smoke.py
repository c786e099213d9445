"""A 1-epoch smoke fit of mobilenetv2_100 on tiny images at 32 px, evaluation, ensemble and promotion."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cxr_triage.architectures import create_model, load_state
from cxr_triage.registry import Registry
from training.cli import app
from training.fixtures import make_dataset


def test_demo_pipeline_registers_and_promotes(tmp_path) -> None:
    manifest = make_dataset(tmp_path / "data", patients_per_label=6)
    split_csv = tmp_path / "work" / "split.csv"
    models = tmp_path / "models"
    args = [
        "demo", "--manifest", str(manifest), "--split-csv", str(split_csv), "--arch", "mobilenetv2_100",
        "--epochs", "1", "--size", "32", "--batch", "4", "--threads", "2", "--lr-find-iters", "4",
        "--out", str(models), "--bootstrap", "20",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    registry = Registry(models)
    assert registry.promoted_name() == "demo"
    (version,) = registry.ensemble("demo").members
    assert version.startswith("mobilenetv2_100-")
    card = registry.card(version)
    assert card.architecture == "mobilenetv2_100" and card.input_size == 32 and card.status == "candidate"
    assert card.not_for_clinical_use
    assert len(card.data_manifest_sha256) == 64
    assert card.training["lr"] > 0 and card.training["lr_find_suggestion_valley"] is not None
    assert card.training["epochs"] == 1 and card.training["images_per_split"]["train"] == 12
    assert "test" in card.metrics and card.metrics["test"]["n_images"] == 3
    model = load_state(create_model(card.architecture), registry.weights(version))  # strict load of fp16 weights
    assert next(model.parameters()).dtype.is_floating_point

    report = registry.version_dir(version) / "report"
    for name in ("metrics.json", "report.md", "confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert (report / name).is_file(), name
    assert "NOT FOR CLINICAL USE" in (report / "report.md").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["overall"]["n_images"] == 3
