"""The ensemble runner: loads the promoted model set once per process, reloads it on a new promotion."""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_triage.architectures import load_member
from cxr_triage.ensembling import OperatingPoint, combine, labels_at
from cxr_triage.labels import CLASS_LABELS
from cxr_triage.logs import get_logger
from cxr_triage.ood import MahalanobisDetector
from cxr_triage.pixels import PREPROCESSING_VERSION
from cxr_triage.registry import EnsembleSpec, ModelCard, Registry
from workers.backends import Backend, EagerRunner, Runner, make_runner, weights_key

log = get_logger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


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
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.name = name
        self.members = members
        self.device = device
        self.spec = spec or EnsembleSpec(name=name, members=tuple(m.card.version for m in members))
        self.detector = detector
        self.ood_member = self.spec.ood.get("member") if detector is not None else None

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
    def predict_batch(self, inputs: dict[int, torch.Tensor]) -> list[EnsembleOutput]:
        """`inputs[size]` is an (N, 3, size, size) batch; returns one output per image.

        Probabilities combine as the spec says (weights, temperature: `cxr_triage.ensembling.combine`); the label
        follows its operating point; the OOD member's pooled features are scored by the detector.
        """
        per_member: dict[str, torch.Tensor] = {}
        scores: torch.Tensor | None = None
        for member in self.members:
            batch = inputs[member.card.input_size].to(self.device)
            model: Any = member.model
            n = batch.shape[0]
            if "hflip" in self.spec.tta:
                batch = torch.cat([batch, batch.flip(-1)])  # image and mirror image in one forward pass
            wants_features = member.card.version == self.ood_member and self.detector is not None
            runner = member.runner or EagerRunner(model, self.device, features=wants_features)
            logits, pooled = runner(batch)
            if wants_features and pooled is not None and self.detector is not None:
                scores = self.detector.score(pooled[:n].float().cpu())  # the image as sent, not its mirror
            member_probs = torch.softmax(logits.float(), dim=1)
            if "hflip" in self.spec.tta:
                member_probs = (member_probs[:n] + member_probs[n:]) / 2
            per_member[member.card.version] = member_probs.cpu()
        stacked = torch.stack(list(per_member.values())).double().numpy()
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
) -> Ensemble:
    """The named set, each member with a runner of `backend` (ONNX exports are cached in `cache_dir`)."""
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
        )
        members.append(Member(card, model, runner))
    ood_file = registry.ood_file(spec)
    detector = MahalanobisDetector.load(ood_file) if ood_file is not None else None
    return Ensemble(name, members, device, spec=spec, detector=detector)


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
    ) -> None:
        self.registry = registry
        self.device = pick_device(device)
        self.poll_s = poll_s
        self.backend: Backend = backend
        self.cache_dir = cache_dir
        self._ensemble: Ensemble | None = None
        self._stamp = -1.0
        self._checked = 0.0
        self._refusal: str | None = None
        self._lock = threading.Lock()

    @property
    def refusal(self) -> str | None:
        """Why the currently promoted set is not the one served (None when it is, or none is promoted)."""
        return self._refusal

    def current(self) -> Ensemble | None:
        with self._lock:
            now = time.monotonic()
            if self._ensemble is not None and now - self._checked < self.poll_s:
                return self._ensemble
            self._checked = now
            stamp = self.registry.promoted_stamp()
            if stamp == self._stamp:
                return self._ensemble
            self._stamp = stamp  # one load attempt (and at most one refusal logged) per pointer change
            name: str | None = None
            started = time.perf_counter()
            try:
                name = self.registry.promoted_name()
                if name is None:
                    self._ensemble, self._refusal = None, None
                    return None
                loaded = load_ensemble(self.registry, name, self.device, backend=self.backend, cache_dir=self.cache_dir)
            except Exception as exc:
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                what = f"promoted set {name!r}" if name is not None else "the promotion pointer"
                self._refusal = f"{what} does not load: {reason}"
                log.error(
                    "ensemble.load_refused",
                    model_set=name,
                    reason=reason,
                    serving=self._ensemble.name if self._ensemble is not None else None,
                )
                return self._ensemble
            self._ensemble, self._refusal = loaded, None
            log.info(
                "ensemble.loaded",
                model_set=name,
                versions=loaded.versions,
                device=str(self.device),
                ms=round((time.perf_counter() - started) * 1000),
            )
            return self._ensemble
