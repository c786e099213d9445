"""The inference backends agree with eager PyTorch: logits, OOD features and the ensemble's output (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_triage.architectures import create_model
from cxr_triage.pixels import decode_dicom, normalise, read_dataset
from tests.conftest import DICOM_DIR, make_tiny_registry
from workers.backends import EagerRunner, make_runner
from workers.ensemble import load_ensemble

SOURCES = ("cr_chest_siim_jpeg_baseline_8bit.dcm", "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm")


def _batch(size: int) -> torch.Tensor:
    return torch.stack([normalise(decode_dicom(read_dataset(DICOM_DIR / f), size).pixels) for f in SOURCES])


@pytest.mark.parametrize("backend", ["channels-last", "onnx", "openvino"])
@pytest.mark.parametrize("architecture", ["mobilenetv2_100", "densenet121"])
def test_a_backend_gives_eager_logits_and_features(backend: str, architecture: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(architecture).eval()
    batch = _batch(64)
    with torch.inference_mode():
        want_logits, want_pooled = EagerRunner(model, torch.device("cpu"), features=True)(batch)
        runner = make_runner(backend, model, torch.device("cpu"), features=True, key=architecture, input_size=64,  # type: ignore[arg-type]
                             cache_dir=tmp_path)  # fmt: skip
        logits, pooled = runner(batch)
        single, _ = runner(batch[:1])  # a dynamic batch size
    assert pooled is not None and want_pooled is not None
    np.testing.assert_allclose(logits.numpy(), want_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled.numpy(), want_pooled.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(single.numpy(), want_logits[:1].numpy(), rtol=1e-4, atol=1e-4)


def test_input_adaptation_and_border_mask_export_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2_100", input_normalisation="inception", border_mask=0.06).eval()
    batch = _batch(64)
    with torch.inference_mode():
        want, _ = EagerRunner(model, torch.device("cpu"), features=False)(batch)
        got, _ = make_runner("onnx", model, torch.device("cpu"), features=False, key="masked", input_size=64,
                             cache_dir=tmp_path)(batch)  # fmt: skip
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_the_ensemble_gives_the_same_triage_on_every_backend(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models", architectures=("mobilenetv2_100", "resnet18"))
    batch = {64: _batch(64)}
    outputs = {
        backend: load_ensemble(
            registry, "test", torch.device("cpu"), backend=backend, cache_dir=tmp_path / "onnx"
        ).predict_batch(batch)  # type: ignore[arg-type]
        for backend in ("eager", "channels-last", "onnx", "openvino")
    }
    for backend in ("channels-last", "onnx", "openvino"):
        for got, want in zip(outputs[backend], outputs["eager"], strict=True):
            assert got.label == want.label
            for label, p in want.probabilities.items():
                assert abs(got.probabilities[label] - p) < 1e-5
    assert list((tmp_path / "onnx").glob("*.onnx")), "the export is cached"
