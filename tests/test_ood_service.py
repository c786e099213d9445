"""Out of distribution through the running service: non-chest films and a text page get no confident label.

The shipped, promoted ensemble (models/) runs in a real worker; files arrive by dcmtk storescu. Hip, tibia and dental
films are relabelled CHEST/PA so that they pass the intake policy and reach the model; a secondary capture of a text
page likewise. Four chest films of the locked test split (NIH, wrapped in DICOM) must stay in distribution.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from cxr_triage.registry import Registry
from db.models import Instance, InstanceStatus, Prediction
from db.session import session_scope
from db.worklist_models import PriorityAssignment
from tests.conftest import DICOM_DIR, ROOT, wait_until

pytestmark = pytest.mark.integration

CXR_DIR = ROOT / "tests" / "data" / "cxr"
OOD_FILMS = (
    "cr_hip_mono2_jpeg_lossless_RG2_JPLL.dcm",
    "cr_extremity_mono1_rle_RG3_RLE.dcm",
    "cr_dental_mono1_jpeg_lossless_modality_lut_seq.dcm",
)


def _as_chest_pa(source: Path, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    for keyword in ("StudyDescription", "SeriesDescription"):
        if keyword in ds:
            delattr(ds, keyword)  # the dental film's description names TEETH, which the intake policy catches
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _secondary_capture(pixels: np.ndarray, out: Path, *, description: str) -> Path:
    """An 8-bit MONOCHROME2 Secondary Capture, modality DX, labelled as a chest PA."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "Test^Ood", "OOD-1", "DX", "WSD"
    ds.BodyPartExamined, ds.ViewPosition, ds.ImageComments = "CHEST", "PA", description
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _text_page(out: Path) -> Path:
    page = Image.new("L", (850, 1100), 255)
    draw = ImageDraw.Draw(page)
    for line in range(40):
        draw.text(
            (60, 40 + 25 * line), f"Line {line}: scanned request form, referral letter, consent text " * 2, fill=0
        )
    return _secondary_capture(np.asarray(page), out, description="scanned document")


def test_non_chest_and_text_pages_are_indeterminate_while_chest_films_are_not(
    pg_url, redis_url, service_factory, tmp_path
):
    registry = Registry(Path(os.environ.get("CXR_TEST_MODELS_DIR", ROOT / "models")))
    spec = registry.promoted()
    assert spec is not None and spec.ood, "the shipped ensemble must carry an OOD detector"
    service = service_factory(database_url=pg_url, broker_url=redis_url, models_dir=registry.root)
    service.start_listener()
    service.start_worker()
    ood = [_as_chest_pa(DICOM_DIR / name, tmp_path / f"chest_{name}") for name in OOD_FILMS]
    ood.append(_text_page(tmp_path / "text_page.dcm"))
    chest = [
        _secondary_capture(np.asarray(Image.open(png).convert("L")), tmp_path / f"{png.stem}.dcm", description="NIH")
        for png in sorted(CXR_DIR.glob("*.png"))
    ]
    assert len(chest) == 4
    result = service.storescu(*ood, *chest)
    assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stderr

    def outcome() -> dict[str, tuple[str, str | None, bool | None, float | None]]:
        with session_scope(pg_url) as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.status, PriorityAssignment.rule,
                       Prediction.out_of_distribution, Prediction.ood_score)
                .outerjoin(PriorityAssignment, PriorityAssignment.instance_id == Instance.id)
                .outerjoin(Prediction, Prediction.instance_id == Instance.id)
            ).all()  # fmt: skip
        return {uid: (status, rule, flag, score) for uid, status, rule, flag, score in rows}

    def finished() -> bool:
        rows = outcome()
        return len(rows) == len(ood) + len(chest) and all(r[0] in InstanceStatus.TERMINAL for r in rows.values())

    wait_until(finished, 240, "every instance to be triaged")
    rows = outcome()
    uid = {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (*ood, *chest)}
    for path in (*ood, *chest):  # shown with `pytest -s` (README: the scores against the threshold)
        print(f"ood score {rows[uid[path.name]][3]:9.1f}  {path.name}")
    for path in ood:
        status, rule, flag, score = rows[uid[path.name]]
        assert status == InstanceStatus.DONE, (path.name, status)
        assert flag is True and rule == "indeterminate-out-of-distribution", (path.name, rule, score)
    for path in chest:
        status, rule, flag, score = rows[uid[path.name]]
        assert status == InstanceStatus.DONE and flag is False, (path.name, rule, score)
        assert rule != "indeterminate-out-of-distribution"
    assert '"out_of_distribution": true' in service.log_text()
