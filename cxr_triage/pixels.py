"""The pixel pipeline: DICOM or PNG to the model's input tensor; the same code in training and inference.

PyTorch is imported inside the functions that compute with it: the constants and header checks here are part of the
core (the model registry reads them on the listener and API hosts), which installs no torch
(tests/test_lean_roles.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array as decode_pixel_array

if TYPE_CHECKING:
    import torch

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
# The largest frame decoded, in pixel samples (Rows x Columns x SamplesPerPixel), checked on the declared size before
# any decoding (a decompression bomb declares far more than it carries). Decoding and the float conversions take
# about 14 bytes per sample at peak, whatever BitsAllocated is (<= 64): 100 million is about 1.4 GB. A real CR or DX
# frame is 5-20 million. Workers pass `Settings.max_decoded_pixels` (CXR_MAX_DECODED_PIXELS, same default).
DEFAULT_MAX_DECODED_PIXELS = 100_000_000


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
    import torch.nn.functional as F

    out = F.interpolate(image[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0]


def _linear_window(image: torch.Tensor, center: float, width: float) -> torch.Tensor:
    # PS3.3 C.11.2.1.2.1, LINEAR function, scaled to [0, 1].
    width = max(width, 1.0)
    return ((image - (center - 0.5)) / (width - 1.0) + 0.5).clamp(0.0, 1.0)


def _minmax(image: torch.Tensor) -> torch.Tensor:
    import torch

    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return torch.zeros_like(image)
    return (image - lo) / (hi - lo)


def _shown(value: object) -> str:
    """A header value quoted for a reason (short: these are numeric tags, never patient data)."""
    text = str(value)
    return repr(text if len(text) <= 32 else text[:32] + "...")


def _first_value(ds: Dataset, keyword: str) -> object:
    """The element's (first) value; None when absent or empty."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a value pydicom refuses to convert (in its strict reading mode)
        raise PixelDecodeError(f"unreadable {keyword}: {type(exc).__name__}") from exc
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return None
    return value


def _optional_number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a decimal element (DS) as a finite float; None when absent or empty.

    A value that is not a finite number is a PixelDecodeError naming the tag and the value: a header that cannot
    say how to map its pixels gets no triage rather than a triage of a guessed image.
    """
    value = _first_value(ds, keyword)
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PixelDecodeError(f"invalid {keyword} {_shown(value)}: not a number") from None
    if not math.isfinite(number):
        raise PixelDecodeError(f"invalid {keyword} {_shown(value)}: not a finite number")
    return number


def _window(ds: Dataset) -> tuple[float, float] | None:
    """(centre, width) of the first linear window; None when either is absent or empty (then min-max)."""
    center, width = _optional_number(ds, "WindowCenter"), _optional_number(ds, "WindowWidth")
    return (center, width) if center is not None and width is not None else None


def _declared_int(ds: Dataset, keyword: str, default: int | None) -> int:
    """An integer element of the image pixel module; `default` when absent (None: it is required)."""
    value = _first_value(ds, keyword)
    if value is None:
        if default is None:
            raise PixelDecodeError(f"no {keyword} in the data set: the image size is unknown")
        return default
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        raise PixelDecodeError(f"invalid {keyword} {_shown(value)}: not an integer") from None


def check_declared_size(ds: Dataset, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> int:
    """Check Rows, Columns, SamplesPerPixel and NumberOfFrames before decoding; returns the number of frames.

    Only one frame is ever decoded, so the limit is per frame (pixel samples); the reason names the declared size.
    """
    rows, columns = _declared_int(ds, "Rows", None), _declared_int(ds, "Columns", None)
    samples = _declared_int(ds, "SamplesPerPixel", 1)
    frames = _declared_int(ds, "NumberOfFrames", 1)
    bits = _declared_int(ds, "BitsAllocated", 0)
    if rows < 1 or columns < 1:
        raise PixelDecodeError(f"declared image size {rows} x {columns}: Rows and Columns must be at least 1")
    if samples < 1:
        raise PixelDecodeError(f"invalid SamplesPerPixel {samples}: must be at least 1")
    if frames < 1:
        raise PixelDecodeError(f"invalid NumberOfFrames {frames}: must be at least 1")
    per_frame = rows * columns * samples
    if per_frame > max_pixels:
        size = f"{rows} x {columns} x {samples} sample(s) x {bits or '?'} bits"
        if frames > 1:
            size += f" x {frames} frames"
        raise PixelDecodeError(
            f"declared image size {size} is {per_frame:,} pixel samples per frame, over the limit of "
            f"{max_pixels:,} (CXR_MAX_DECODED_PIXELS); not decoded"
        )
    return frames


def read_dataset(path: Path | BinaryIO) -> Dataset:
    """Read a DICOM file or file-like object (with or without file meta / preamble)."""
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


def decode_dicom(ds: Dataset, size: int, *, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> DecodedImage:
    """Decode, apply Modality LUT and VOI (window, or min-max when absent), invert MONOCHROME1, resize.

    Linear transforms (rescale slope/intercept, a linear window) are applied after the resize: exact for the
    rescale, and for the window only the clipping inside a resized pixel differs (measured on a 1760x1760 CR:
    mean |diff| 0.00002, max 0.0036 on [0, 1]; 3 ms instead of 26 ms; tests/test_pixels.py). Table LUTs
    (Modality LUT Sequence, VOI LUT Sequence) are applied on the full-size image.

    Hostile or broken headers end in a PixelDecodeError whose message is the reason, before anything is decoded
    where the header alone tells: a declared frame over `max_pixels` samples (`check_declared_size`), zero or
    missing Rows/Columns, a WindowCenter, WindowWidth, RescaleSlope or RescaleIntercept that is not a finite
    number, a LUT that cannot be applied, and an image that is not finite after them. Fallbacks (unchanged): an
    empty or absent window (or only one of centre and width) means min-max, a RescaleSlope of 0 or absent means 1,
    a WindowWidth below 1 is taken as 1. A multi-frame object decodes its first frame only. PALETTE COLOR pixels
    are palette indices: they go through the palette (then to luminance, like RGB), and without a usable palette
    the reason says so.
    """
    import torch

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PixelDecodeError("no pixel data")
    keyword = next(k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
    if not ds[keyword].value:
        raise PixelDecodeError(f"no pixel data: {keyword} is empty")
    frames = check_declared_size(ds, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        raw = decode_pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PixelDecodeError(f"cannot decode pixel data ({syntax}): {type(exc).__name__}: {exc}") from exc
    if photometric == "PALETTE COLOR":  # the values are indices into the palette, not intensities
        try:
            raw = apply_color_lut(raw, ds)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply the Palette Color LUT: {type(exc).__name__}: {exc}") from exc
    if raw.ndim == 3 and photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        raw = raw[0]  # multi-frame grey-scale: the first frame
    if raw.ndim == 3:  # colour (e.g. a secondary capture): luminance
        raw = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if raw.ndim != 2:
        raise PixelDecodeError(f"unsupported pixel array shape {raw.shape}")
    source_shape = (int(raw.shape[0]), int(raw.shape[1]))

    table_modality = "ModalityLUTSequence" in ds
    table_voi = "VOILUTSequence" in ds
    if table_modality:
        try:
            modality = apply_modality_lut(raw, ds)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply the Modality LUT Sequence: {type(exc).__name__}: {exc}") from exc
        image = torch.from_numpy(np.ascontiguousarray(modality, dtype=np.float32))
    else:
        image = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    if table_voi:
        try:
            voi = apply_voi_lut(image.numpy(), ds)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply the VOI LUT Sequence: {type(exc).__name__}: {exc}") from exc
        image = torch.from_numpy(np.ascontiguousarray(voi, dtype=np.float32))
    image = resize_unit(image, size)
    if not table_modality:
        slope = _optional_number(ds, "RescaleSlope") or 1.0
        intercept = _optional_number(ds, "RescaleIntercept") or 0.0
        if slope != 1.0 or intercept != 0.0:
            image = image * slope + intercept
            if not bool(torch.isfinite(image).all()):  # a float32 overflow, which a window's clamp would hide
                raise PixelDecodeError(
                    f"pixel values are not finite after rescale (RescaleSlope {slope:g}, "
                    f"RescaleIntercept {intercept:g})"
                )
    window = None if table_voi else _window(ds)
    image = _minmax(image) if window is None else _linear_window(image, *window)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    if not bool(torch.isfinite(image).all()):
        raise PixelDecodeError("pixel values are not finite after rescale and LUTs (NaN or infinity)")
    return DecodedImage(pixels=image.numpy().astype(np.float32), source_shape=source_shape, photometric=photometric)


def decode_png(path: Path, size: int) -> DecodedImage:
    """Load an 8- or 16-bit grey-scale (or colour) image file to [0, 1] at size x size."""
    import torch

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float32)
            image = _minmax(torch.from_numpy(arr))
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            image = torch.from_numpy(arr)
    source_shape = (int(image.shape[0]), int(image.shape[1]))
    return DecodedImage(pixels=resize_unit(image, size).numpy(), source_shape=source_shape, photometric="MONOCHROME2")


def load_image(path: Path, size: int, *, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> DecodedImage:
    """DICOM (by content) or an image file, to [0, 1] at size x size."""
    path = Path(path)
    if path.suffix.lower() == ".dcm" or _looks_like_dicom(path):
        return decode_dicom(read_dataset(path), size, max_pixels=max_pixels)
    return decode_png(path, size)


def _looks_like_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def normalise(unit: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] grey (H, W) to the network's (3, H, W) ImageNet-normalised tensor."""
    import torch

    t = torch.as_tensor(unit, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (t[None].expand(3, -1, -1) - mean) / std


def model_input(path: Path, size: int) -> torch.Tensor:
    """The full inference path for one file: (3, size, size) float tensor."""
    return normalise(load_image(path, size).pixels)
