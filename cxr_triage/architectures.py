"""The architecture factory: the seed paper's eight CNNs (and any other timm name) with a 3-class head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cxr_triage.labels import CLASS_LABELS
from cxr_triage.pixels import IMAGENET_MEAN, IMAGENET_STD, NORMALISATIONS
from cxr_triage.registry import ModelCard


def create_model(
    architecture: str,
    *,
    num_classes: int = len(CLASS_LABELS),
    pretrained_weights: Path | None = None,
    input_normalisation: str = "imagenet",
    border_mask: float = 0.0,
) -> nn.Module:
    """Build `architecture` with a fresh `num_classes` head, taking the pipeline's ImageNet-normalised input.

    `pretrained_weights` is a local ImageNet checkpoint (timm's state dict, .pth or .safetensors); nothing is
    downloaded. Its classifier is dropped, so the head starts fresh. `input_normalisation` (a key of
    `cxr_triage.pixels.NORMALISATIONS`) is what the weights expect; `border_mask` blanks that fraction of each
    edge (where markers and text sit); see `adapt_input`.
    """
    if architecture not in timm.list_models():
        raise ValueError(f"unknown timm architecture {architecture!r}")
    if pretrained_weights is None:
        model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    else:
        if not Path(pretrained_weights).is_file():
            raise FileNotFoundError(f"pretrained weights not found: {pretrained_weights}")
        model = timm.create_model(
            architecture,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay={"file": str(pretrained_weights)},
        )
    return adapt_input(model, input_normalisation, border_mask=border_mask)


def load_member(card: ModelCard, weights: Path) -> nn.Module:
    """The model a card describes (architecture, input adaptation) with its trained weights, in eval mode."""
    model = create_model(card.architecture, input_normalisation=card.input_normalisation, border_mask=card.border_mask)
    return load_state(model, weights).eval()


def adapt_input(model: nn.Module, normalisation: str, *, border_mask: float = 0.0) -> nn.Module:
    """Make `model` accept the pipeline's ImageNet-normalised input when its weights expect `normalisation`, and
    blank `border_mask` of each edge.

    A forward pre-hook on the first convolution maps x -> x * std_in / std + (mean_in - mean) / std per channel
    (exact, before the convolution pads), then sets the outer band to 0 (the mean grey): it applies to `forward`,
    `forward_features` (Grad-CAM) and training alike, and the state dict is unchanged.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown input normalisation {normalisation!r}; known: {sorted(NORMALISATIONS)}")
    if not 0.0 <= border_mask < 0.5:
        raise ValueError(f"border_mask must be in [0, 0.5), got {border_mask}")
    if normalisation == "imagenet" and border_mask == 0.0:
        return model
    mean, std = NORMALISATIONS[normalisation]
    scale = torch.tensor([a / b for a, b in zip(IMAGENET_STD, std, strict=True)])[None, :, None, None]
    shift = torch.tensor([(a - m) / b for a, m, b in zip(IMAGENET_MEAN, mean, std, strict=True)])[None, :, None, None]
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels != 3:
        raise ValueError("cannot adapt the input: the model's first convolution does not take 3 channels")

    def renormalise(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if normalisation != "imagenet":
            x = x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype)
        if border_mask > 0.0:
            h, w = int(x.shape[-2]), int(x.shape[-1])  # plain ints, also while tracing to ONNX (fixed size)
            dh, dw = round(border_mask * h), round(border_mask * w)
            keep = torch.zeros((h, w), dtype=x.dtype, device=x.device)
            keep[dh : h - dh, dw : w - dw] = 1
            x = x * keep
        return (x, *args[1:])

    first.register_forward_pre_hook(renormalise)
    return model


def load_state(model: nn.Module, weights: Path) -> nn.Module:
    """Load safetensors weights (fp16 or fp32) into `model` as fp32; strict, so a wrong file fails loudly."""
    from safetensors.torch import load_file

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True)
    return model


def save_state(model: nn.Module, weights: Path, *, half: bool = True) -> None:
    """Save `model`'s state dict as safetensors (fp16 by default: half the size, same ranking in practice).

    A tensor that fp16 cannot hold (e.g. a batch-norm running variance above 65504 after a short, small-batch fit) is
    kept in fp32 instead of being saved as infinity; weights that are not finite to begin with are refused.
    """
    from safetensors.torch import save_file

    state = {}
    broken = []
    for key, value in model.state_dict().items():
        tensor = value.detach()
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                broken.append(key)
            elif half:
                halved = tensor.half()
                tensor = halved if bool(torch.isfinite(halved).all()) else tensor.float()
        state[key] = tensor.contiguous().cpu()
    if broken:
        raise ValueError(f"refusing to save non-finite weights ({len(broken)} tensors, e.g. {broken[0]})")
    save_file(state, str(weights))
    Path(weights).chmod(0o644)  # readable by the service user that runs the workers
