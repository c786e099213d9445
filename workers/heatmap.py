"""Grad-CAM of the predicted class, blended over the radiograph, as a DICOM Secondary Capture in the same study."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cxr_triage.labels import CLASS_LABELS
from workers.ensemble import Ensemble
from workers.sr import MANUFACTURER, TriageResult, sanitise_copied_attributes, with_type2_defaults

SC_SERIES_NUMBER = 9902
HEATMAP_TEXT = "AI heatmap - not for diagnosis"


def grad_cam(
    ensemble: Ensemble,
    inputs: dict[int, torch.Tensor],
    label: str,
    feature_maps: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """Mean Grad-CAM over the ensemble's members for class `label`, in [0, 1], at the largest input size.

    Uses timm's `forward_features` (last convolutional feature map) and `forward_head`, so it works for every
    CNN of the paper without naming layers. A member whose feature map for this image is in `feature_maps` (kept by
    the inference pass: `Ensemble.predict_batch(keep_feature_maps=True)`) only runs its head here, with gradients.
    """
    target = CLASS_LABELS.index(label)
    size = max(inputs)
    cams = []
    for member in ensemble.members:
        model: Any = member.model
        kept = (feature_maps or {}).get(member.card.version)
        with torch.enable_grad():
            if kept is not None:  # a copy outside inference mode: it may take part in autograd
                features = kept[None].to(ensemble.device).float().clone().requires_grad_(True)
            else:
                batch = inputs[member.card.input_size][:1].to(ensemble.device)
                features = model.forward_features(batch).detach().requires_grad_(True)
            logits = model.forward_head(features)
            grad = torch.autograd.grad(logits[0, target], features)[0]
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * features).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        cam = cam.detach().cpu()
        peak = float(cam.max())
        cams.append(cam / peak if peak > 0 else cam)
    return torch.stack(cams).mean(dim=0).numpy()


def _jet(values: np.ndarray) -> np.ndarray:
    """A small jet colour map (blue - cyan - yellow - red) for values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def render_overlay(grey: np.ndarray, cam: np.ndarray, result: TriageResult, *, size: int = 512) -> np.ndarray:
    """RGB uint8 image: the radiograph, the heatmap blended where it is strong, and burned-in text."""
    base = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    grey_rgb = np.repeat(np.asarray(base, dtype=np.float32)[..., None] / 255.0, 3, axis=-1)
    heat_v = np.asarray(heat, dtype=np.float32) / 255.0
    alpha = 0.45 * heat_v[..., None]
    blended = (1 - alpha) * grey_rgb + alpha * _jet(heat_v)
    image = Image.fromarray((blended * 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, size // 32))
    score = result.probabilities[result.label]
    lines = [HEATMAP_TEXT, f"{result.label}: {score:.2f}"]
    if result.not_for_clinical_use:
        lines.append("Demo model - NOT FOR CLINICAL USE")
    y = 6.0
    for line in lines:
        box = draw.textbbox((6, y), line, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((6, y), line, fill=(255, 255, 0), font=font)
        y = box[3] + 6
    return np.asarray(image, dtype=np.uint8)


def build_heatmap_sc(source: Dataset, rgb: np.ndarray, result: TriageResult) -> hd.sc.SCImage:
    """A Secondary Capture (RGB, burned-in annotation) in the source's study, in a new series."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_type2_defaults(source),
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        series_description=("AI heatmap - NOT FOR CLINICAL USE" if result.not_for_clinical_use else "AI heatmap"),
    )
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C in General Series: a chest is not a paired structure, so empty
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"Grad-CAM of {result.label} by cxr-triage {result.model_set}"[:1024]
    sanitise_copied_attributes(sc)
    return sc
