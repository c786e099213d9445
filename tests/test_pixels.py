"""The pixel pipeline on real DICOM files: every syntax we accept, LUTs, MONOCHROME1, clean failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from cxr_triage.pixels import (
    IMAGENET_MEAN,
    PixelDecodeError,
    decode_dicom,
    load_image,
    model_input,
    read_dataset,
    resize_unit,
)
from tests.conftest import DICOM_DIR, NOMETA_CHEST

DECODABLE = sorted(p.name for p in DICOM_DIR.glob("*.dcm") if "JPLY" not in p.name)


@pytest.mark.parametrize("name", DECODABLE)
def test_every_accepted_syntax_decodes_to_a_unit_image(name: str) -> None:
    image = load_image(DICOM_DIR / name, 96)
    assert image.pixels.shape == (96, 96)
    assert image.pixels.dtype == np.float32
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0
    assert float(image.pixels.std()) > 0.05, "a blank image means the window or LUT went wrong"


def test_raw_dataset_without_file_meta_is_read_with_its_detected_encoding() -> None:
    ds = read_dataset(DICOM_DIR / NOMETA_CHEST)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert decode_dicom(ds, 64).source_shape == (440, 440)


def test_monochrome1_is_inverted_so_that_lungs_are_dark() -> None:
    # In a chest PA the lung fields (centre-left and centre-right) are darker than the mediastinum and the
    # borders under collimation; after inversion MONOCHROME1 must look like MONOCHROME2.
    image = load_image(DICOM_DIR / "cr_chest_mono1_j2k_lossy_RG1_J2KI.dcm", 64).pixels
    lungs = float(np.mean([image[20:40, 12:24].mean(), image[20:40, 40:52].mean()]))
    mediastinum = float(image[20:40, 29:35].mean())
    assert lungs < mediastinum


def test_one_film_in_two_lossless_encodings_gives_the_same_input() -> None:
    rle = load_image(DICOM_DIR / "cr_extremity_mono1_rle_RG3_RLE.dcm", 128).pixels
    j2k = load_image(DICOM_DIR / "cr_extremity_mono1_j2k_lossless_RG3_J2KR.dcm", 128).pixels
    np.testing.assert_allclose(rle, j2k, atol=1e-6)  # both lossless: identical pixels


def test_resize_before_window_is_close_to_window_before_resize() -> None:
    """Measures the shortcut documented in decode_dicom: linear window applied after the resize."""
    ds = read_dataset(DICOM_DIR / "cr_extremity_mono1_rle_RG3_RLE.dcm")
    raw = torch.from_numpy(ds.pixel_array.astype(np.float32))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)

    def window(x: torch.Tensor) -> torch.Tensor:
        return ((x - (center - 0.5)) / (width - 1) + 0.5).clamp(0, 1)

    exact = 1.0 - resize_unit(window(raw), 224)
    fast = torch.from_numpy(decode_dicom(ds, 224).pixels)
    diff = (exact - fast).abs()
    # Measured on this 1760x1760 film: mean 0.00002, max 0.0036 (only where the window clips inside a resized
    # pixel), while windowing after the resize took 3 ms instead of 26 ms on one thread.
    assert float(diff.mean()) < 0.001
    assert float(diff.max()) < 0.02


def test_modality_lut_sequence_is_applied() -> None:
    ds = read_dataset(DICOM_DIR / "cr_dental_mono1_jpeg_lossless_modality_lut_seq.dcm")
    assert "ModalityLUTSequence" in ds
    image = decode_dicom(ds, 64).pixels
    assert float(image.std()) > 0.05


def test_undecodable_12bit_jpeg_extended_fails_with_the_syntax_in_the_reason() -> None:
    with pytest.raises(PixelDecodeError, match=r"cannot decode pixel data \(1\.2\.840\.10008\.1\.2\.4\.51\)"):
        load_image(DICOM_DIR / "cr_hip_mono2_jpeg_extended_lossy_RG2_JPLY.dcm", 64)


def test_missing_pixel_data_and_garbage_files_fail_cleanly(tmp_path: Path) -> None:
    ds = read_dataset(DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm")
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="no pixel data"):
        decode_dicom(ds, 64)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(PixelDecodeError):
        load_image(garbage, 64)


def test_model_input_is_three_channel_imagenet_normalised() -> None:
    tensor = model_input(DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm", 64)
    assert tensor.shape == (3, 64, 64)
    black = (0.0 - IMAGENET_MEAN[0]) / 0.229
    assert float(tensor[0].min()) >= black - 1e-5
    torch.testing.assert_close(tensor[1] * 0.224 + 0.456, tensor[0] * 0.229 + 0.485)
