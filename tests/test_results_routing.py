"""Results to their sender: CXR_RESULTS_ROUTES maps calling AE titles to destinations, decided when an instance is
queued, stored with it, and used by the delivery of its DICOM results (real listener, worker and two Orthanc PACS)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from cxr_triage.routes import Route, parse_routes, route_for
from cxr_triage.settings import Settings
from db.models import Instance, ResultObject
from db.session import session_scope
from tests.conftest import CHEST_FILES, DICOM_DIR, free_port, new_copies, wait_until


def test_routes_parse_exactly_and_refuse_what_is_malformed() -> None:
    routes = parse_routes(["PACS1=PACSA@10.0.0.1:104", "vna=VNA@vna.example:2762+tls"])
    assert routes["PACS1"] == Route("PACSA", "10.0.0.1", 104)
    assert routes["vna"] == Route("VNA", "vna.example", 2762, tls=True) and "VNA" not in routes, "compared exactly"
    assert Route.parse(str(routes["vna"])) == routes["vna"], "the stored form parses back"
    for bad in ("PACS1", "=A@h:1", "A=B@h", "A=B@h:0", "A=@h:104", "A=SEVENTEEN_CHARS_AE@h:104", "A=B@h:1,A=C@h:2"):
        with pytest.raises(ValueError):
            Settings(results_routes=bad)
    settings = Settings(results_routes="MOD_A=PACSA@a.example:104", results_destination_aet="MAIN",
                        results_destination_host="main.example", results_destination_port=11112)  # fmt: skip
    assert route_for(settings, "MOD_A") == Route("PACSA", "a.example", 104)
    assert route_for(settings, "OTHER") == Route("MAIN", "main.example", 11112), "the default for everyone else"
    assert route_for(Settings(results_routes="MOD_A=PACSA@a.example:104"), "OTHER") is None, "kept only"


def _copy(tmp_path: Path, name: str) -> Path:
    return new_copies(DICOM_DIR / CHEST_FILES[0], tmp_path, 1, prefix=name)[0]


def _sr_count(orthanc) -> int:
    return sum(
        len(series["Instances"])
        for study in orthanc.get("/studies")
        for series in orthanc.get(f"/studies/{study}/series")
        if series["MainDicomTags"].get("Modality") == "SR"
    )


def test_each_senders_results_go_back_to_its_own_pacs(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path: Path
) -> None:
    from tests.orthanc import Orthanc

    ports = {"A": free_port(), "B": free_port()}
    routes = ",".join(f"MODALITY_{n}=PACS{n}@127.0.0.1:{port}" for n, port in ports.items())
    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, results_heatmap="false",
        results_routes=routes, results_retry_base_s="1",
    )  # fmt: skip
    service.start_listener()
    service.start_worker()
    pacs = {
        n: Orthanc(
            tmp_path / f"orthanc-{n}",
            dicom_port=port,
            http_port=free_port(),
            triage_aet="CXRTRIAGE",
            triage_port=service.port,
            autoroute=False,
        )
        for n, port in ports.items()
    }
    for orthanc in pacs.values():
        orthanc.start()
    try:
        sent = {
            "MODALITY_A": _copy(tmp_path, "a"),
            "MODALITY_B": _copy(tmp_path, "b"),
            "OTHER": _copy(tmp_path, "other"),
        }
        for calling_aet, path in sent.items():
            result = service.storescu(path, calling_aet=calling_aet)
            assert result.returncode == 0, result.stderr

        def settled() -> bool:
            with session_scope(pg_url) as session:
                return sorted(r.status for r in session.scalars(select(ResultObject))) == [
                    "delivered",
                    "delivered",
                    "stored",
                ]

        wait_until(settled, 240, "two SRs delivered to their senders' PACS and one kept", interval=1)
        with session_scope(pg_url) as session:
            by_aet = {
                i.calling_aet: (i.results_destination, [r.destination for r in session.scalars(
                    select(ResultObject).where(ResultObject.instance_id == i.id))])
                for i in session.scalars(select(Instance))
            }  # fmt: skip
        assert by_aet["MODALITY_A"] == (f"PACSA@127.0.0.1:{ports['A']}", [f"PACSA@127.0.0.1:{ports['A']}"])
        assert by_aet["MODALITY_B"] == (f"PACSB@127.0.0.1:{ports['B']}", [f"PACSB@127.0.0.1:{ports['B']}"])
        assert by_aet["OTHER"] == (None, [None]), "no route and no default: the result is kept, sent nowhere"
        assert _sr_count(pacs["A"]) == 1 and _sr_count(pacs["B"]) == 1, "each PACS receives only its own SR"
        from worklist.queries import result_links

        with session_scope(pg_url) as session:  # what the study page lists for each result
            links = result_links(session, list(session.scalars(select(ResultObject.prediction_id))))
        shown = sorted((link.destination or "", link.status) for group in links.values() for link in group)
        assert shown == [("", "stored"), (f"PACSA@127.0.0.1:{ports['A']}", "delivered"),
                         (f"PACSB@127.0.0.1:{ports['B']}", "delivered")]  # fmt: skip
        sr_a = pacs["A"].get("/instances")
        tags = pacs["A"].get(f"/instances/{sr_a[0]}/simplified-tags")
        with session_scope(pg_url) as session:
            study_a = session.scalars(select(Instance).where(Instance.calling_aet == "MODALITY_A")).one().study
            assert tags["StudyInstanceUID"] == study_a.study_instance_uid
    finally:
        for orthanc in pacs.values():
            orthanc.stop()
