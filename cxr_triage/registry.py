"""The model registry on disk: versioned weights with model cards, named ensembles and a `promoted` pointer.

Layout under `models_dir`:
    versions/<version>/card.json, model.safetensors (and the evaluation report, written by training/)
    ensembles/<name>.json        {"name", "members": [version, ...], "created_at", "note"}
    promoted.json                {"ensemble": name, "promoted_at", "history": [...]}
    shadow.json                  {"ensemble": name or null, "started_at", "history": [...]}: the candidate that runs
                                 on live traffic beside the promoted one, its predictions stored, never used
Pointer updates are atomic (temporary file + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxr_triage.durable import write_durably
from cxr_triage.labels import CLASS_LABELS
from cxr_triage.pixels import NORMALISATIONS, PREPROCESSING_VERSION

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
PROMOTED_FILE = "promoted.json"
SHADOW_FILE = "shadow.json"


class RegistryError(Exception):
    """The registry is missing something or holds something inconsistent (the message says what)."""


class PromotionRefused(RegistryError):
    """A promotion whose ensemble failed its check (it does not load); the pointer did not move."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to `path` atomically and durably, readable by the other service users (0644)."""
    write_durably(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)


@dataclass(frozen=True)
class ModelCard:
    """What a trained model is, what it expects and how it was made; valid once built."""

    version: str
    architecture: str
    device_uid: str
    input_size: int = 224
    classes: tuple[str, ...] = CLASS_LABELS
    preprocessing_version: str = PREPROCESSING_VERSION
    input_normalisation: str = "imagenet"
    border_mask: float = 0.0  # fraction of each edge blanked before the network (cxr_triage.architectures)
    initial_weights: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    not_for_clinical_use: bool = True
    status: str = "candidate"
    data_manifest_sha256: str = ""
    code_revision: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from cxr_triage.uids import is_valid_uid

        if not self.version or "/" in self.version or self.version.startswith("."):
            raise ValueError(f"invalid model version {self.version!r}")
        if not is_valid_uid(self.device_uid):
            raise ValueError(f"device_uid must be a DICOM UID, got {self.device_uid!r}")
        if tuple(self.classes) != CLASS_LABELS:
            raise ValueError(f"model classes {self.classes} differ from {CLASS_LABELS}")
        if self.status not in ("candidate", "promoted", "rejected", "retired"):
            raise ValueError(f"invalid status {self.status!r}")
        if self.input_normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown input normalisation {self.input_normalisation!r}")
        if self.input_size < 32:
            raise ValueError(f"input_size too small: {self.input_size}")

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ModelCard:
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        known["classes"] = tuple(known.get("classes", CLASS_LABELS))
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        return out


@dataclass(frozen=True)
class EnsembleSpec:
    """A named set of model versions and how their probabilities become the triage output.

    `weights` (one per member; empty = equal) and `temperature` feed `cxr_triage.ensembling.combine`;
    `operating_point` holds the STAT/routine thresholds chosen on validation (empty = the settings' defaults);
    `ood` names the out-of-distribution detector ({"member", "file", "threshold", ...}; empty = none);
    `selection` records how the set was chosen and calibrated (free-form, for the card).
    """

    name: str
    members: tuple[str, ...]
    created_at: str = field(default_factory=_now)
    note: str = ""
    weights: tuple[float, ...] = ()
    temperature: float = 1.0
    operating_point: dict[str, float] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    tta: tuple[str, ...] = ()  # test-time augmentation: "hflip" = mean of the image and its mirror image
    selection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"invalid ensemble name {self.name!r}")
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        if self.weights and (len(self.weights) != len(self.members) or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"need one non-negative weight per member, got {self.weights} for {self.members}")
        if set(self.tta) - {"hflip"}:
            raise ValueError(f"unknown test-time augmentation {self.tta}; known: hflip")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.operating_point:
            from cxr_triage.ensembling import OperatingPoint

            OperatingPoint(**self.operating_point)  # validates
        if self.ood and (self.ood.get("member") not in self.members or not self.ood.get("file")):
            raise ValueError(f"ood must name a member and a file, got {self.ood}")

    def operating(self) -> Any:
        """The `OperatingPoint` of this set (defaults when none was chosen)."""
        from cxr_triage.ensembling import OperatingPoint

        return OperatingPoint(**self.operating_point)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["members"], out["weights"], out["tta"] = list(self.members), list(self.weights), list(self.tta)
        return out

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> EnsembleSpec:
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        known["members"] = tuple(known["members"])
        known["weights"] = tuple(known.get("weights", ()))
        known["tta"] = tuple(known.get("tta", ()))
        return cls(**known)


class Registry:
    """Read and write the registry under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- versions ------------------------------------------------------------------------------
    def version_dir(self, version: str) -> Path:
        return self.root / "versions" / version

    def card(self, version: str) -> ModelCard:
        path = self.version_dir(version) / CARD_FILE
        if not path.is_file():
            raise RegistryError(f"model version {version!r} has no card at {path}")
        return ModelCard.from_json(json.loads(path.read_text()))

    def weights(self, version: str) -> Path:
        path = self.version_dir(version) / WEIGHTS_FILE
        if not path.is_file():
            raise RegistryError(f"model version {version!r} has no weights at {path}")
        return path

    def write_card(self, card: ModelCard) -> None:
        write_json_atomic(self.version_dir(card.version) / CARD_FILE, card.to_json())

    def versions(self) -> list[str]:
        base = self.root / "versions"
        return sorted(p.name for p in base.iterdir() if (p / CARD_FILE).is_file()) if base.is_dir() else []

    # --- ensembles -----------------------------------------------------------------------------
    def write_ensemble(self, spec: EnsembleSpec) -> None:
        for member in spec.members:
            self.card(member)
            self.weights(member)
        if spec.ood:
            detector = self.root / "ensembles" / spec.ood["file"]
            if not detector.is_file():
                raise RegistryError(f"ensemble {spec.name}: OOD detector {detector} not found")
        write_json_atomic(self.root / "ensembles" / f"{spec.name}.json", spec.to_json())

    def ensemble(self, name: str) -> EnsembleSpec:
        path = self.root / "ensembles" / f"{name}.json"
        if not path.is_file():
            raise RegistryError(f"no ensemble named {name!r} at {path}")
        return EnsembleSpec.from_json(json.loads(path.read_text()))

    def ood_file(self, spec: EnsembleSpec) -> Path | None:
        """The OOD detector of `spec` (None when it has none)."""
        return self.root / "ensembles" / spec.ood["file"] if spec.ood else None

    def ensembles(self) -> list[str]:
        base = self.root / "ensembles"
        return sorted(p.stem for p in base.glob("*.json")) if base.is_dir() else []

    # --- promotion -----------------------------------------------------------------------------
    def _pointer(self, file: str) -> dict[str, Any]:
        """A pointer file (promoted.json, shadow.json): {"ensemble": name or None, ..., "history": [...]}."""
        path = self.root / file
        return json.loads(path.read_text()) if path.is_file() else {"ensemble": None, "history": []}

    def _pointer_stamp(self, file: str) -> float:
        """Modification time of a pointer file (0 when absent): cheap to poll between tasks."""
        path = self.root / file
        return path.stat().st_mtime_ns / 1e9 if path.is_file() else 0.0

    def _promoted_payload(self) -> dict[str, Any]:
        return self._pointer(PROMOTED_FILE)

    def promoted_name(self) -> str | None:
        name = self._promoted_payload().get("ensemble")
        return str(name) if name else None

    def promoted(self) -> EnsembleSpec | None:
        name = self.promoted_name()
        return self.ensemble(name) if name else None

    def promote(self, name: str, *, reason: str = "", verify: Callable[[EnsembleSpec], object] | None = None) -> None:
        """Point `promoted` at ensemble `name` (which must exist); the previous one stays in the history.

        `verify(spec)`, when given, runs before the pointer moves (the workers' loader, say): if it raises, the
        pointer is left as it was and PromotionRefused says why.
        """
        spec = self.ensemble(name)
        for member in spec.members:
            self.weights(member)
        if verify is not None:
            try:
                verify(spec)
            except Exception as exc:
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                raise PromotionRefused(f"ensemble {name!r} does not load, promotion refused: {detail}") from exc
        payload = self._promoted_payload()
        history = list(payload.get("history", []))
        history.append({"ensemble": name, "promoted_at": _now(), "reason": reason})
        write_json_atomic(self.root / PROMOTED_FILE, {"ensemble": name, "promoted_at": _now(), "history": history})

    def rollback(self) -> str:
        """Re-promote the ensemble promoted before the current one; returns its name."""
        history = list(self._promoted_payload().get("history", []))
        if len(history) < 2:
            raise RegistryError("nothing to roll back to: fewer than two promotions in the history")
        previous = history[-2]["ensemble"]
        self.promote(previous, reason=f"rollback from {history[-1]['ensemble']}")
        return str(previous)

    def rollback_target(self) -> str | None:
        """The ensemble `rollback` would re-promote (the one promoted before the current one), if any."""
        history = [h["ensemble"] for h in self._promoted_payload().get("history", [])]
        current = self.promoted_name()
        earlier = [name for name in history[:-1] if name != current]
        return str(earlier[-1]) if earlier else None

    def prune_weights(self) -> list[str]:
        """Delete the weights of every version outside the promoted ensemble and its rollback target.

        The shadow set's weights are kept too. Cards, reports and split records stay (rejected and retired versions
        remain documented); returns the
        versions whose weights were removed.
        """
        keep: set[str] = set()
        for name in (self.promoted_name(), self.rollback_target(), self.shadow_name()):
            if name:
                keep.update(self.ensemble(name).members)
        removed = []
        for version in self.versions():
            weights = self.version_dir(version) / WEIGHTS_FILE
            if version not in keep and weights.is_file():
                weights.unlink()
                removed.append(version)
        return removed

    def promoted_stamp(self) -> float:
        return self._pointer_stamp(PROMOTED_FILE)

    # --- shadow --------------------------------------------------------------------------------
    def _shadow_payload(self) -> dict[str, Any]:
        return self._pointer(SHADOW_FILE)

    def shadow_name(self) -> str | None:
        """The ensemble running in shadow mode, if any."""
        name = self._shadow_payload().get("ensemble")
        return str(name) if name else None

    def shadow_started_at(self) -> str | None:
        payload = self._shadow_payload()
        return payload.get("started_at") if payload.get("ensemble") else None

    def shadow_history(self) -> list[dict[str, Any]]:
        return list(self._shadow_payload().get("history", []))

    def start_shadow(self, name: str, *, verify: Callable[[EnsembleSpec], object] | None = None) -> None:
        """Run ensemble `name` in shadow mode from now on (replacing any other shadow set).

        Refused for the promoted set (its predictions are already the live ones) and, with `verify`, for a set that
        does not load.
        """
        spec = self.ensemble(name)
        if name == self.promoted_name():
            raise RegistryError(f"ensemble {name!r} is the promoted set; shadow mode is for a candidate")
        for member in spec.members:
            self.weights(member)
        if verify is not None:
            try:
                verify(spec)
            except Exception as exc:
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                raise RegistryError(f"ensemble {name!r} does not load, shadow mode refused: {detail}") from exc
        payload = self._shadow_payload()
        history = self._closed(payload)
        history.append({"ensemble": name, "started_at": _now(), "stopped_at": None})
        write_json_atomic(self.root / SHADOW_FILE, {"ensemble": name, "started_at": _now(), "history": history})

    def stop_shadow(self) -> str | None:
        """End shadow mode; returns the set that was running (None if none was)."""
        payload = self._shadow_payload()
        name = payload.get("ensemble")
        if not name:
            return None
        write_json_atomic(self.root / SHADOW_FILE, {"ensemble": None, "history": self._closed(payload)})
        return str(name)

    @staticmethod
    def _closed(payload: dict[str, Any]) -> list[dict[str, Any]]:
        history = [dict(h) for h in payload.get("history", [])]
        if history and history[-1].get("stopped_at") is None:
            history[-1]["stopped_at"] = _now()
        return history

    def write_shadow_report(self, name: str, report: dict[str, Any]) -> Path:
        """Keep the latest shadow report of set `name` (models/shadow/<name>.json), where the gate reads it."""
        path = self.root / "shadow" / f"{name}.json"
        write_json_atomic(path, {"written_at": _now(), **report})
        return path

    def shadow_report(self, name: str) -> dict[str, Any] | None:
        path = self.root / "shadow" / f"{name}.json"
        return dict(json.loads(path.read_text())) if path.is_file() else None

    def shadow_stamp(self) -> float:
        return self._pointer_stamp(SHADOW_FILE)
