"""Evaluate registered version(s) on a split through the inference pixel path; metrics, report and plots."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr_triage.architectures import load_member
from cxr_triage.ensembling import combine, labels_at
from cxr_triage.labels import CLASS_LABELS, COVID19, DEMO_DISCLAIMER, NO_FINDING, PNEUMONIA, label_index
from cxr_triage.ood import MahalanobisDetector
from cxr_triage.pixels import model_input
from cxr_triage.registry import EnsembleSpec, Registry
from training.config import N_BOOT
from training.dataset import SplitLeakError, read_split_manifest, sha256_file
from training.metrics import group_resamples, reliability_bins, summarise, within_source

PEDIATRIC_SOURCES = ("kermany_pediatric",)
# The site's own confirmed reads (`cxr-triage training export-feedback`, merged by `training merge --dicom-folder`
# under this source, training/adapters.py): the report shows them on their own beside the public sources.
SITE_SOURCES = ("hospital",)


def member_hashes(registry: Registry, version: str, splits: tuple[str, ...]) -> set[str]:
    """Image hashes of `version`'s recorded split rows in `splits` (its split.csv, copied at training time)."""
    path = registry.version_dir(version) / "split.csv"
    if not path.is_file():
        raise SplitLeakError(f"model {version} has no recorded training split ({path}): cannot prove it never saw "
                             "the images to evaluate")  # fmt: skip
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "sha256" not in df.columns:
        raise SplitLeakError(f"{path} has no sha256 column: cannot check the images by hash")
    return set(df.loc[df["split"].isin(splits), "sha256"])


def check_unseen(
    registry: Registry, versions: list[str], paths: list[str], *, forbidden: tuple[str, ...] = ("train", "valid")
) -> None:
    """Refuse (SplitLeakError) to evaluate any image that is in a member's `forbidden` splits, by image hash."""
    hashes = {p: sha256_file(Path(p)) for p in paths}
    for version in versions:
        seen = member_hashes(registry, version, forbidden)
        leaked = sorted(p for p, h in hashes.items() if h in seen)
        if leaked:
            raise SplitLeakError(
                f"{len(leaked)} of the {len(paths)} images to evaluate are in the {'/'.join(forbidden)} split of "
                f"model {version} (matched by image hash), e.g. {leaked[0]}: a model cannot be evaluated on images it "
                "was trained or selected on. Prepare the split locked to the registry (`training prepare`, default "
                "--lock models/split.csv)."
            )


@torch.no_grad()
def predict(
    registry: Registry,
    versions: list[str],
    paths: list[str],
    *,
    batch_size: int = 32,
    threads: int = 2,
    forbidden: tuple[str, ...] = ("train", "valid"),
) -> np.ndarray:
    """Mean softmax probability over `versions` for each file, (N, 3) in CLASS_LABELS order.

    Every image is first checked against the members' recorded splits (`check_unseen`): by default none may be in
    a member's train or valid split; choosing on the valid split passes forbidden=("train",).
    """
    check_unseen(registry, versions, paths, forbidden=forbidden)
    probs: np.ndarray = member_probabilities(registry, versions, paths, batch_size=batch_size, threads=threads)
    return np.asarray(probs.mean(axis=0))


def ensemble_probabilities(
    registry: Registry,
    spec: EnsembleSpec,
    paths: list[str],
    *,
    batch_size: int = 32,
    threads: int = 2,
    forbidden: tuple[str, ...] = ("train", "valid"),
) -> np.ndarray:
    """(N, 3) probabilities of ensemble `spec` as the workers compute them (weights, temperature)."""
    check_unseen(registry, list(spec.members), paths, forbidden=forbidden)
    members = member_probabilities(
        registry, list(spec.members), paths, batch_size=batch_size, threads=threads, hflip="hflip" in spec.tta
    )
    return combine(members, spec.weights, spec.temperature)


@torch.no_grad()
def member_probabilities(
    registry: Registry,
    versions: list[str],
    paths: list[str],
    *,
    batch_size: int = 32,
    threads: int = 2,
    hflip: bool = False,
) -> np.ndarray:
    """Softmax probabilities per member, (M, N, 3); with `hflip`, the mean over the image and its mirror image (as
    the workers do for a set with tta=["hflip"]). No split check (callers check)."""
    torch.set_num_threads(threads)
    out = np.zeros((len(versions), len(paths), len(CLASS_LABELS)), dtype=np.float64)
    for m, version in enumerate(versions):
        card = registry.card(version)
        model = load_member(card, registry.weights(version)).eval()
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            x = torch.stack([model_input(Path(p), card.input_size) for p in chunk])
            probs = torch.softmax(model(x).float(), dim=1)
            if hflip:
                probs = (probs + torch.softmax(model(x.flip(-1)).float(), dim=1)) / 2
            out[m, start : start + len(chunk)] = probs.double().numpy()
    return out


def subset_table(
    df: pd.DataFrame, y: np.ndarray, probs: np.ndarray, column: str, *, n_boot: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Metrics per value of `column` (with patient-bootstrap CIs when n_boot > 0)."""
    return {
        str(value): summarise(y[mask], probs[mask], df.loc[mask, "group"].to_numpy(), n_boot=n_boot, seed=seed)
        for value in sorted(df[column].unique())
        for mask in [(df[column] == value).to_numpy()]
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(boot: dict[str, Any] | None, key: str) -> str:
    if not boot or not boot.get(key):
        return "n/a"
    lo, hi = boot[key]
    return f"[{lo:.3f}, {hi:.3f}]"


def _summary_row(name: str, m: dict[str, Any]) -> str:
    boot = m.get("bootstrap")
    return (
        f"| {name} | {m['n_images']} | {m['n_groups']} | {_fmt(m['accuracy'])} | {_ci(boot, 'accuracy_95ci')} | "
        f"{_fmt(m['top2_accuracy'])} | {_fmt(m['macro_auroc'])} | {_ci(boot, 'macro_auroc_95ci')} | "
        + " | ".join(_fmt(m["auroc"][c]) for c in CLASS_LABELS)
        + " | "
        + " | ".join(_fmt(m["per_class"][c]["recall"]) for c in CLASS_LABELS)
        + f" | {_fmt(m['ece_10bins'])} |"
    )


def shortcut_section(result: dict[str, Any]) -> list[str]:
    """Markdown: within-source discrimination, leave-one-source-out, operating point and OOD (when measured)."""
    ws = result.get("within_source")
    lines: list[str] = []
    if ws:
        lines += [
            "",
            "## Within one source (the source cannot give the answer away)",
            "",
            "| check | images | positives | AUROC | 95% CI |",
            "|---|---|---|---|---|",
        ]
        for key, title in (
            ("cohen_covid_vs_pneumonia", "Cohen only: COVID-19 vs Pneumonia"),
            ("nih_pneumonia_vs_no_finding", "NIH only: Pneumonia vs No finding"),
        ):
            m = ws[key]
            lines.append(
                f"| {title} | {m['n_images']} | {m['n_positive']} | {_fmt(m['auroc'])} | {_ci(m, 'auroc_95ci')} |"
            )
        lines += ["", "Leave one source out (pooled macro AUROC of this split without that source's images):", ""]
        lines += ["| without | images | macro AUROC |", "|---|---|---|"]
        for src, m in ws["leave_one_source_out"].items():
            lines.append(f"| {src} | {m['n_images']} | {_fmt(m['macro_auroc'])} |")
    op = result.get("operating_point")
    if op:
        lines += [
            "",
            "## Operating point (thresholds chosen on the validation split)",
            "",
            f"- STAT threshold {op['stat_threshold']} (COVID-19 label when P(COVID-19) reaches it), routine "
            f"threshold {op['routine_threshold']}",
            f"- COVID-19 sensitivity {_fmt(op['covid_sensitivity'])} {_ci(op, 'covid_sensitivity_95ci')} "
            f"({op['n_covid']} COVID-19 images), specificity {_fmt(op['covid_specificity'])}",
            f"- accuracy with this label rule {_fmt(op['accuracy_at_operating_point'])}; STAT rate "
            f"{_fmt(op['stat_rate'])}; diseased images that would be routine {_fmt(op['diseased_routine_rate'])}",
        ]
    ood = result.get("ood")
    if ood:
        per_source = ", ".join(f"{k} {v:.3f}" for k, v in ood["per_source"].items())
        lines += [
            "",
            "## Out-of-distribution detector on these in-distribution images",
            "",
            f"- member `{ood['member']}`, threshold {ood['threshold']:.1f}: false-alarm rate "
            f"{ood['false_alarm_rate']:.3f} ({ood['false_alarms']} of {ood['n_images']}); per source: {per_source}",
        ]
    return lines


def report_markdown(result: dict[str, Any]) -> str:
    """The human-readable report (only numbers measured on the evaluated split)."""
    head = (
        "| subset | images | groups | accuracy | 95% CI | top-2 | macro AUROC | 95% CI | "
        + " | ".join(f"AUROC {c}" for c in CLASS_LABELS)
        + " | "
        + " | ".join(f"recall {c}" for c in CLASS_LABELS)
        + " | ECE |"
    )
    sep = "|---" * (10 + 2 * len(CLASS_LABELS) - 1) + "|"
    o = result["overall"]
    lines = [
        f"# Evaluation report: {result.get('ensemble') or ', '.join(result['versions'])}",
        "",
        f"**{DEMO_DISCLAIMER}**",
        "",
        f"- split: `{result['split']}` of `{result['split_manifest']}` (sha256 `{result['split_manifest_sha256']}`)",
        "- models: "
        + ", ".join(f"`{v}` ({a})" for v, a in zip(result["versions"], result["architectures"], strict=True))
        + (
            f" - ensemble `{result['ensemble']}` as the workers run it (weights, temperature, operating point)"
            if result.get("ensemble")
            else (" - ensemble = mean of probabilities" if len(result["versions"]) > 1 else "")
        ),
        *(
            [
                f"- a byte-identical copy of the split manifest is at `{result['split_manifest_copy']}` (its image "
                "paths are relative to the original's folder)"
            ]
            if result.get("split_manifest_copy")
            else []
        ),
        "- inference path: `cxr_triage.pixels.model_input` (the same code the workers run)",
        f"- 95% CIs: percentile bootstrap, {o.get('bootstrap', {}).get('n_boot', 0)} resamples of patient groups",
        "- All numbers below were measured on this split only; groups (patients / near-duplicate groups) in it "
        "were never used for training or checkpoint selection.",
        "",
        "## Summary",
        "",
        head,
        sep,
        _summary_row("all", o),
        _summary_row("adult only (no kermany_pediatric)", result["adult_only"]),
    ]
    site = result.get("site_vs_public")
    if site:
        lines.append(_summary_row("site only (the hospital's confirmed reads)", site["site"]))
        if site["public"]:
            lines.append(_summary_row("public sources only", site["public"]))
    lines += [_summary_row(f"source = {s}", m) for s, m in result["per_source"].items()]
    lines += shortcut_section(result)
    lines += [
        "",
        "## Per class (all images of the split)",
        "",
        "| class | precision | recall | recall 95% CI | F1 | AUROC | AUROC 95% CI | support |",
        "|---|---|---|---|---|---|---|---|",
    ]
    boot = o.get("bootstrap") or {}
    for c in CLASS_LABELS:
        pc = o["per_class"][c]
        lines.append(
            f"| {c} | {_fmt(pc['precision'])} | {_fmt(pc['recall'])} | {_ci(boot.get('recall_95ci'), c)} | "
            f"{_fmt(pc['f1'])} | {_fmt(o['auroc'][c])} | {_ci(boot.get('auroc_95ci'), c)} | {pc['support']} |"
        )
    lines += [
        "",
        "## Confusion matrix (rows = true, columns = predicted)",
        "",
        "| true \\ predicted | " + " | ".join(CLASS_LABELS) + " |",
        "|---" * (len(CLASS_LABELS) + 1) + "|",
    ]
    for c, row in zip(CLASS_LABELS, o["confusion_matrix"], strict=True):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        f"Calibration: ECE (10 bins, top-1 confidence) {_fmt(o['ece_10bins'])}, multi-class Brier {_fmt(o['brier'])}.",
        "",
        "Plots: `confusion_matrix.png`, `roc_curves.png`, `reliability.png`.",
        "",
        "## Caveats",
        "",
        "- Source and label are confounded (every COVID-19 image is from Cohen/Actualmed/Figure1 web/paper figures;",
        "  no NIH image is COVID-19; Kermany images are pediatric). High overall scores can come from recognising",
        "  the source; read the per-source and adult-only rows. Within `nih_cxr14` only Pneumonia vs No finding",
        "  is measured, and NIH labels are text-mined.",
        "- The split is small; per-source cells can hold a handful of images, so their numbers are noisy.",
        "- Macro AUROC averages the one-vs-rest AUROCs that are defined in the subset (a class absent from a",
        "  subset has none).",
        "",
        f"**{DEMO_DISCLAIMER}**",
    ]
    return "\n".join(lines) + "\n"


def write_plots(out_dir: Path, y: np.ndarray, probs: np.ndarray, result: dict[str, Any]) -> None:
    """confusion_matrix.png, roc_curves.png, reliability.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    title = f"{', '.join(result['versions'])} - {result['split']}\n{DEMO_DISCLAIMER}"
    cm = np.array(result["overall"]["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "k")
    ax.set_xticks(range(len(CLASS_LABELS)), CLASS_LABELS)
    ax.set_yticks(range(len(CLASS_LABELS)), CLASS_LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(CLASS_LABELS):
        pos = y == c
        if 0 < pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(pos, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUROC {result['overall']['auroc'][name]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc_curves.png", dpi=110)
    plt.close(fig)

    bins = result["reliability_bins"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    accs = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    ax.bar(centers, accs, width=0.1, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    for cx, b in zip(centers, bins, strict=True):
        if b["count"]:
            ax.text(cx, 0.02, str(b["count"]), ha="center", fontsize=7)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {result['overall']['ece_10bins']:.3f}", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)


def operating_point_metrics(
    y: np.ndarray, probs: np.ndarray, spec: EnsembleSpec, groups: np.ndarray, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """COVID-19 sensitivity/specificity at the set's STAT threshold (its label rule), STAT and routine rates."""
    point = spec.operating()
    labels = labels_at(probs, point)
    covid, normal = label_index(COVID19), label_index(NO_FINDING)
    positive = y == covid
    detected = labels == covid
    out: dict[str, Any] = {
        "stat_threshold": point.stat_threshold,
        "routine_threshold": point.routine_threshold,
        "covid_sensitivity": float(detected[positive].mean()) if positive.any() else None,
        "covid_specificity": float((~detected[~positive]).mean()) if (~positive).any() else None,
        "n_covid": int(positive.sum()),
        "accuracy_at_operating_point": float((labels == y).mean()),
        "stat_rate": float((probs[:, [covid, label_index(PNEUMONIA)]].max(axis=1) >= point.stat_threshold).mean()),
        "diseased_routine_rate": float((probs[y != normal, normal] >= point.routine_threshold).mean())
        if (y != normal).any()
        else None,
    }
    if n_boot and positive.any():
        values = []
        for idx in group_resamples(groups, n_boot, seed):
            if positive[idx].any():
                values.append(float(detected[idx][positive[idx]].mean()))
        out["covid_sensitivity_95ci"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


def ood_metrics(registry: Registry, spec: EnsembleSpec, paths: list[str], sources: np.ndarray) -> dict[str, Any]:
    """False-alarm rate of the set's OOD detector on these (in-distribution) images, overall and per source."""
    from training.select import pooled_features

    ood_file = registry.ood_file(spec)
    assert ood_file is not None
    detector = MahalanobisDetector.load(ood_file)
    scores = detector.score(torch.from_numpy(pooled_features(registry, spec.ood["member"], paths))).numpy()
    flagged = scores > detector.threshold
    return {
        "member": spec.ood["member"],
        "threshold": detector.threshold,
        "false_alarm_rate": float(flagged.mean()),
        "false_alarms": int(flagged.sum()),
        "n_images": len(paths),
        "per_source": {str(s): float(flagged[sources == s].mean()) for s in sorted(set(sources.tolist()))},
    }


def default_report_dir(registry: Registry, versions: list[str], split: str, ensemble: str | None = None) -> Path:
    """models/versions/<v>/report for one version (test split), models/reports/<ensemble>-<split> for a named set,
    else a folder under models/reports/ keyed by the versions."""
    if ensemble:
        return registry.root / "reports" / f"{ensemble}-{split}"
    if len(versions) == 1:
        return registry.version_dir(versions[0]) / ("report" if split == "test" else f"report-{split}")
    key = hashlib.sha256("|".join(sorted(versions)).encode()).hexdigest()[:10]
    return registry.root / "reports" / f"ensemble-{len(versions)}-{key}-{split}"


def evaluate(
    registry_dir: Path,
    versions: list[str],
    split_csv: Path,
    *,
    split: str = "test",
    report_dir: Path | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    threads: int = 2,
    batch_size: int = 32,
    ensemble: str | None = None,
) -> dict[str, Any]:
    """Predict `split`, compute metrics, write metrics.json / report.md / plots (and test summary in the card).

    With `ensemble`, the named set is evaluated as the workers run it (weights, temperature, operating point, OOD
    detector) and `versions` is ignored. Every image is checked against the members' training and validation
    splits first; `split="valid"` may only be evaluated for choosing (members' training splits are still refused).
    """
    registry = Registry(registry_dir)
    df = read_split_manifest(split_csv, split)
    if df.empty:
        raise ValueError(f"split {split!r} of {split_csv} is empty")
    y = np.array([label_index(lab) for lab in df["label"]])
    forbidden = ("train",) if split == "valid" else ("train", "valid")
    paths = list(df["abs_path"])
    spec = registry.ensemble(ensemble) if ensemble else None
    if spec is not None:
        versions = list(spec.members)
        probs = ensemble_probabilities(
            registry, spec, paths, batch_size=batch_size, threads=threads, forbidden=forbidden
        )
    else:
        probs = predict(registry, versions, paths, batch_size=batch_size, threads=threads, forbidden=forbidden)
    groups = df["group"].to_numpy()
    adult = (~df["source"].isin(PEDIATRIC_SOURCES)).to_numpy()
    result: dict[str, Any] = {
        "disclaimer": DEMO_DISCLAIMER,
        "ensemble": ensemble,
        "versions": versions,
        "architectures": [registry.card(v).architecture for v in versions],
        "split": split,
        "split_manifest": str(split_csv),
        "split_manifest_sha256": sha256_file(Path(split_csv)),
        "classes": list(CLASS_LABELS),
        "overall": summarise(y, probs, groups, n_boot=n_boot, seed=seed),
        "adult_only": summarise(y[adult], probs[adult], groups[adult], n_boot=n_boot, seed=seed),
        "per_source": subset_table(df, y, probs, "source", n_boot=n_boot, seed=seed),
        "reliability_bins": reliability_bins(y, probs),
        "within_source": within_source(y, probs, df["source"].to_numpy(), groups, n_boot=n_boot, seed=seed),
    }
    site = df["source"].isin(SITE_SOURCES).to_numpy()
    if site.any():
        public = ~site
        result["site_vs_public"] = {
            "site": summarise(y[site], probs[site], groups[site], n_boot=n_boot, seed=seed),
            "public": summarise(y[public], probs[public], groups[public], n_boot=n_boot, seed=seed)
            if public.any()
            else None,
        }
    if spec is not None:
        result["operating_point"] = operating_point_metrics(y, probs, spec, groups, n_boot=n_boot, seed=seed)
        if spec.ood:
            result["ood"] = ood_metrics(registry, spec, paths, df["source"].to_numpy())
    copies = [registry.version_dir(v) / "split.csv" for v in versions]
    same = [c for c in copies if c.is_file() and sha256_file(c) == result["split_manifest_sha256"]]
    if same:
        result["split_manifest_copy"] = str(same[0].relative_to(registry.root))
    out_dir = Path(report_dir) if report_dir else default_report_dir(registry, versions, split, ensemble)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "report.md").write_text(report_markdown(result))
    pred = df[["path", "label", "patient_id", "source", "group"]].copy()
    for c, name in enumerate(CLASS_LABELS):
        pred[f"p_{name}"] = probs[:, c].round(5)
    pred["predicted"] = [CLASS_LABELS[i] for i in probs.argmax(axis=1)]
    pred.to_csv(out_dir / "predictions.csv", index=False)
    write_plots(out_dir, y, probs, result)
    if len(versions) == 1 and spec is None:
        card = registry.card(versions[0])
        o, boot = result["overall"], result["overall"].get("bootstrap", {})
        metrics = dict(card.metrics)
        metrics[split] = {
            "accuracy": o["accuracy"],
            "accuracy_95ci": boot.get("accuracy_95ci"),
            "macro_auroc": o["macro_auroc"],
            "macro_auroc_95ci": boot.get("macro_auroc_95ci"),
            "top2_accuracy": o["top2_accuracy"],
            "ece_10bins": o["ece_10bins"],
            "adult_only_accuracy": result["adult_only"]["accuracy"],
            "adult_only_macro_auroc": result["adult_only"]["macro_auroc"],
            "cohen_covid_vs_pneumonia_auroc": result["within_source"]["cohen_covid_vs_pneumonia"]["auroc"],
            "cohen_covid_vs_pneumonia_auroc_95ci": result["within_source"]["cohen_covid_vs_pneumonia"]["auroc_95ci"],
            "n_images": o["n_images"],
            "report": str(out_dir.relative_to(registry.version_dir(versions[0])))
            if out_dir.is_relative_to(registry.version_dir(versions[0]))
            else str(out_dir),
        }
        registry.write_card(replace(card, metrics=metrics))  # 0644, like every registry JSON write
    return result
