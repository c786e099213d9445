"""The inference backends agree with eager PyTorch: logits, OOD features and the ensemble's output (issue 11)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_triage.architectures import create_model
from cxr_triage.pixels import decode_dicom, normalise, read_dataset
from tests.conftest import DICOM_DIR, make_tiny_registry
from workers.backends import EagerRunner, MapsRunner, OpenVinoRunner, make_runner
from workers.ensemble import EnsembleProvider, load_ensemble
from workers.heatmap import grad_cam

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
        want_maps = model.forward_features(batch)  # type: ignore[operator]
        assert isinstance(runner, MapsRunner)
        map_logits, map_pooled, maps = runner.with_feature_maps(batch)
    assert pooled is not None and want_pooled is not None and map_pooled is not None
    np.testing.assert_allclose(logits.numpy(), want_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled.numpy(), want_pooled.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(single.numpy(), want_logits[:1].numpy(), rtol=1e-4, atol=1e-4)
    # the same pass also hands back the last feature map (Grad-CAM's input), with the same logits
    assert maps.shape == want_maps.shape
    np.testing.assert_allclose(maps.numpy(), want_maps.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(map_logits.numpy(), want_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(map_pooled.numpy(), want_pooled.numpy(), rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_grad_cam_from_an_exported_members_maps_equals_the_pytorch_one(backend: str, tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models", architectures=("mobilenetv2_100", "resnet18"))
    batch = {64: _batch(64)}
    eager = load_ensemble(registry, "test", torch.device("cpu"))
    other = load_ensemble(registry, "test", torch.device("cpu"), backend=backend, cache_dir=tmp_path / "onnx")  # type: ignore[arg-type]
    outputs = other.predict_batch(batch, keep_feature_maps=True)
    assert set(outputs[0].feature_maps) == set(other.versions)
    for i, output in enumerate(outputs):
        one = {64: batch[64][i : i + 1]}
        for label in ("COVID-19", "Pneumonia", "No finding"):
            np.testing.assert_allclose(
                grad_cam(other, one, label, output.feature_maps), grad_cam(eager, one, label), atol=1e-3
            )


def test_the_provider_makes_the_runners_under_its_threads(tmp_path: Path) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores (OpenVINO uses at most the host's)")
    registry = make_tiny_registry(tmp_path / "models")
    before = torch.get_num_threads()
    threads = 1 if before > 1 else 2
    provider = EnsembleProvider(registry, device="cpu", poll_s=0, backend="openvino", cache_dir=tmp_path / "onnx",
                                threads=threads)  # fmt: skip
    ensemble = provider.current()
    assert ensemble is not None and torch.get_num_threads() == before
    runner = ensemble.members[0].runner
    assert isinstance(runner, OpenVinoRunner)
    assert int(runner.compiled.get_property("INFERENCE_NUM_THREADS")) == threads
