"""How a member network runs: eager PyTorch (as loaded, or in the channels-last layout), or its ONNX export run by
ONNX Runtime or OpenVINO (CPU, full fp32 precision).

All give float32 logits and, for the member the OOD detector reads, its pooled features;
`tests/test_inference_backends.py` checks they agree within a tolerance. Each can also hand back the last feature
map of the pass (`MapsRunner`): Grad-CAM runs only the PyTorch head on it, with gradients. Choose with
`CXR_INFERENCE_BACKEND`; `python -m bench.inference` compares them. ONNX Runtime and OpenVINO take the number of
threads torch has when the runner is made (the worker makes it under CXR_INFERENCE_THREADS).

On CUDA the PyTorch backends are the GPU path: the model in the channels-last layout, bf16 autocast (`autocast="auto"`,
on GPUs with native bf16; the logits are cast back to float32 before any softmax or temperature), inputs staged in
pinned host memory (`to_device`). `autocast="bf16"` runs the same path on the CPU (tests, `bench.inference --autocast
bf16`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from cxr_triage.logs import get_logger

log = get_logger(__name__)

Backend = Literal["eager", "channels-last", "onnx", "openvino"]
Autocast = Literal["auto", "off", "bf16"]  # auto: bf16 on CUDA (autocast_dtype), off (fp32) on the CPU
ONNX_OPSET = 17


class Runner(Protocol):
    """(N, 3, S, S) float batch -> (logits (N, C), pooled features (N, F) when asked for, else None)."""

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class MapsRunner(Runner, Protocol):
    """A runner that can also hand back the last convolutional feature map (N, C, H, W) of the same pass (every
    backend here can): Grad-CAM (workers/heatmap.py) starts from it instead of running the member again."""

    def with_feature_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]: ...


class FeaturesAndLogits(nn.Module):
    """A timm model as one graph with three outputs: the logits, the pooled features before the classifier and the
    last convolutional feature map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = self.model.forward_features(x)
        pooled = self.model.forward_head(maps, pre_logits=True)
        return self.model.get_classifier()(pooled), pooled, maps


def autocast_dtype(autocast: Autocast, device: torch.device) -> torch.dtype | None:
    """The dtype the PyTorch backends autocast to on `device`; None = none (fp32). `auto` is bf16 on a GPU that
    computes it natively (compute capability 8.0 on: A100, L4, H100, H200, ...) and fp32 elsewhere, where bf16 would
    be emulated, slower than fp32."""
    if autocast == "bf16":
        return torch.bfloat16
    if autocast == "auto":
        native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else None
    if autocast == "off":
        return None
    raise ValueError(f"unknown autocast {autocast!r}; known: auto, off, bf16")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op CPU threads, then go back to what the process had (one, in a worker:
    workers/celery_app.py). The members' convolutions scale with threads; the single-image preprocessing does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`batch` on `device`; towards CUDA it is staged in pinned (page-locked) host memory and copied asynchronously
    (the copy is ordered before the kernels that read it on the same stream)."""
    if device.type != "cuda" or batch.device.type != "cpu":
        return batch.to(device)  # CPU to CPU, or already on a GPU: nothing to stage
    return batch.pin_memory().to(device, non_blocking=True)


class EagerRunner:
    """PyTorch; with `channels_last` the model and its input use that layout (oneDNN's faster convolutions on CPU,
    cuDNN's tensor-core ones on CUDA, where it is always used). `autocast`: the forward pass runs under
    `torch.autocast` to that dtype (None: fp32); the outputs are float32 either way."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        features: bool,
        channels_last: bool = False,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.device = device
        self.channels_last = channels_last or device.type == "cuda"
        self.model: Any = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.features = features
        self.autocast = autocast

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, pooled, _ = self.with_feature_maps(batch)
        return logits, pooled

    def with_feature_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """As `__call__`, and also the last convolutional feature map (N, C, H, W) the logits were computed from,
        the input of Grad-CAM (workers/heatmap.py), which then need not run the network a second time. timm's
        forward is forward_features then forward_head: the pass is the model's own, split where the maps are."""
        x = to_device(batch, self.device)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            maps = self.model.forward_features(x)
            pooled = self.model.forward_head(maps, pre_logits=True)
            logits = self.model.get_classifier()(pooled)
        # Out of the autocast region: softmax, temperature and the OOD distance work on float32.
        return logits.float(), pooled.float() if self.features else None, maps


class OnnxRunner:
    """An ONNX Runtime session of the member (CPU), exported once per weights file and kept in `cache_dir`."""

    def __init__(self, model: nn.Module, *, key: str, input_size: int, cache_dir: Path, features: bool) -> None:
        import onnxruntime as ort

        self.features = features
        path = onnx_file(model, key=key, input_size=input_size, cache_dir=cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, pooled = self.session.run(["logits", "pooled"], {"x": batch.cpu().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(pooled) if self.features else None

    def with_feature_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logits, pooled, maps = self.session.run(["logits", "pooled", "maps"], {"x": batch.cpu().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(pooled) if self.features else None, torch.from_numpy(maps)


class OpenVinoRunner:
    """The member's ONNX export compiled by OpenVINO for the CPU, at fp32 (OpenVINO would otherwise pick bf16 on
    CPUs that have it, which moves the logits by up to 0.2)."""

    def __init__(self, model: nn.Module, *, key: str, input_size: int, cache_dir: Path, features: bool) -> None:
        import openvino as ov

        self.features = features
        path = onnx_file(model, key=key, input_size=input_size, cache_dir=cache_dir)
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.request.infer({"x": batch.cpu().numpy()})
        logits = torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        pooled = torch.from_numpy(self.request.get_output_tensor(1).data.copy()) if self.features else None
        return logits, pooled

    def with_feature_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logits, pooled = self(batch)
        return logits, pooled, torch.from_numpy(self.request.get_output_tensor(2).data.copy())


def onnx_file(model: nn.Module, *, key: str, input_size: int, cache_dir: Path) -> Path:
    """The member's ONNX export in `cache_dir`, made on first use."""
    # "-maps": the export with the feature-map output (earlier exports in a cache lack it and are not reused)
    path = cache_dir / f"{key}-maps-opset{ONNX_OPSET}-torch{torch.__version__.split('+')[0]}.onnx"
    if not path.is_file():
        export_onnx(model, input_size, path)
    return path


def export_onnx(model: nn.Module, input_size: int, path: Path) -> None:
    """Trace the member (its input adaptation included) to ONNX with a dynamic batch size; atomic write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    wrapper = FeaturesAndLogits(model).eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            input_names=["x"],
            output_names=["logits", "pooled", "maps"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "pooled": {0: "n"}, "maps": {0: "n"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)
    log.info("backend.onnx_exported", path=str(path))


def weights_key(version: str, weights: Path) -> str:
    """A cache key that changes when the weights file does."""
    with weights.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    return f"{version}-{digest}"


def make_runner(
    backend: Backend,
    model: nn.Module,
    device: torch.device,
    *,
    features: bool,
    key: str | Callable[[], str],
    input_size: int,
    cache_dir: Path,
    autocast: Autocast = "auto",
) -> Runner:
    """`key` names the ONNX export in `cache_dir`; a callable is only called by the backends that export (so that
    eager loading does not hash the weights). `autocast` applies to the PyTorch backends (the exports run fp32)."""
    dtype = autocast_dtype(autocast, device)
    if backend in ("eager", "channels-last"):
        return EagerRunner(model, device, features=features, channels_last=backend == "channels-last", autocast=dtype)
    if backend in ("onnx", "openvino"):
        if device.type != "cpu":
            raise ValueError(f"the {backend} backend runs on the CPU; use eager on CUDA")
        if dtype is not None:
            raise ValueError(f"the {backend} backend runs at fp32; autocast {autocast} is for the PyTorch backends")
        runner = OnnxRunner if backend == "onnx" else OpenVinoRunner
        name = key() if callable(key) else key
        return runner(model, key=name, input_size=input_size, cache_dir=cache_dir, features=features)
    raise ValueError(f"unknown inference backend {backend!r}; known: eager, channels-last, onnx, openvino")
