"""Listener pieces without a network: UID safety, the durable spool, the intake policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from cxr_triage.settings import Settings
from cxr_triage.uids import is_valid_uid
from listener.intake import decide
from listener.spool import spool_path, write_instance


@pytest.mark.parametrize(
    "value",
    ["../../etc/passwd", "1.2/../../x", "1.2.3\x00", "", "1..2", ".1.2", "1.2.", "a.b.c", "1" * 65, None, 12],
)
def test_hostile_or_malformed_uids_are_invalid(value: object) -> None:
    assert not is_valid_uid(value)


@pytest.mark.parametrize("value", ["1.2.840.10008.1.2", "999.999.01.23.45.6789", "2.25.1234567890"])
def test_real_world_uids_are_valid(value: str) -> None:
    assert is_valid_uid(value)


def test_spool_path_refuses_to_leave_the_spool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="StudyInstanceUID is not a valid DICOM UID"):
        spool_path(tmp_path, study_instance_uid="../..", sop_instance_uid="1.2.3")
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        spool_path(tmp_path, study_instance_uid="1.2.3", sop_instance_uid="1.2/../../../x")
    assert spool_path(tmp_path, study_instance_uid="1.2", sop_instance_uid="1.2.3") == tmp_path / "1.2" / "1.2.3.dcm"


def test_spool_write_is_atomic_and_a_resend_keeps_the_first_copy(tmp_path: Path) -> None:
    first = write_instance(tmp_path, study_instance_uid="1.2", sop_instance_uid="1.2.3", data=b"first")
    assert not first.already_present and Path(first.ref).read_bytes() == b"first"
    again = write_instance(tmp_path, study_instance_uid="1.2", sop_instance_uid="1.2.3", data=b"second")
    assert again.already_present and Path(again.ref).read_bytes() == b"first" and again.sha256 == first.sha256
    assert [p.name for p in (tmp_path / "1.2").iterdir()] == ["1.2.3.dcm"], "no temporary file may be left"


def test_spool_write_error_leaves_no_partial_file(tmp_path: Path) -> None:
    blocker = tmp_path / "1.2"
    blocker.write_text("a file where the study directory should be")
    with pytest.raises(OSError):
        write_instance(tmp_path, study_instance_uid="1.2", sop_instance_uid="1.2.3", data=b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.2"]


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "CR"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "triage", "reason"),
    [
        ({"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, True, None),
        ({"BodyPartExamined": "CHEST", "ViewPosition": "AP"}, True, None),
        ({"BodyPartExamined": "CHEST"}, True, None),
        ({}, True, None),  # nothing says otherwise (e.g. NIH DX exports)
        ({"BodyPartExamined": "CHEST", "ViewPosition": "LL"}, False, "lateral view (LL)"),
        ({"BodyPartExamined": "HIP"}, False, "body part HIP"),
        ({"StudyDescription": "MODALITYLUT - TEETH"}, False, "description names TEETH, no body part given"),
        ({"SeriesDescription": "Chest lateral"}, False, "lateral view (from description)"),
        ({"Modality": "MG"}, False, "modality MG"),
    ],
)
def test_intake_policy(attrs: dict[str, object], triage: bool, reason: str | None) -> None:
    decision = decide(_ds(**attrs), Settings())
    assert (decision.triage, decision.reason) == (triage, reason)


def test_intake_uses_anatomic_region_codes_when_body_part_is_absent() -> None:
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "24136001", "SCT", "Hip joint"
    assert decide(_ds(AnatomicRegionSequence=[region]), Settings()).reason == "anatomic region HIP JOINT"
    region.CodeValue, region.CodeMeaning = "51185008", "Chest"
    assert decide(_ds(AnatomicRegionSequence=[region]), Settings()).triage


def test_intake_can_be_widened_by_settings() -> None:
    settings = Settings(triage_view_positions="PA,AP,LL")  # type: ignore[arg-type]
    assert decide(_ds(BodyPartExamined="CHEST", ViewPosition="LL"), settings).triage


def test_accepted_sockets_have_tcp_nodelay() -> None:
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from listener.handlers import set_tcp_nodelay
    from listener.server import build_ae
    from tests.conftest import free_port

    port = free_port()
    server: Any = build_ae(Settings()).start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)]
    )
    try:
        scu = AE(ae_title="PROBE")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
        assert assoc.is_established
        accepted: Any = server.active_associations[0].dul.socket.socket
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assoc.release()
    finally:
        server.shutdown()
