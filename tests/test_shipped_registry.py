"""The registry in the tree (issue 8, item 7): what ships with weights, how big it is, what the promoted set holds."""

from __future__ import annotations

from pathlib import Path

from cxr_triage.registry import WEIGHTS_FILE, Registry
from training.select import PAPER_ARCHITECTURES, is_fine_tuned

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MAX_BYTES = 100_000_000  # "everything under models/ at most 100 MB"


def test_models_folder_stays_under_100_mb() -> None:
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert 0 < total <= MAX_BYTES, f"models/ holds {total / 1e6:.1f} MB"


def test_only_the_promoted_set_and_its_rollback_target_keep_weights() -> None:
    registry = Registry(MODELS)
    promoted, rollback = registry.promoted_name(), registry.rollback_target()
    assert promoted is not None and rollback is not None
    keep = set(registry.ensemble(promoted).members) | set(registry.ensemble(rollback).members)
    with_weights = {v for v in registry.versions() if (registry.version_dir(v) / WEIGHTS_FILE).is_file()}
    assert with_weights == keep
    # every other version stays documented: card, history, split record and report
    for version in set(registry.versions()) - keep:
        folder = registry.version_dir(version)
        assert (folder / "card.json").is_file() and (folder / "split.csv").is_file()
    for name in (promoted, rollback):
        spec = registry.ensemble(name)
        assert not spec.ood or registry.ood_file(spec) is not None, f"{name}'s OOD detector is missing"


def test_the_promoted_set_is_a_fine_tuned_ensemble_whose_cards_name_their_weights() -> None:
    registry = Registry(MODELS)
    spec = registry.promoted()
    assert spec is not None
    cards = [registry.card(v) for v in spec.members]
    fine_tuned = [c for c in cards if is_fine_tuned(c)]
    assert len(cards) >= 4
    assert sum(1 for c in fine_tuned if c.architecture.startswith("tf_efficientnet_lite")) >= 2
    assert sum(1 for c in cards if c.architecture in PAPER_ARCHITECTURES) >= 2
    for card in fine_tuned:
        assert card.initial_weights.get("licence") and card.initial_weights.get("distribution"), card.version
    assert all(c.not_for_clinical_use for c in cards)
