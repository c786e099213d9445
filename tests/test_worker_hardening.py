"""Issue 10, items 9 and 10: hostile headers, decompression bombs, multi-frame objects and unloadable promotions end
in a precise reason at once (instance `failed`, promotion refused), never in an escaped exception or a stuck row."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from cxr_triage.pixels import DEFAULT_MAX_DECODED_PIXELS, PixelDecodeError, decode_dicom, read_dataset
from cxr_triage.registry import EnsembleSpec, ModelCard, Registry
from cxr_triage.settings import Settings
from db import repo
from db.migrate import upgrade
from db.models import Instance, InstanceEvent, InstanceStatus, Prediction
from db.session import session_scope
from tests.conftest import DICOM_DIR, NOMETA_CHEST, received_instance
from workers.ensemble import Ensemble, EnsembleProvider
from workers.triage import TRANSIENT_ERRORS, failure_reason, triage_instance

NATIVE = DICOM_DIR / NOMETA_CHEST  # implicit VR little endian, native 440x440, MONOCHROME1, with a window
JPEG = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"  # JPEG baseline 1024x1024, no window


# --- building hostile files from real ones ------------------------------------------------------------------------
def _save(ds: Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=False)
    return path


def _with_raw(src: Path, dest: Path, **raw: bytes) -> Path:
    """`src` with the given elements replaced by raw bytes as a sender wrote them (no validation on our side)."""
    ds = read_dataset(src)
    implicit = ds.original_encoding[0] is not False
    for keyword, value in raw.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        assert tag is not None
        vr = pydicom.datadict.dictionary_VR(tag)
        ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, implicit, True)
    return _save(ds, dest)


def _us(value: int) -> bytes:
    return int(value).to_bytes(2, "little")


def _huge_header_only(dest: Path) -> Path:
    """Declares 60000 x 60000 x 16 bits (7.2 GB decoded) and carries four bytes of pixel data."""
    ds = read_dataset(NATIVE)
    ds.Rows, ds.Columns = 60000, 60000
    ds.PixelData = b"\x00" * 4
    return _save(ds, dest)


def _multiframe_with_a_broken_second_frame(dest: Path) -> Path:
    """The JPEG chest as frame 0 of a two-frame object whose frame 1 is not JPEG at all: only frame 0 may be decoded."""
    ds = read_dataset(JPEG)
    first = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([first, b"\xff\xd8 not a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = 2
    return _save(ds, dest)


# --- the pixel pipeline -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src", "raw", "reason"),
    [
        (NATIVE, {"WindowCenter": b"abc "}, "invalid WindowCenter 'abc': not a number"),
        (NATIVE, {"WindowWidth": b"abc "}, "invalid WindowWidth 'abc': not a number"),
        (NATIVE, {"WindowWidth": b"nan "}, "invalid WindowWidth 'nan': not a finite number"),
        (NATIVE, {"WindowCenter": b"abc\\100 "}, "invalid WindowCenter 'abc': not a number"),
        (NATIVE, {"RescaleSlope": b"abc "}, "invalid RescaleSlope 'abc': not a number"),
        (NATIVE, {"RescaleIntercept": b"1e999 "}, "invalid RescaleIntercept '1e999': not a finite number"),
        (JPEG, {"RescaleSlope": b"inf "}, "invalid RescaleSlope 'inf': not a finite number"),
        (NATIVE, {"Rows": _us(0)}, "declared image size 0 x 440: Rows and Columns must be at least 1"),
        (JPEG, {"Columns": _us(0)}, "declared image size 1024 x 0: Rows and Columns must be at least 1"),
        (NATIVE, {"NumberOfFrames": b"abc "}, "invalid NumberOfFrames 'abc': not an integer"),
        (NATIVE, {"NumberOfFrames": b"0 "}, "invalid NumberOfFrames 0: must be at least 1"),
    ],
)
def test_hostile_header_values_give_a_precise_pixel_decode_error(
    src: Path, raw: dict[str, bytes], reason: str, tmp_path: Path
) -> None:
    ds = read_dataset(_with_raw(src, tmp_path / "bad.dcm", **raw))
    with pytest.raises(PixelDecodeError) as info:
        decode_dicom(ds, 64)
    assert str(info.value) == reason


def test_missing_rows_is_named(tmp_path: Path) -> None:
    ds = read_dataset(NATIVE)
    del ds.Rows
    with pytest.raises(PixelDecodeError, match=r"^no Rows in the data set: the image size is unknown$"):
        decode_dicom(ds, 64)


def test_a_nan_image_is_refused_rather_than_fed_to_the_model() -> None:
    ds = read_dataset(NATIVE)
    ds.RescaleSlope = 1e308  # finite, but the rescaled pixels overflow float32
    ds.WindowCenter, ds.WindowWidth = 1e308, 1e308
    with pytest.raises(PixelDecodeError, match="not finite"):
        decode_dicom(ds, 64)


def test_empty_window_and_zero_slope_keep_their_fallbacks(tmp_path: Path) -> None:
    plain = read_dataset(JPEG)
    ds = read_dataset(_with_raw(JPEG, tmp_path / "empty.dcm", WindowCenter=b"", WindowWidth=b"", RescaleSlope=b"0 "))
    np.testing.assert_array_equal(decode_dicom(ds, 64).pixels, decode_dicom(plain, 64).pixels)


def test_declared_size_is_checked_before_any_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*_: Any, **__: Any) -> None:
        raise AssertionError("the pixel data was decoded")

    monkeypatch.setattr(Dataset, "convert_pixel_data", no_decoding)
    monkeypatch.setattr("cxr_triage.pixels.decode_pixel_array", no_decoding)
    ds = read_dataset(_huge_header_only(tmp_path / "bomb.dcm"))
    with pytest.raises(PixelDecodeError) as info:
        decode_dicom(ds, 64)
    assert str(info.value) == (
        "declared image size 60000 x 60000 x 1 sample(s) x 16 bits is 3,600,000,000 pixel samples per frame, "
        "over the limit of 100,000,000 (CXR_MAX_DECODED_PIXELS); not decoded"
    )


def test_the_limit_is_per_frame_and_configurable() -> None:
    ds = read_dataset(JPEG)  # 1024 x 1024
    assert decode_dicom(ds, 32, max_pixels=1024 * 1024).source_shape == (1024, 1024)
    with pytest.raises(
        PixelDecodeError, match=r"1024 x 1024 x 1 sample\(s\) x 8 bits is 1,048,576 .* limit of 1,000,000"
    ):
        decode_dicom(ds, 32, max_pixels=1_000_000)


def test_multiframe_objects_decode_only_their_first_frame(tmp_path: Path) -> None:
    single = decode_dicom(read_dataset(JPEG), 96)
    multi = decode_dicom(read_dataset(_multiframe_with_a_broken_second_frame(tmp_path / "mf.dcm")), 96)
    np.testing.assert_array_equal(multi.pixels, single.pixels)  # frame 0, bit-identical
    assert multi.source_shape == (1024, 1024)


def test_native_multiframe_grey_first_frame(tmp_path: Path) -> None:
    ds = read_dataset(NATIVE)
    frame = ds.pixel_array
    ds.PixelData = np.stack([frame, frame[::-1], frame[:, ::-1]]).astype(frame.dtype).tobytes()
    ds.NumberOfFrames = 3
    ds = read_dataset(_save(ds, tmp_path / "mf.dcm"))
    np.testing.assert_array_equal(decode_dicom(ds, 64).pixels, decode_dicom(read_dataset(NATIVE), 64).pixels)


def test_setting_default_matches_the_pipeline_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_decoded_pixels == DEFAULT_MAX_DECODED_PIXELS
    monkeypatch.setenv("CXR_MAX_DECODED_PIXELS", "2500")
    assert Settings().max_decoded_pixels == 2500


# --- triage_instance ------------------------------------------------------------------------------------------------
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.sqlite3'}"


def _queued(db_url: str, path: Path, sop: str) -> int:
    upgrade(db_url)
    with session_scope(db_url) as session:
        instance, _ = repo.record_received(
            session,
            received_instance(
                sop, path, transfer_syntax_uid="1.2.840.10008.1.2", patient_name="Doe^Jane", patient_id="PID-123"
            ),
        )
        repo.mark_queued(session, instance.id)
        return instance.id


def _row(db_url: str, instance_id: int) -> tuple[str, str | None, int]:
    with session_scope(db_url) as session:
        row = session.get(Instance, instance_id)
        assert row is not None
        predictions = len(session.scalars(select(Prediction).where(Prediction.instance_id == instance_id)).all())
        return row.status, row.status_reason, predictions


def _settings(db_url: str, tmp_path: Path, registry: Registry, **extra: Any) -> Settings:
    return Settings(home=tmp_path / "var", database_url=db_url, models_dir=registry.root, **extra)


def test_a_window_centre_abc_ends_failed_at_once_with_its_reason(
    db_url: str, tmp_path: Path, tiny_registry: Registry
) -> None:
    path = _with_raw(NATIVE, tmp_path / "abc.dcm", WindowCenter=b"abc ")
    instance_id = _queued(db_url, path, "1.2.3.4.5.100")
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    outcome = triage_instance(_settings(db_url, tmp_path, tiny_registry), instance_id, provider)
    assert outcome.status == InstanceStatus.FAILED
    assert _row(db_url, instance_id) == (InstanceStatus.FAILED, "invalid WindowCenter 'abc': not a number", 0)
    with session_scope(db_url) as session:
        history = [e.status for e in session.scalars(select(InstanceEvent).order_by(InstanceEvent.id))]
    assert history == ["received", "queued", "processing", "failed"]


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_huge_header_only, "declared image size 60000 x 60000 x 1 sample(s) x 16 bits is 3,600,000,000 pixel samples"),
        (lambda p: _with_raw(NATIVE, p, Rows=_us(0)), "declared image size 0 x 440: Rows and Columns must be"),
        (lambda p: _with_raw(NATIVE, p, RescaleSlope=b"abc "), "invalid RescaleSlope 'abc': not a number"),
    ],
)
def test_hostile_files_end_failed_with_their_reason(
    build: Any, reason: str, sqlite_url: str, tmp_path: Path, tiny_registry: Registry
) -> None:
    instance_id = _queued(sqlite_url, build(tmp_path / "bad.dcm"), "1.2.3.4.5.101")
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    outcome = triage_instance(_settings(sqlite_url, tmp_path, tiny_registry), instance_id, provider)
    status, stored, predictions = _row(sqlite_url, instance_id)
    assert outcome.status == status == InstanceStatus.FAILED and predictions == 0
    assert stored is not None and stored.startswith(reason)


def test_the_worker_limit_comes_from_the_setting(sqlite_url: str, tmp_path: Path, tiny_registry: Registry) -> None:
    instance_id = _queued(sqlite_url, JPEG, "1.2.3.4.5.102")
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    settings = _settings(sqlite_url, tmp_path, tiny_registry, max_decoded_pixels=1_000_000)
    assert triage_instance(settings, instance_id, provider).status == InstanceStatus.FAILED
    assert "over the limit of 1,000,000 (CXR_MAX_DECODED_PIXELS)" in (_row(sqlite_url, instance_id)[1] or "")


def test_a_multiframe_object_is_triaged_on_its_first_frame(
    sqlite_url: str, tmp_path: Path, tiny_registry: Registry
) -> None:
    path = _multiframe_with_a_broken_second_frame(tmp_path / "mf.dcm")
    instance_id = _queued(sqlite_url, path, "1.2.3.4.5.103")
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    settings = _settings(sqlite_url, tmp_path, tiny_registry, results_heatmap=False)
    assert triage_instance(settings, instance_id, provider).status == InstanceStatus.DONE
    assert _row(sqlite_url, instance_id)[2] == 1


def test_any_error_in_the_ensemble_ends_failed_with_type_and_message_without_patient_names(
    sqlite_url: str, tmp_path: Path, tiny_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = read_dataset(JPEG)
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-123"
    path = _save(ds, tmp_path / "named.dcm")

    def broken(self: Ensemble, inputs: Any, **_: Any) -> Any:
        raise RuntimeError("shape mismatch for Doe^Jane (PID-123) in layer 3\nsecond line")

    monkeypatch.setattr(Ensemble, "predict_batch", broken)
    instance_id = _queued(sqlite_url, path, "1.2.3.4.5.104")
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    outcome = triage_instance(_settings(sqlite_url, tmp_path, tiny_registry), instance_id, provider)
    expected = "RuntimeError: shape mismatch for [redacted] ([redacted]) in layer 3 second line"
    assert outcome.status == InstanceStatus.FAILED and outcome.detail == expected
    assert _row(sqlite_url, instance_id) == (InstanceStatus.FAILED, expected, 0)


def test_an_error_while_storing_ends_failed_and_a_transient_one_propagates(
    db_url: str, tmp_path: Path, tiny_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    settings = _settings(db_url, tmp_path, tiny_registry, results_heatmap=False)

    def bad_priority(*_: Any, **__: Any) -> None:
        raise KeyError("no such rule")

    monkeypatch.setattr("workers.triage.assign_priority", bad_priority)
    first = _queued(db_url, JPEG, "1.2.3.4.5.105")
    assert triage_instance(settings, first, provider).status == InstanceStatus.FAILED
    status, reason, predictions = _row(db_url, first)
    assert (status, reason) == (InstanceStatus.FAILED, "KeyError: 'no such rule'")
    if db_url.startswith("postgresql"):
        # The prediction's transaction rolled back. (On SQLite, pysqlite commits the savepoint save_prediction
        # opens outside a transaction: issue 10 item 7, db/ and not this test's subject.)
        assert predictions == 0

    def database_away(*_: Any, **__: Any) -> None:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr("workers.triage.assign_priority", database_away)
    second = _queued(db_url, JPEG, "1.2.3.4.5.106")
    with pytest.raises(OperationalError):
        triage_instance(settings, second, provider)
    assert _row(db_url, second)[0] == InstanceStatus.PROCESSING  # the task retries it


def test_the_task_retries_exactly_the_transient_errors() -> None:
    from kombu.exceptions import OperationalError as BrokerError

    from workers.tasks import triage

    assert tuple(triage.autoretry_for) == TRANSIENT_ERRORS
    assert issubclass(BrokerError, TRANSIENT_ERRORS) and issubclass(OperationalError, TRANSIENT_ERRORS)
    assert not issubclass(ValueError, TRANSIENT_ERRORS) and not issubclass(PixelDecodeError, TRANSIENT_ERRORS)


def test_failure_reasons_are_one_line_and_bounded() -> None:
    reason = failure_reason(ValueError("x" * 2000 + "\n\n y"))
    assert reason.startswith("ValueError: xxx") and len(reason) == 500 and "\n" not in reason
    assert failure_reason(PixelDecodeError("no pixel data")) == "no pixel data"


# --- promotions that do not load ----------------------------------------------------------------------------------
def _broken_set(registry: Registry, name: str = "broken") -> str:
    """An ensemble whose one member's safetensors file is corrupt (card and file present, so it can be promoted)."""
    good = registry.ensemble("test").members[0]
    version = "broken-test"
    shutil.copytree(registry.version_dir(good), registry.version_dir(version))
    card = registry.card(good).to_json()
    registry.write_card(ModelCard.from_json({**card, "version": version}))
    (registry.version_dir(version) / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    registry.write_ensemble(EnsembleSpec(name=name, members=(version,)))
    return name


def test_an_unloadable_promotion_keeps_the_running_ensemble_and_is_logged_once(tiny_registry: Registry) -> None:
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    running = provider.current()
    assert running is not None and running.name == "test"
    tiny_registry.promote(_broken_set(tiny_registry))  # as a hand edit or an older tool would
    with structlog.testing.capture_logs() as logs:
        assert provider.current() is running
        assert provider.current() is running  # polled again: no second attempt, no second log line
    refused = [e for e in logs if e["event"] == "ensemble.load_refused"]
    assert len(refused) == 1
    assert refused[0]["model_set"] == "broken" and refused[0]["serving"] == "test" and refused[0]["reason"]
    assert provider.refusal is not None and provider.refusal.startswith("promoted set 'broken' does not load: ")
    tiny_registry.promote("test", reason="back")  # a new pointer: loaded again
    fresh = provider.current()
    assert fresh is not None and fresh.name == "test" and provider.refusal is None


def test_without_a_loaded_ensemble_an_unloadable_promotion_leaves_instances_awaiting_with_the_reason(
    sqlite_url: str, tmp_path: Path, tiny_registry: Registry
) -> None:
    tiny_registry.promote(_broken_set(tiny_registry))
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    instance_id = _queued(sqlite_url, JPEG, "1.2.3.4.5.107")
    outcome = triage_instance(_settings(sqlite_url, tmp_path, tiny_registry), instance_id, provider)
    assert outcome.status == InstanceStatus.AWAITING_MODEL
    status, reason, _ = _row(sqlite_url, instance_id)
    assert status == InstanceStatus.AWAITING_MODEL
    assert reason is not None and reason.startswith("promoted set 'broken' does not load: ")


def test_models_promote_refuses_a_set_that_does_not_load(
    tiny_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cxr_triage import settings as settings_module
    from service.cli import app

    broken = _broken_set(tiny_registry)
    tiny_registry.write_ensemble(EnsembleSpec(name="second", members=tiny_registry.ensemble("test").members))
    pointer = (tiny_registry.root / "promoted.json").read_bytes()
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_registry.root))
    settings_module.get_settings.cache_clear()
    try:
        runner = CliRunner()
        refused = runner.invoke(app, ["models", "promote", broken])
        assert refused.exit_code == 1, refused.output
        lines = refused.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ensemble 'broken' does not load, promotion refused: ")
        assert (tiny_registry.root / "promoted.json").read_bytes() == pointer  # unchanged
        assert tiny_registry.promoted_name() == "test"

        accepted = runner.invoke(app, ["models", "promote", "second"])
        assert accepted.exit_code == 0, accepted.output
        assert tiny_registry.promoted_name() == "second"
        history = json.loads((tiny_registry.root / "promoted.json").read_text())["history"]
        assert [h["ensemble"] for h in history] == ["test", "second"]
    finally:
        settings_module.get_settings.cache_clear()
