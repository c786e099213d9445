"""The GPU inference path, checked on the CPU (issue 11): bf16 autocast gives the fp32 triage, `cuda` without a GPU
stops the worker, batches are sized to the device, and `bench.inference` runs the autocast path."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bench import inference as bench
from cxr_triage.architectures import create_model
from cxr_triage.registry import Registry
from cxr_triage.settings import Settings
from tests.conftest import make_tiny_registry
from tests.test_inference_backends import _batch
from workers import ensemble as ensemble_module
from workers.backends import EagerRunner, autocast_dtype, make_runner
from workers.ensemble import DeviceUnavailable, EnsembleProvider, device_batch_size, load_ensemble, pick_device

# bf16 keeps 8 bits of mantissa (about 0.4% per rounding). On these tiny random-weight models the probabilities move by
# about 1e-4; 2e-3 leaves room for other CPUs' kernels. This checks the code path (bf16 convolutions, float32 outputs,
# the same triage), not a trained set's numerics: on the shipped triage-v3, bf16 moves the ensemble's probabilities by
# up to 0.08 (README, GPU inference).
BF16_PROBABILITY_TOLERANCE = 2e-3


def _conv_output_dtypes(model: nn.Module) -> tuple[set[torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    """The dtypes the model's convolutions produce, collected while hooks are in place."""
    seen: set[torch.dtype] = set()
    handles = [
        module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for module in model.modules()
        if isinstance(module, nn.Conv2d)
    ]
    return seen, handles


def test_bf16_autocast_gives_the_fp32_triage_within_tolerance(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models", architectures=("mobilenetv2_100", "resnet18"))
    batch = {64: _batch(64)}
    cpu = torch.device("cpu")
    outputs = {}
    for autocast in ("off", "bf16"):
        ensemble = load_ensemble(registry, "test", cpu, autocast=autocast)
        hooked = [_conv_output_dtypes(m.model) for m in ensemble.members]
        outputs[autocast] = ensemble.predict_batch(batch)
        for seen, handles in hooked:
            assert seen == ({torch.bfloat16} if autocast == "bf16" else {torch.float32}), "the convolutions' dtype"
            for handle in handles:
                handle.remove()
        assert ensemble.precision == ("bf16" if autocast == "bf16" else "fp32")
    for got, want in zip(outputs["bf16"], outputs["off"], strict=True):
        assert got.label == want.label
        for label, p in want.probabilities.items():
            assert abs(got.probabilities[label] - p) < BF16_PROBABILITY_TOLERANCE
        for version, probs in want.member_probabilities.items():
            for label, p in probs.items():
                assert abs(got.member_probabilities[version][label] - p) < BF16_PROBABILITY_TOLERANCE


def test_autocast_runner_hands_back_float32_logits_and_features() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2_100").eval()
    batch = _batch(64)
    with torch.inference_mode():
        want_logits, want_pooled = EagerRunner(model, torch.device("cpu"), features=True)(batch)
        runner = make_runner("eager", model, torch.device("cpu"), features=True, key="m", input_size=64,
                             cache_dir=Path("unused"), autocast="bf16")  # fmt: skip
        logits, pooled = runner(batch)
    assert pooled is not None and want_pooled is not None
    assert logits.dtype == torch.float32 and pooled.dtype == torch.float32  # softmax and OOD work on float32
    want = torch.softmax(want_logits, dim=1).numpy()
    np.testing.assert_allclose(torch.softmax(logits, dim=1).numpy(), want, atol=BF16_PROBABILITY_TOLERANCE)


def test_autocast_auto_is_bf16_on_cuda_and_fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device: (9, 0))  # an H100/H200
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device: (7, 5))  # a T4: bf16 only emulated
    assert autocast_dtype("auto", torch.device("cuda")) is None
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("off", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    runner = EagerRunner(nn.Conv2d(3, 4, 3), torch.device("cuda"), features=False)  # nothing runs: CUDA not needed
    assert runner.channels_last, "on CUDA the PyTorch path is channels-last"
    with pytest.raises(ValueError, match="fp32"):
        make_runner("onnx", nn.Conv2d(3, 4, 3), torch.device("cpu"), features=False, key="m", input_size=64,
                    cache_dir=Path("unused"), autocast="bf16")  # fmt: skip


def test_cuda_requested_without_cuda_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, tiny_registry: Registry
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for requested in ("cuda", "cuda:0"):
        with pytest.raises(DeviceUnavailable, match=f"CXR_DEVICE={requested} but PyTorch sees no CUDA device"):
            pick_device(requested)
    with pytest.raises(DeviceUnavailable):
        EnsembleProvider(tiny_registry, device="cuda", poll_s=0)  # before any task, not at the first one
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        pick_device("gpu")


def test_device_batch_size_takes_what_free_memory_holds_up_to_the_cap() -> None:
    mib = 2**20
    assert device_batch_size(free_bytes=10_000 * mib, image_bytes=100 * mib, cap=1024) == 80  # 80% of 100 images
    assert device_batch_size(free_bytes=10_000 * mib, image_bytes=100 * mib, cap=64) == 64
    assert device_batch_size(free_bytes=50 * mib, image_bytes=100 * mib, cap=64) == 1  # never below one
    assert device_batch_size(free_bytes=0, image_bytes=0, cap=64) == 64  # no measurement: the cap


def test_claim_batch_size_is_the_setting_on_the_cpu_and_memory_bound_on_cuda(
    monkeypatch: pytest.MonkeyPatch, tiny_registry: Registry
) -> None:
    settings = Settings(triage_batch_size=4, cuda_batch_size=64)
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    assert provider.claim_batch_size(settings) == 4
    # The CUDA branch without a GPU: a provider that says cuda, a loaded set's measured cost, the free memory.
    provider.device = torch.device("cuda")
    monkeypatch.setattr(provider, "current", lambda: SimpleNamespace(image_bytes=2**20))
    monkeypatch.setattr(ensemble_module, "free_device_bytes", lambda _device: 40 * 2**20)
    assert provider.claim_batch_size(settings) == 32  # 80% of 40 MiB at 1 MiB an image, under the cap
    monkeypatch.setattr(ensemble_module, "free_device_bytes", lambda _device: 2**40)
    assert provider.claim_batch_size(settings) == 64  # the cap
    monkeypatch.setattr(provider, "current", lambda: None)
    assert provider.claim_batch_size(settings) == 4  # nothing loaded


def test_bench_defaults_follow_the_device() -> None:
    cpu = bench.parse_args(["--device", "cpu"])
    assert (cpu.images, cpu.batch_sizes, cpu.backends) == (
        48,
        [1, 8, 16],
        ["eager", "channels-last", "onnx", "openvino"],
    )
    cuda = bench.parse_args(["--device", "cuda", "--batch-sizes", "1,8,32,128"])
    assert (cuda.images, cuda.batch_sizes, cuda.backends, cuda.autocast) == (1024, [1, 8, 32, 128], ["eager"], "auto")
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-sizes", "8,0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--autocast", "fp16"])


def test_bench_runs_the_autocast_path_on_the_cpu_against_the_fp32_baseline(tmp_path: Path) -> None:
    make_tiny_registry(tmp_path / "models")
    args = bench.parse_args(["--models", str(tmp_path / "models"), "--device", "cpu", "--autocast", "bf16",
                             "--backends", "eager,onnx", "--batch-sizes", "2", "--images", "4", "--rounds", "1",
                             "--threads", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    report = bench.run(args)
    rows = [(r["backend"], r["precision"], r["batch"]) for r in report["rows"]]
    assert rows == [("eager", "fp32", 1), ("eager", "bf16", 2)]  # onnx runs at fp32 only: skipped
    assert report["rows"][0]["ratio_to_eager_batch1"] == 1.0
    assert all(r["images_per_s"] > 0 for r in report["rows"])
    written = json.loads(next((tmp_path / "out").glob("inference-*.json")).read_text())
    assert written["rows"] == report["rows"]


def test_bench_on_cuda_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        bench.run(bench.parse_args(["--device", "cuda", "--models", str(tmp_path), "--out", str(tmp_path)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run where one is lent)")
def test_on_cuda_the_worker_path_gives_the_cpu_triage(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models", architectures=("mobilenetv2_100", "resnet18"))
    batch = {64: _batch(64)}
    want = load_ensemble(registry, "test", torch.device("cpu"), autocast="off").predict_batch(batch)
    gpu = load_ensemble(registry, "test", pick_device("cuda"))
    assert gpu.precision == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp32")
    assert all(p.is_cuda for m in gpu.members for p in m.model.parameters()), "weights moved once, at load"
    assert gpu.image_bytes is not None and gpu.image_bytes > 0, "the memory an image costs, measured at load"
    got = gpu.predict_batch(batch)
    for g, w in zip(got, want, strict=True):
        assert g.label == w.label
        for label, p in w.probabilities.items():
            assert abs(g.probabilities[label] - p) < BF16_PROBABILITY_TOLERANCE
    provider = EnsembleProvider(registry, device="cuda", poll_s=0)
    assert provider.claim_batch_size(Settings(triage_batch_size=1, cuda_batch_size=32)) == 32  # tiny models: the cap
