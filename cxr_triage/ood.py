"""Out-of-distribution detection: Mahalanobis distance of a member's pooled features to the training images.

A radiograph of a hip, a dental film or a photographed text page still gets a softmax over the three classes; its
features, though, lie far from every chest film the model was trained on. The detector is fitted on the training
split's features (`training.ood`), its threshold on the validation split; both are stored with the ensemble.
PyTorch is imported only where the detector computes (`save`): the priority rules import `OOD_REASON` from here on
the API host, which installs no torch (tests/test_lean_roles.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OOD_REASON = "out of distribution"


@dataclass(frozen=True)
class MahalanobisDetector:
    """Score = squared Mahalanobis distance of pooled features to the training mean (shrunk covariance)."""

    mean: torch.Tensor  # (D,)
    precision: torch.Tensor  # (D, D)
    threshold: float

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        if self.mean.ndim != 1 or tuple(self.precision.shape) != (d, d):
            raise ValueError(f"mean {tuple(self.mean.shape)} and precision {tuple(self.precision.shape)} disagree")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled features -> (N,) scores (higher = further from the training images)."""
        diff = features.double() - self.mean.double()
        return ((diff @ self.precision.double()) * diff).sum(dim=1).float()

    def is_out(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    def save(self, path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file(
            {
                "mean": self.mean.float().contiguous(),
                "precision": self.precision.float().contiguous(),
                "threshold": torch.tensor([self.threshold], dtype=torch.float64),
            },
            str(path),
        )
        Path(path).chmod(0o644)

    @classmethod
    def load(cls, path: Path) -> MahalanobisDetector:
        from safetensors.torch import load_file

        state = load_file(str(path))
        return cls(mean=state["mean"], precision=state["precision"], threshold=float(state["threshold"][0]))
