"""Shadow mode: a candidate set runs on live traffic beside the promoted one; stored, never used, never sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from cxr_triage.architectures import create_model, save_state
from cxr_triage.labels import COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.priority import Rules
from cxr_triage.registry import EnsembleSpec, ModelCard, Registry, RegistryError
from cxr_triage.shadow import Pair, PredictionView, summarise
from db.models import Prediction, PredictionRole, ResultObject
from db.session import session_scope
from db.worklist_models import PriorityAssignment
from tests.conftest import CHEST_FILES, DICOM_DIR, ROOT, free_port, new_copies, wait_until
from training.gate import GateDecision, shadow_requirement

RULES = Rules(stat_threshold=0.5, routine_threshold=0.8, indeterminate_margin=0.0, disagreement_threshold=1.0)


def add_candidate(registry: Registry, name: str = "candidate", seed: int = 1) -> str:
    """A second set: the same architecture with other random weights, so that its labels differ from the promoted."""
    torch.manual_seed(seed)
    version = f"mobilenetv2_100-{name}"
    registry.version_dir(version).mkdir(parents=True, exist_ok=True)
    save_state(create_model("mobilenetv2_100"), registry.version_dir(version) / "model.safetensors")
    registry.write_card(
        ModelCard(version=version, architecture="mobilenetv2_100", device_uid=generate_uid(), input_size=64)
    )
    (registry.version_dir(version) / "split.csv").write_text("path,label,patient_id,source,group,split,sha256\n")
    registry.write_ensemble(EnsembleSpec(name=name, members=(version,)))
    return name


def _view(label: str, probs: dict[str, float], ms: float = 10.0) -> PredictionView:
    return PredictionView("set", label, probs, {"m": probs}, ms)


def test_the_report_counts_agreement_flips_stat_rates_and_calibration() -> None:
    covid = {COVID19: 0.9, PNEUMONIA: 0.05, NO_FINDING: 0.05}
    normal = {COVID19: 0.05, PNEUMONIA: 0.05, NO_FINDING: 0.9}
    pneumonia = {COVID19: 0.1, PNEUMONIA: 0.6, NO_FINDING: 0.3}
    now = datetime(2026, 12, 1, tzinfo=UTC)
    pairs = [
        Pair(1, _view(COVID19, covid), _view(COVID19, covid, 20), now, confirmed=COVID19),
        Pair(2, _view(NO_FINDING, normal), _view(COVID19, covid, 30), now, confirmed=NO_FINDING),
        Pair(3, _view(NO_FINDING, normal), _view(NO_FINDING, normal, 40), now),
        Pair(4, _view(PNEUMONIA, pneumonia), _view(NO_FINDING, normal, 50), now),
    ]
    report = summarise("cand", pairs, lambda point: RULES, shadow_only=2)
    assert report.cases == 4 and report.shadow_only == 2
    assert report.agreement == 0.5
    assert report.flips == {f"{NO_FINDING} -> {COVID19}": 1, f"{PNEUMONIA} -> {NO_FINDING}": 1}
    assert report.confusion[NO_FINDING][COVID19] == 1 and report.confusion[COVID19][COVID19] == 1
    # STAT: covid 0.9 and pneumonia 0.6 are >= 0.5: live 2 of 4 (1 and 4), shadow 2 of 4 (1 and 2)
    assert report.stat_rate_live == 0.5 and report.stat_rate_shadow == 0.5
    assert report.priority_flips == {"routine -> stat": 1, "stat -> routine": 1}
    assert report.latency_ms["shadow"]["p50"] == 35.0 and report.latency_ms["live"]["p95"] == 10.0
    live, shadow = report.calibration["live"], report.calibration["shadow"]
    assert live.n == shadow.n == 2
    assert live.accuracy == 1.0 and shadow.accuracy == 0.5
    assert shadow.brier > live.brier
    assert abs(live.ece - 0.1) < 1e-9  # confidence 0.9, both right: |0.9 - 1.0|


def test_registry_shadow_pointer_refuses_the_promoted_set_and_keeps_history(tiny_registry: Registry) -> None:
    with pytest.raises(RegistryError, match="promoted"):
        tiny_registry.start_shadow("test")
    name = add_candidate(tiny_registry)
    tiny_registry.start_shadow(name)
    assert tiny_registry.shadow_name() == name and tiny_registry.shadow_started_at()
    assert name in {m.split("-", 1)[1] for m in tiny_registry.ensemble(name).members}
    assert "mobilenetv2_100-candidate" not in tiny_registry.prune_weights(), "the shadow set's weights are kept"
    assert tiny_registry.stop_shadow() == name and tiny_registry.shadow_name() is None
    assert tiny_registry.stop_shadow() is None
    history = tiny_registry.shadow_history()
    assert len(history) == 1 and history[0]["stopped_at"]


def test_gate_requires_a_shadow_period(tiny_registry: Registry) -> None:
    decision = GateDecision("candidate", "test", True, ["macro AUROC fine"], {}, {})
    refused = shadow_requirement(tiny_registry, decision, 20)
    assert not refused.accepted and "no shadow report" in refused.reasons[-1]
    tiny_registry.write_shadow_report("candidate", {"shadow_set": "candidate", "cases": 12})
    refused = shadow_requirement(tiny_registry, decision, 20)
    assert not refused.accepted and "12 live cases < 20" in refused.reasons[-1]
    assert refused.metrics["shadow"]["cases"] == 12, "the report is recorded with the decision"
    tiny_registry.write_shadow_report("candidate", {"shadow_set": "candidate", "cases": 25})
    accepted = shadow_requirement(tiny_registry, decision, 20)
    assert accepted.accepted and "25 live cases >= 20" in accepted.reasons[-1]
    rejected_before = GateDecision("candidate", "test", False, ["AUROC too low"], {}, {})
    assert not shadow_requirement(tiny_registry, rejected_before, 20).accepted, "a shadow period never overrides"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_shadow_set_on_live_traffic_is_stored_but_never_sent_or_ranked(
    pg_url, redis_url, tiny_registry, service_factory, tmp_path: Path
) -> None:
    from tests.orthanc import Orthanc

    add_candidate(tiny_registry)
    dicom_port = free_port()
    service = service_factory(
        database_url=pg_url, broker_url=redis_url, models_dir=tiny_registry.root, results_destination_aet="ORTHANC",
        results_destination_port=str(dicom_port), results_heatmap="false", triage_batch_size="4",
    )  # fmt: skip
    env = {**os.environ, **service.env}
    started = _cli(env, "models", "shadow", "start", "candidate")
    assert started.returncode == 0, started.stderr
    service.start_listener()
    service.start_worker()
    orthanc = Orthanc(
        tmp_path / "orthanc", dicom_port=dicom_port, http_port=free_port(), triage_aet="CXRTRIAGE",
        triage_port=service.port,
    )  # fmt: skip
    orthanc.start()
    try:
        files = new_copies(DICOM_DIR / CHEST_FILES[0], tmp_path, 20, prefix="cxr")
        result = service.storescu(*files)
        assert result.returncode == 0, result.stderr

        def all_in() -> bool:
            with session_scope(pg_url) as session:
                shadow = session.scalar(
                    select(func.count()).select_from(Prediction).where(Prediction.role == PredictionRole.SHADOW)
                )
                delivered = session.scalar(
                    select(func.count()).select_from(ResultObject).where(ResultObject.status == "delivered")
                )
                return shadow == 20 and delivered == 20

        wait_until(all_in, 300, "20 shadow predictions and 20 delivered SRs", interval=1)
        with session_scope(pg_url) as session:
            predictions = session.scalars(select(Prediction)).all()
            live = {p.id: p for p in predictions if p.role == PredictionRole.LIVE}
            shadow = [p for p in predictions if p.role == PredictionRole.SHADOW]
            assert len(live) == 20 and {p.model_set for p in live.values()} == {"test"}
            assert len(shadow) == 20 and {p.model_set for p in shadow} == {"candidate"}
            assert {p.instance_id for p in shadow} == {p.instance_id for p in live.values()}
            results = session.scalars(select(ResultObject)).all()
            assert len(results) == 20 and all(r.prediction_id in live for r in results), "only live results exist"
            assigned = session.scalars(select(PriorityAssignment.prediction_id)).all()
            assert len(assigned) == 20 and set(assigned) <= set(live), "priority comes from the live set only"
        studies = orthanc.get("/studies")
        sr_count = sum(
            1
            for study in studies
            for series in orthanc.get(f"/studies/{study}/series")
            if series["MainDicomTags"].get("Modality") == "SR"
            for _ in series["Instances"]
        )
        assert sr_count == 20, "the PACS receives one SR per instance, from the live set"

        out = tmp_path / "shadow.json"
        plot = tmp_path / "shadow.png"
        report = _cli(env, "models", "shadow", "report", "--json", str(out), "--plot", str(plot))
        assert report.returncode == 0, report.stderr
        assert "agreement:" in report.stdout and "cases: 20 with both predictions" in report.stdout
        payload = json.loads(out.read_text())
        assert payload["cases"] == 20 and payload["shadow_set"] == "candidate" and payload["live_sets"] == ["test"]
        assert sum(sum(row.values()) for row in payload["confusion"].values()) == 20
        assert plot.stat().st_size > 10_000
        recorded = Registry(tiny_registry.root).shadow_report("candidate")
        assert recorded is not None and recorded["cases"] == 20, "recorded for the gate"
        stopped = _cli(env, "models", "shadow", "stop")
        assert stopped.returncode == 0 and "candidate" in stopped.stdout
    finally:
        orthanc.stop()
