"""The pixel pipeline: DICOM or PNG to the model's input tensor; the same code in training and inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

# Bump whenever the output of this module changes for the same input; model cards record it.
PREPROCESSING_VERSION = "cxr-pixels-1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Input normalisations a model can expect (mean, std per channel of the [0, 1] grey image expanded to 3 channels).
# The pipeline always produces ImageNet-normalised tensors; a model trained with another normalisation converts
# them exactly (`cxr_triage.architectures`), so one decoded input serves every member of an ensemble.
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF style: pixels scaled to [-1, 1]
}


class PixelDecodeError(Exception):
    """The instance's pixels cannot be turned into a model input (the reason is the message)."""


@dataclass(frozen=True)
class DecodedImage:
    """A grey-scale image in [0, 1] (0 = black, as displayed) at the model's input size."""

    pixels: np.ndarray  # float32, shape (size, size)
    source_shape: tuple[int, int]
    photometric: str


def resize_unit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a 2-D float tensor to size x size (the paper squashes, no crop)."""
    if image.shape == (size, size):
        return image
    out = F.interpolate(image[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0]


def _linear_window(image: torch.Tensor, center: float, width: float) -> torch.Tensor:
    # PS3.3 C.11.2.1.2.1, LINEAR function, scaled to [0, 1].
    width = max(width, 1.0)
    return ((image - (center - 0.5)) / (width - 1.0) + 0.5).clamp(0.0, 1.0)


def _minmax(image: torch.Tensor) -> torch.Tensor:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return torch.zeros_like(image)
    return (image - lo) / (hi - lo)


def _first_number(value: object) -> float:
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file (with or without file meta / preamble)."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise PixelDecodeError(f"unreadable DICOM file: {type(exc).__name__}: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # A raw data set without file meta (legacy files): its encoding was detected while reading.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        )
    return ds


def decode_dicom(ds: Dataset, size: int) -> DecodedImage:
    """Decode, apply Modality LUT and VOI (window, or min-max when absent), invert MONOCHROME1, resize.

    Linear transforms (rescale slope/intercept, a linear window) are applied after the resize: exact for the
    rescale, and for the window only the clipping inside a resized pixel differs (measured on a 1760x1760 CR:
    mean |diff| 0.00002, max 0.0036 on [0, 1]; 3 ms instead of 26 ms; tests/test_pixels.py). Table LUTs
    (Modality LUT Sequence, VOI LUT Sequence) are applied on the full-size image.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PixelDecodeError("no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        raw = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PixelDecodeError(f"cannot decode pixel data ({syntax}): {type(exc).__name__}: {exc}") from exc
    if raw.ndim == 3 and photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        raw = raw[0]  # multi-frame grey-scale: the first frame
    if raw.ndim == 3:  # colour (e.g. a secondary capture): luminance
        raw = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if raw.ndim != 2:
        raise PixelDecodeError(f"unsupported pixel array shape {raw.shape}")
    source_shape = (int(raw.shape[0]), int(raw.shape[1]))

    table_modality = "ModalityLUTSequence" in ds
    table_voi = "VOILUTSequence" in ds
    if table_modality:
        image = torch.from_numpy(np.ascontiguousarray(apply_modality_lut(raw, ds), dtype=np.float32))
    else:
        image = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    if table_voi:
        image = torch.from_numpy(np.ascontiguousarray(apply_voi_lut(image.numpy(), ds), dtype=np.float32))
    image = resize_unit(image, size)
    if not table_modality:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0 or intercept != 0.0:
            image = image * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if table_voi:
        image = _minmax(image)
    elif center is not None and width is not None:
        image = _linear_window(image, _first_number(center), _first_number(width))
    else:
        image = _minmax(image)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return DecodedImage(pixels=image.numpy().astype(np.float32), source_shape=source_shape, photometric=photometric)


def decode_png(path: Path, size: int) -> DecodedImage:
    """Load an 8- or 16-bit grey-scale (or colour) image file to [0, 1] at size x size."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float32)
            image = _minmax(torch.from_numpy(arr))
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            image = torch.from_numpy(arr)
    source_shape = (int(image.shape[0]), int(image.shape[1]))
    return DecodedImage(pixels=resize_unit(image, size).numpy(), source_shape=source_shape, photometric="MONOCHROME2")


def load_image(path: Path, size: int) -> DecodedImage:
    """DICOM (by content) or an image file, to [0, 1] at size x size."""
    path = Path(path)
    if path.suffix.lower() == ".dcm" or _looks_like_dicom(path):
        return decode_dicom(read_dataset(path), size)
    return decode_png(path, size)


def _looks_like_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def normalise(unit: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] grey (H, W) to the network's (3, H, W) ImageNet-normalised tensor."""
    t = torch.as_tensor(unit, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (t[None].expand(3, -1, -1) - mean) / std


def model_input(path: Path, size: int) -> torch.Tensor:
    """The full inference path for one file: (3, size, size) float tensor."""
    return normalise(load_image(path, size).pixels)
