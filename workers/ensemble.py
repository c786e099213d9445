"""The ensemble runner: loads the promoted model set once per process, reloads it on a new promotion.

Device (`CXR_DEVICE`): `pick_device`; on CUDA the members run bf16 autocast in channels-last (workers/backends.py) and
a worker's pass is sized to the device (`EnsembleProvider.claim_batch_size`, `device_batch_size`).
"""

from __future__ import annotations

import functools
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cxr_triage.architectures import load_member
from cxr_triage.ensembling import OperatingPoint, combine, labels_at
from cxr_triage.labels import CLASS_LABELS
from cxr_triage.logs import get_logger
from cxr_triage.ood import MahalanobisDetector
from cxr_triage.pixels import PREPROCESSING_VERSION
from cxr_triage.registry import EnsembleSpec, ModelCard, Registry
from cxr_triage.settings import Settings
from workers.backends import (
    Autocast,
    Backend,
    EagerRunner,
    MapsRunner,
    Runner,
    autocast_dtype,
    make_runner,
    to_device,
    torch_threads,
    weights_key,
)

log = get_logger(__name__)

# Share of the device's free memory a worker's pass may take (the rest: fragmentation, other processes, growth).
DEVICE_MEMORY_HEADROOM = 0.8


class DeviceUnavailable(RuntimeError):
    """CXR_DEVICE names a GPU this process cannot use: the worker stops rather than triage on the CPU unnoticed."""


def pick_device(requested: str) -> torch.device:
    """CXR_DEVICE: `auto` = the first CUDA device when PyTorch sees one, else the CPU; `cpu`; `cuda` or `cuda:N`,
    which raise DeviceUnavailable when that device is not there."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"CXR_DEVICE must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"CXR_DEVICE={requested} but PyTorch sees no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): check the driver, the GPU's visibility to this process "
            "(CUDA_VISIBLE_DEVICES, the container runtime) and the PyTorch build, or set CXR_DEVICE=cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"CXR_DEVICE={requested} but PyTorch sees {torch.cuda.device_count()} CUDA device(s) (0-based)"
        )
    return device


def device_batch_size(*, free_bytes: int, image_bytes: int, cap: int) -> int:
    """Instances one pass may hold on a GPU: as many as DEVICE_MEMORY_HEADROOM of `free_bytes` holds at
    `image_bytes` each (the set's measured peak cost per image), at most `cap`, at least 1."""
    if image_bytes <= 0:
        return max(1, cap)
    return max(1, min(cap, int(free_bytes * DEVICE_MEMORY_HEADROOM) // image_bytes))


@dataclass
class Member:
    card: ModelCard
    model: nn.Module  # PyTorch, always (Grad-CAM needs gradients)
    runner: Runner | None = None  # how predictions run (workers/backends.py); None = eager PyTorch


@dataclass(frozen=True)
class EnsembleOutput:
    label: str
    probabilities: dict[str, float]
    member_probabilities: dict[str, dict[str, float]]
    ood_score: float | None = None
    out_of_distribution: bool = False
    # member version -> this image's last convolutional feature map (C, H, W), kept when asked for
    # (`predict_batch(keep_feature_maps=True)`): Grad-CAM starts from it.
    feature_maps: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)


class Ensemble:
    """A loaded model set. `predict` takes one (3, S, S) tensor per input size the members need."""

    def __init__(
        self,
        name: str,
        members: list[Member],
        device: torch.device,
        *,
        spec: EnsembleSpec | None = None,
        detector: MahalanobisDetector | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.name = name
        self.members = members
        self.device = device
        self.spec = spec or EnsembleSpec(name=name, members=tuple(m.card.version for m in members))
        self.detector = detector
        self.ood_member = self.spec.ood.get("member") if detector is not None else None
        self.autocast = autocast  # what the members' PyTorch runners autocast to (None: fp32)
        self.image_bytes: int | None = None  # peak device memory per image in predict_batch (CUDA; measure_image_bytes)

    @property
    def precision(self) -> str:
        """What the members compute in: fp32, or the autocast dtype (bf16)."""
        if self.autocast is None:
            return "fp32"
        return "bf16" if self.autocast == torch.bfloat16 else str(self.autocast).removeprefix("torch.")

    @property
    def operating_point(self) -> OperatingPoint:
        result: OperatingPoint = self.spec.operating()
        return result

    @property
    def versions(self) -> list[str]:
        return [m.card.version for m in self.members]

    @property
    def input_sizes(self) -> set[int]:
        return {m.card.input_size for m in self.members}

    @property
    def not_for_clinical_use(self) -> bool:
        return any(m.card.not_for_clinical_use for m in self.members)

    @torch.inference_mode()
    def predict_batch(
        self, inputs: dict[int, torch.Tensor], *, keep_feature_maps: bool = False
    ) -> list[EnsembleOutput]:
        """`inputs[size]` is an (N, 3, size, size) batch; returns one output per image.

        Probabilities combine as the spec says (weights, temperature: `cxr_triage.ensembling.combine`); the label
        follows its operating point; the OOD member's pooled features are scored by the detector. With
        `keep_feature_maps`, each output keeps the last feature map of every member for its image as
        sent, so that Grad-CAM need not run the members again.
        """
        staged = {size: to_device(batch, self.device) for size, batch in inputs.items()}  # once per size
        member_probs: list[torch.Tensor] = []
        scores: torch.Tensor | None = None
        kept: dict[str, torch.Tensor] = {}
        for member in self.members:
            batch = staged[member.card.input_size]
            model: Any = member.model
            n = batch.shape[0]
            if "hflip" in self.spec.tta:
                batch = torch.cat([batch, batch.flip(-1)])  # image and mirror image in one forward pass
            wants_features = member.card.version == self.ood_member and self.detector is not None
            runner = member.runner or EagerRunner(model, self.device, features=wants_features, autocast=self.autocast)
            if keep_feature_maps and isinstance(runner, MapsRunner):
                logits, pooled, maps = runner.with_feature_maps(batch)
                # the images as sent (the mirrors' maps are let go), in host memory: a large CUDA pass does not
                # hold them on the device while its results are built
                kept[member.card.version] = maps[:n].float().to("cpu", copy=True)
            else:
                logits, pooled = runner(batch)
            if wants_features and pooled is not None and self.detector is not None:
                scores = self.detector.score(pooled[:n].float().cpu())  # the image as sent, not its mirror
            softmax = torch.softmax(logits.float(), dim=1)
            if "hflip" in self.spec.tta:
                softmax = (softmax[:n] + softmax[n:]) / 2
            member_probs.append(softmax)
        stacked_t = torch.stack(member_probs).double().cpu()  # one copy back (and one wait) for the whole pass
        per_member = dict(zip(self.versions, stacked_t, strict=True))
        stacked = stacked_t.numpy()
        combined = combine(stacked, self.spec.weights, self.spec.temperature)
        labels = labels_at(combined, self.operating_point)
        outputs = []
        for i in range(combined.shape[0]):
            probs = {label: float(combined[i, j]) for j, label in enumerate(CLASS_LABELS)}
            members = {
                version: {label: float(p[i, j]) for j, label in enumerate(CLASS_LABELS)}
                for version, p in per_member.items()
            }
            score = float(scores[i]) if scores is not None else None
            outputs.append(
                EnsembleOutput(
                    CLASS_LABELS[int(labels[i])],
                    probs,
                    members,
                    ood_score=score,
                    out_of_distribution=bool(
                        self.detector is not None and score is not None and score > self.detector.threshold
                    ),
                    feature_maps={version: maps[i] for version, maps in kept.items()},
                )
            )
        return outputs


def load_ensemble(
    registry: Registry,
    name: str,
    device: torch.device,
    *,
    backend: Backend = "eager",
    cache_dir: Path | None = None,
    autocast: Autocast = "auto",
) -> Ensemble:
    """The named set, each member with a runner of `backend` (ONNX exports are cached in `cache_dir`), moved to
    `device` once here. `autocast`: see workers/backends.py (auto: bf16 on CUDA, fp32 on the CPU). On CUDA a first
    pass on blank images warms the device up and measures the memory an image costs (`measure_image_bytes`)."""
    spec = registry.ensemble(name)
    ood_member = spec.ood.get("member") if spec.ood else None
    members = []
    for version in spec.members:
        card = registry.card(version)
        if card.preprocessing_version != PREPROCESSING_VERSION:
            raise ValueError(
                f"model {version} expects preprocessing {card.preprocessing_version}, "
                f"this code implements {PREPROCESSING_VERSION}"
            )
        weights = registry.weights(version)
        model = load_member(card, weights).to(device)
        runner = make_runner(
            backend,
            model,
            device,
            features=version == ood_member,
            key=functools.partial(weights_key, version, weights),
            input_size=card.input_size,
            cache_dir=cache_dir or Path(tempfile.gettempdir()) / "cxr-triage-onnx",
            autocast=autocast,
        )
        members.append(Member(card, model, runner))
    ood_file = registry.ood_file(spec)
    detector = MahalanobisDetector.load(ood_file) if ood_file is not None else None
    dtype = autocast_dtype(autocast, device)
    ensemble = Ensemble(name, members, device, spec=spec, detector=detector, autocast=dtype)
    if device.type == "cuda":
        ensemble.image_bytes = measure_image_bytes(ensemble)
    return ensemble


def measure_image_bytes(ensemble: Ensemble, *, probe: int = 8) -> int:
    """Peak CUDA memory per image of one `predict_batch` of `probe` blank images, above what the weights hold
    (activations, test-time augmentation and cuDNN workspace; the fixed part divided by `probe` makes it an
    overestimate, on the safe side)."""
    device = ensemble.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ensemble.predict_batch({size: torch.zeros(probe, 3, size, size) for size in ensemble.input_sizes})
    torch.cuda.synchronize(device)
    return max(1, math.ceil((torch.cuda.max_memory_allocated(device) - before) / probe))


def free_device_bytes(device: torch.device) -> int:
    """Memory a pass can still get on a CUDA device: free on the device, plus what PyTorch's caching allocator holds
    unused."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class EnsembleProvider:
    """Process-wide holder of the promoted ensemble; swaps it between tasks when promotion changes.

    A promoted set that does not load (missing or corrupt weights, a preprocessing mismatch, an unreadable pointer)
    is refused: the provider keeps serving the ensemble it holds, logs `ensemble.load_refused` once per pointer
    change and keeps the reason in `refusal`; it tries again when the pointer changes (re-promote after a fix).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        device: str = "auto",
        poll_s: float = 5.0,
        backend: Backend = "eager",
        cache_dir: Path | None = None,
        autocast: Autocast = "auto",
        pointer: Literal["promoted", "shadow"] = "promoted",
        threads: int | None = None,
    ) -> None:
        self.registry = registry
        self.threads = threads  # torch threads while a set loads (ONNX Runtime and OpenVINO keep them); None: as is
        self.pointer = pointer  # which registry pointer this provider serves: the promoted set, or the shadow set
        self.device = pick_device(device)  # raises now, at start-up, for a GPU that is not there
        self.poll_s = poll_s
        self.backend: Backend = backend
        self.cache_dir = cache_dir
        self.autocast: Autocast = autocast
        self._ensemble: Ensemble | None = None
        self._stamp = -1.0
        self._checked = 0.0
        self._refusal: str | None = None
        self._lock = threading.Lock()

    @property
    def refusal(self) -> str | None:
        """Why the currently promoted set is not the one served (None when it is, or none is promoted)."""
        return self._refusal

    def claim_batch_size(self, settings: Settings) -> int:
        """How many instances a worker triages in one pass: CXR_TRIAGE_BATCH_SIZE on the CPU; on CUDA as many as the
        device's free memory holds at the loaded set's cost per image, at most CXR_CUDA_BATCH_SIZE."""
        if self.device.type != "cuda":
            return settings.triage_batch_size
        ensemble = self.current()
        if ensemble is None or ensemble.image_bytes is None:
            return settings.triage_batch_size  # nothing loaded: nothing to triage with either
        return device_batch_size(
            free_bytes=free_device_bytes(self.device), image_bytes=ensemble.image_bytes, cap=settings.cuda_batch_size
        )

    def current(self) -> Ensemble | None:
        with self._lock:
            now = time.monotonic()
            if self._ensemble is not None and now - self._checked < self.poll_s:
                return self._ensemble
            self._checked = now
            stamp = self.registry.promoted_stamp() if self.pointer == "promoted" else self.registry.shadow_stamp()
            if stamp == self._stamp:
                return self._ensemble
            self._stamp = stamp  # one load attempt (and at most one refusal logged) per pointer change
            name: str | None = None
            started = time.perf_counter()
            try:
                name = self.registry.promoted_name() if self.pointer == "promoted" else self.registry.shadow_name()
                if name is None:
                    self._ensemble, self._refusal = None, None
                    return None
                with torch_threads(self.threads or torch.get_num_threads()):
                    loaded = load_ensemble(
                        self.registry,
                        name,
                        self.device,
                        backend=self.backend,
                        cache_dir=self.cache_dir,
                        autocast=self.autocast,
                    )
            except Exception as exc:
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                what = f"{self.pointer} set {name!r}" if name is not None else f"the {self.pointer} pointer"
                self._refusal = f"{what} does not load: {reason}"
                log.error(
                    "ensemble.load_refused",
                    pointer=self.pointer,
                    model_set=name,
                    reason=reason,
                    serving=self._ensemble.name if self._ensemble is not None else None,
                )
                return self._ensemble
            self._ensemble, self._refusal = loaded, None
            log.info(
                "ensemble.loaded",
                pointer=self.pointer,
                model_set=name,
                versions=loaded.versions,
                device=str(self.device),
                precision=loaded.precision,
                image_bytes=loaded.image_bytes,
                ms=round((time.perf_counter() - started) * 1000),
            )
            return self._ensemble
