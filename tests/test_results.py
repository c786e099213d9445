"""The SR and heatmap we write: codes and structure pinned, validated by dciodvfy, readable by dsrdump."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from cxr_triage.pixels import decode_dicom, normalise, read_dataset
from cxr_triage.registry import ModelCard
from tests.conftest import DICOM_DIR, make_tiny_registry
from workers.backends import torch_threads
from workers.ensemble import EnsembleProvider
from workers.heatmap import HEATMAP_TEXT, build_heatmap_sc, grad_cam, render_overlay
from workers.sr import FINDING_CODES, TriageResult, build_sr, ensemble_device_uid

SOURCES = (
    "cr_chest_siim_jpeg_baseline_8bit.dcm",
    "cr_chest_mono1_j2k_lossy_RG1_J2KI.dcm",
    "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm",  # no PatientBirthDate, no BodyPartExamined
    "cr_chest_pa_mono1_implicit_nometa_CR-MONO1-10-chest.dcm",  # raw data set, no file meta
)


def _result(label: str = "Pneumonia") -> TriageResult:
    cards = (
        ModelCard(version="mobilenetv2_100-a", architecture="mobilenetv2_100", device_uid=generate_uid()),
        ModelCard(version="densenet169-b", architecture="densenet169", device_uid=generate_uid()),
    )
    probabilities = {"COVID-19": 0.1, "Pneumonia": 0.7, "No finding": 0.2}
    return TriageResult(
        label=label, probabilities=probabilities, model_set="demo", members=cards, not_for_clinical_use=True
    )


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _walk(items):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


@pytest.mark.parametrize("name", SOURCES)
def test_sr_encodes_the_ai_result_as_ihe_air_asks(name: str, tmp_path: Path) -> None:
    source = read_dataset(DICOM_DIR / name)
    result = _result()
    sr = build_sr(source, result)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    assert _dciodvfy_errors(path) == []
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (
        sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == source.SOPInstanceUID
    )

    items = list(_walk(sr.ContentSequence))
    by_name = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in items}
    assert result.device_uid == by_name["Device Observer UID"].UID
    assert by_name["Procedure reported"].ConceptCodeSequence[0].CodeValue == "399208008"
    finding = by_name["Finding"].ConceptCodeSequence[0]
    assert (finding.CodeValue, finding.CodingSchemeDesignator) == ("233604007", "SCT")
    assert by_name["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    scores = {
        k: float(by_name[k].MeasuredValueSequence[0].NumericValue) for k in by_name if k.startswith("Probability")
    }
    assert scores == {"Probability of COVID-19": 0.1, "Probability of pneumonia": 0.7, "Probability of no finding": 0.2}

    equipment = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
    assert len(equipment) == 1
    purpose = equipment[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert equipment[0].DeviceUID == result.device_uid

    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True).stdout
    assert '"Finding")=(233604007,SCT,"Pneumonia")' in dump
    assert '"Probability of pneumonia")="0.7"' in dump


def test_finding_codes_are_pinned() -> None:
    assert {k: (c.value, c.scheme_designator) for k, c in FINDING_CODES.items()} == {
        "COVID-19": ("840539006", "SCT"),
        "Pneumonia": ("233604007", "SCT"),
        "No finding": ("111286", "DCM"),
    }


def test_device_uid_changes_with_any_retrained_member() -> None:
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    assert ensemble_device_uid([a, b]) == ensemble_device_uid([b, a])
    assert ensemble_device_uid([a, b]) != ensemble_device_uid([a, c])
    assert len(ensemble_device_uid([a, b])) <= 64


def test_triage_result_refuses_invalid_values() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        _result(label="Cancer")


@pytest.mark.parametrize("tta", [(), ("hflip",)])
def test_grad_cam_from_the_kept_feature_maps_equals_running_the_members_again(
    tmp_path: Path, tta: tuple[str, ...]
) -> None:
    registry = make_tiny_registry(tmp_path / "models")
    ensemble = EnsembleProvider(registry, device="cpu").current()
    assert ensemble is not None
    ensemble.spec = dataclasses.replace(ensemble.spec, tta=tta)
    sources = [read_dataset(DICOM_DIR / name) for name in SOURCES[:2]]
    inputs = [{s: normalise(decode_dicom(ds, s).pixels)[None] for s in ensemble.input_sizes} for ds in sources]
    batch = {s: torch.cat([i[s] for i in inputs]) for s in ensemble.input_sizes}
    outputs = ensemble.predict_batch(batch, keep_feature_maps=True)
    assert [set(o.feature_maps) for o in outputs] == [set(ensemble.versions)] * 2
    assert ensemble.predict_batch(batch)[0].feature_maps == {}  # only when asked for
    peaks = []
    for one, output in zip(inputs, outputs, strict=True):
        for label in ("COVID-19", "Pneumonia", "No finding"):
            again = grad_cam(ensemble, one, label)
            kept = grad_cam(ensemble, one, label, output.feature_maps)
            assert kept.shape == again.shape
            np.testing.assert_allclose(kept, again, atol=1e-4)
            peaks.append(float(again.max()))
    assert max(peaks) > 0.0  # (the untrained test member gives some classes no positive evidence: all zero)


def test_torch_threads_sets_and_restores_the_intra_op_threads() -> None:
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_heatmap_secondary_capture_is_valid_and_says_not_for_diagnosis(tmp_path: Path) -> None:
    registry = make_tiny_registry(tmp_path / "models")
    ensemble = EnsembleProvider(registry, device="cpu").current()
    assert ensemble is not None
    source = read_dataset(DICOM_DIR / SOURCES[1])
    inputs = {s: normalise(decode_dicom(source, s).pixels)[None] for s in ensemble.input_sizes}
    result = _result()
    cam = grad_cam(ensemble, inputs, result.label)
    assert cam.shape == (64, 64) and float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0 + 1e-6
    rgb = render_overlay(decode_dicom(source, 512).pixels, cam, result)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    sc = build_heatmap_sc(source, rgb, result)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
    assert "NOT FOR CLINICAL USE" in sc.SeriesDescription
    assert HEATMAP_TEXT == "AI heatmap - not for diagnosis"
    # The burned-in text is there: the top-left banner is black-and-yellow, unlike the radiograph.
    banner = rgb[6:20, 6:200]
    assert (banner[..., 0] > 200).any() and (banner[..., 2] < 50).any()
    from PIL import Image

    artifacts = Path(__file__).parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    Image.fromarray(rgb).save(artifacts / "heatmap.png")


def test_sr_show_prints_the_finding_and_scores_in_plain_words(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    sr = build_sr(read_dataset(DICOM_DIR / SOURCES[0]), _result())
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    shown = CliRunner().invoke(app, ["sr", "show", str(path)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "Finding: Pneumonia" in shown.output
    assert "Probability of pneumonia: 0.7" in shown.output
    assert "NOT FOR CLINICAL USE" in shown.output
    not_sr = CliRunner().invoke(app, ["sr", "show", str(DICOM_DIR / SOURCES[0])], terminal_width=300)
    flat = " ".join(not_sr.output.replace("│", " ").split())
    assert not_sr.exit_code != 0 and "not a Structured Report" in flat, flat
