"""Dataset adapters (Cohen, COVIDx, manifest, hospital DICOMs) and cross-source deduplication."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from PIL import Image

from tests.conftest import DICOM_DIR
from training.adapters import from_cohen, from_covidx, from_dicom_folder, from_manifest, map_cohen_finding
from training.dataset import assign_splits
from training.dedupe import dedupe
from training.fixtures import make_dataset, write_png


@pytest.mark.parametrize(
    ("finding", "label"),
    [
        ("COVID-19", "COVID-19"),
        ("COVID-19, ARDS", "COVID-19"),
        ("Pneumonia/Viral/COVID-19", "COVID-19"),
        ("Streptococcus", "Pneumonia"),
        ("Pneumonia/Bacterial/Klebsiella", "Pneumonia"),
        ("Pneumocystis", "Pneumonia"),
        ("SARS", "Pneumonia"),
        ("No Finding", "No finding"),
        ("Lipoid", None),
        ("Pneumonia/Aspiration", None),
        ("ARDS", None),
        ("todo", None),
        ("", None),
    ],
)
def test_cohen_findings_map_to_the_three_labels(finding: str, label: str | None) -> None:
    assert map_cohen_finding(finding) == label


def test_cohen_adapter_keeps_frontal_xrays_and_counts_what_it_drops(tmp_path: Path) -> None:
    for i in range(6):
        write_png(tmp_path / "images" / f"{i}.png", seed=i)
    rows = [
        ("1", "COVID-19", "PA", "X-ray", "0.png"),
        ("1", "COVID-19", "L", "X-ray", "1.png"),
        ("2", "Streptococcus", "AP Supine", "X-ray", "2.png"),
        ("3", "No Finding", "AP", "X-ray", "3.png"),
        ("4", "COVID-19", "Axial", "CT", "4.png"),
        ("5", "todo", "PA", "X-ray", "5.png"),
        ("6", "COVID-19", "PA", "X-ray", "missing.png"),
    ]
    meta = pd.DataFrame(rows, columns=["patientid", "finding", "view", "modality", "filename"])
    meta["folder"] = "images"
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    df, dropped = from_cohen(tmp_path / "metadata.csv")
    assert list(df["label"]) == ["COVID-19", "Pneumonia", "No finding"]
    assert list(df["patient_id"]) == ["cohen:1", "cohen:2", "cohen:3"]
    assert dropped == {"lateral view": 1, "modality ct": 1, "finding todo": 1, "missing image file": 1}


def test_covidx_adapter_reads_split_files(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / "train" / name, seed=len(name))
    (tmp_path / "train.txt").write_text(
        "p1 a.png COVID-19 cohen\np2 b.png normal rsna\np3 c.png pneumonia rsna\np4 d.png normal rsna\nbad\n"
    )
    df, dropped = from_covidx(tmp_path / "train.txt", tmp_path / "train")
    assert list(df["label"]) == ["COVID-19", "No finding", "Pneumonia"]
    assert list(df["source"]) == ["covidx-cohen", "covidx-rsna", "covidx-rsna"]
    assert dropped == {"missing image file": 1, "malformed line": 1}


def test_hospital_dicoms_with_confirmed_labels(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("cr_chest_siim_jpeg_baseline_8bit.dcm", "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm"):
        shutil.copy(DICOM_DIR / name, folder / name)
    uid = str(pydicom.dcmread(folder / "cr_chest_siim_jpeg_baseline_8bit.dcm", stop_before_pixels=True).SOPInstanceUID)
    pd.DataFrame([{"sop_instance_uid": uid, "label": "Pneumonia"}]).to_csv(tmp_path / "labels.csv", index=False)
    df, dropped = from_dicom_folder(folder, tmp_path / "labels.csv")
    assert list(df["label"]) == ["Pneumonia"] and df["patient_id"][0].startswith("hospital:")
    ds = pydicom.dcmread(folder / "cr_chest_siim_jpeg_baseline_8bit.dcm", stop_before_pixels=True)
    assert str(ds.PatientID) not in df["patient_id"][0], "patient IDs are hashed, not copied"
    assert dropped == {"no confirmed label": 1}


def test_dedupe_drops_copies_across_sources_and_keeps_near_duplicates_together(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "a", patients_per_label=4)
    df, _ = from_manifest(manifest)
    first = Path(df["path"][0])
    # COVIDx re-distributes the same film: an exact copy, and a re-encoded (slightly brighter) copy.
    shutil.copy(first, tmp_path / "exact.png")
    img = Image.open(first).convert("L").point(lambda v: min(255, v + 3))
    img.save(tmp_path / "reencoded.png")
    extra = pd.DataFrame(
        [
            {**df.iloc[0].to_dict(), "path": str(tmp_path / "exact.png"), "patient_id": "covidx:9", "source": "covidx"},
            {
                **df.iloc[0].to_dict(),
                "path": str(tmp_path / "reencoded.png"),
                "patient_id": "covidx:8",
                "source": "covidx",
            },
        ]
    ).drop(columns=["split_group"])
    merged = pd.concat([df, extra], ignore_index=True).fillna("")
    result = dedupe(merged)
    assert result.counts == {"exact duplicate": 1, "near-exact copy": 1}
    assert len(result.manifest) == len(df)
    assert set(result.dropped["duplicate_of"]) == {str(first)}
    # The kept image's group now carries the other patients' ids too: a split cannot separate them.
    result.manifest["group"] = result.manifest["split_group"]
    split = assign_splits(result.manifest, seed=1)
    assert result.manifest.assign(split=split).groupby("patient_id")["split"].nunique().max() == 1
