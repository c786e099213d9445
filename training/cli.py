"""`cxr-triage training ...`: prepare the split, fit, evaluate, and build + promote the demo ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Train and evaluate triage models (demo models - NOT FOR CLINICAL USE).", no_args_is_help=True)

DEFAULT_MANIFEST = Path("/work/shared/data/cxr/manifest.csv")
DEFAULT_SPLIT = Path("artifacts/data/split_manifest.csv")


@app.command()
def prepare(
    manifest: Annotated[Path, typer.Option(help="manifest.csv (paths relative to its folder)")] = DEFAULT_MANIFEST,
    out: Annotated[Path, typer.Option(help="split manifest CSV to write (data card next to it)")] = DEFAULT_SPLIT,
    seed: int = 0,
    train: float = 0.7,
    valid: float = 0.15,
    test: float = 0.15,
) -> None:
    """Group-level, (source, label)-stratified train/valid/test split + data card."""
    from training.dataset import SplitFractions
    from training.dataset import prepare as do_prepare

    df = do_prepare(manifest, out, seed=seed, fractions=SplitFractions(train, valid, test))
    typer.echo(f"wrote {out} ({len(df)} rows): {df['split'].value_counts().to_dict()}")


@app.command()
def fit(
    split_csv: Annotated[Path, typer.Option("--split-csv", help="split manifest from `prepare`")] = DEFAULT_SPLIT,
    arch: str = "mobilenetv2_100",
    epochs: int = 18,
    size: int = 224,
    batch: int = 32,
    lr: Annotated[str, typer.Option(help="learning rate, or 'auto' for lr_find's suggestion")] = "auto",
    lr_find_iters: int = 60,
    threads: int = 2,
    seed: int = 42,
    pretrained_weights: Annotated[Path | None, typer.Option(help="local timm ImageNet checkpoint")] = None,
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    version: Annotated[str | None, typer.Option(help="version name (default <arch>-<date>-<n>)")] = None,
) -> None:
    """Train one architecture and register it as a candidate version."""
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
        pretrained_weights=str(pretrained_weights) if pretrained_weights else None,
    )
    name = do_fit(split_csv, out, cfg, version=version, log=typer.echo)
    typer.echo(name)


@app.command()
def evaluate(
    versions: Annotated[list[str], typer.Argument(help="model version(s); several = ensemble (mean probability)")],
    split_csv: Annotated[Path, typer.Option("--split-csv")] = DEFAULT_SPLIT,
    split: str = "test",
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    report_dir: Annotated[Path | None, typer.Option(help="default: models/versions/<first>/report")] = None,
    bootstrap: int = 1000,
    threads: int = 2,
    batch: int = 32,
) -> None:
    """Evaluate version(s) on a split; writes metrics.json, report.md and plots."""
    from training.evaluate import evaluate as do_evaluate

    result = do_evaluate(
        out,
        list(versions),
        split_csv,
        split=split,
        report_dir=report_dir,
        n_boot=bootstrap,
        threads=threads,
        batch_size=batch,
    )
    overall = result["overall"]
    typer.echo(f"accuracy {overall['accuracy']:.4f}  macro AUROC {overall['macro_auroc']}")


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
    arch: str = "mobilenetv2_100",
    epochs: int = 18,
    size: int = 224,
    batch: int = 32,
    threads: int = 2,
    lr_find_iters: int = 60,
    out: Annotated[Path, typer.Option(help="registry directory")] = Path("models"),
    bootstrap: int = 1000,
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


if __name__ == "__main__":
    app()
