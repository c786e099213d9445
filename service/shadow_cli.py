"""`cxr-triage models shadow start|stop|status|report`: a candidate model set on live traffic, stored, never used."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console

from cxr_triage.priority import Rules
from cxr_triage.registry import EnsembleSpec, Registry, RegistryError
from cxr_triage.settings import get_settings
from cxr_triage.shadow import ShadowReport, render_text, summarise

shadow_app = typer.Typer(help="Shadow mode: a candidate set runs beside the promoted one; its predictions are stored "
                         "for comparison, never used for priority, never sent to the PACS.")  # fmt: skip
console = Console()


@shadow_app.command("start")
def shadow_start(ensemble: str) -> None:
    """Run ENSEMBLE in shadow mode from the next task on (running workers pick it up, no restart).

    The set is loaded first (on CPU, by the workers' loader); one that does not load is refused with exit status 1.
    """
    import torch

    from workers.ensemble import load_ensemble

    registry = Registry(get_settings().models_dir)

    def loads(spec: EnsembleSpec) -> None:
        load_ensemble(registry, spec.name, torch.device("cpu"))

    try:
        registry.start_shadow(ensemble, verify=loads)
    except RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    console.print(f"shadow mode: {ensemble} runs beside {registry.promoted_name() or '(nothing promoted)'}")


@shadow_app.command("stop")
def shadow_stop() -> None:
    """End shadow mode (its stored predictions and reports stay)."""
    name = Registry(get_settings().models_dir).stop_shadow()
    console.print(f"shadow mode stopped for {name}" if name else "no set was in shadow mode")


@shadow_app.command("status")
def shadow_status() -> None:
    """Which set runs in shadow mode, since when, and the earlier periods."""
    registry = Registry(get_settings().models_dir)
    name = registry.shadow_name()
    console.print(f"in shadow mode: {name} since {registry.shadow_started_at()}" if name else "no set in shadow mode")
    for period in registry.shadow_history():
        console.print(f"  {period['ensemble']}: {period['started_at']} .. {period.get('stopped_at') or 'now'}")


def build_report(ensemble: str | None = None, since: datetime | None = None) -> ShadowReport:
    """The shadow report of ENSEMBLE (default: the set in shadow mode now) from the database."""
    from db.feedback_repo import confirmed_by_instance
    from db.session import session_scope
    from db.shadow_repo import shadow_pairs

    settings = get_settings()
    registry = Registry(settings.models_dir)
    name = ensemble or registry.shadow_name() or (registry.shadow_history() or [{}])[-1].get("ensemble")
    if not name:
        raise RegistryError("no set is or was in shadow mode; name one")
    with session_scope(settings.effective_database_url) as session:
        pairs, shadow_only = shadow_pairs(session, name, since=since, confirmed=confirmed_by_instance(session))

    def rules_for(point: dict[str, float] | None) -> Rules:
        return Rules.from_settings(settings, point)

    return summarise(name, pairs, rules_for, shadow_only=shadow_only)


@shadow_app.command("report")
def shadow_report(
    ensemble: str | None = typer.Argument(None, help="Shadow set (default: the one running, else the last)."),
    since: datetime | None = typer.Option(None, help="Only cases from this time on (ISO 8601)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    plot: Path | None = typer.Option(None, help="Also draw the report to this PNG (needs the training extra)."),
    record: bool = typer.Option(True, help="Keep the report in the registry, where `training gate` reads it."),
) -> None:
    """Agreement with the promoted set, label and priority flips, STAT rates, latency and calibration."""
    try:
        report = build_report(ensemble, since)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(render_text(report), highlight=False)
    payload = report.to_json()
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if record:
        path = Registry(get_settings().models_dir).write_shadow_report(report.shadow_set, payload)
        console.print(f"recorded: {path}")
    if plot is not None:
        draw_report(report, plot)
        console.print(f"plot: {plot}")


def draw_report(report: ShadowReport, out: Path) -> None:
    """Two panels: live x shadow label counts, and the label flips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report.confusion)
    grid = [[report.confusion[a].get(b, 0) for b in labels] for a in labels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.imshow(grid, cmap="Blues")
    left.set_xticks(range(len(labels)), labels, rotation=20)
    left.set_yticks(range(len(labels)), labels)
    left.set_xlabel(f"shadow: {report.shadow_set}")
    left.set_ylabel(f"live: {', '.join(report.live_sets)}")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            left.text(j, i, str(value), ha="center", va="center")
    agreement = "n/a" if report.agreement is None else f"{100 * report.agreement:.1f}%"
    left.set_title(f"{report.cases} cases, agreement {agreement}")
    flips = list(report.flips.items()) or [("no label flips", 0)]
    right.barh([k for k, _ in flips], [v for _, v in flips], color="tab:orange")
    right.invert_yaxis()
    stat = (
        f"STAT rate live {100 * (report.stat_rate_live or 0):.1f}% / shadow {100 * (report.stat_rate_shadow or 0):.1f}%"
    )
    right.set_title(stat)
    right.set_xlabel("cases")
    fig.suptitle("Shadow report (demo models: not for clinical use)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
