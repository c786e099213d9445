"""The `cxr-triage` command: run the parts, migrate the database, inspect instances and the model registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cxr_triage.labels import DEMO_DISCLAIMER
from cxr_triage.logs import configure_logging, get_logger
from cxr_triage.registry import Registry, RegistryError
from cxr_triage.settings import get_settings
from service.shadow_cli import shadow_app
from worklist.cli import audit_app, users_app
from worklist.cli import serve as serve_api

app = typer.Typer(help="cxr-triage: chest radiograph triage next to a PACS. Demo model: not for clinical use.")
db_app = typer.Typer(help="Database schema.")
models_app = typer.Typer(help="The model registry.")
sr_app = typer.Typer(help="Structured Reports we wrote.")
app.add_typer(sr_app, name="sr")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
models_app.add_typer(shadow_app, name="shadow")
spool_app = typer.Typer(help="The spool of received instances.")
app.add_typer(spool_app, name="spool")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.command("api")(serve_api)
console = Console()
log = get_logger(__name__)


def _setup(component: str) -> None:
    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, component=component)
    settings.home.mkdir(parents=True, exist_ok=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the latest revision."""
    from db.migrate import upgrade

    _setup("db")
    upgrade(get_settings().effective_database_url)
    console.print("database at head")


@app.command()
def listener() -> None:
    """Run the DICOM listener (C-ECHO, C-STORE) with its outbox."""
    from db.migrate import upgrade
    from listener.server import ListenerConfigError, check_exposure, run

    _setup("listener")
    settings = get_settings()
    try:
        check_exposure(settings)
    except ListenerConfigError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc
    upgrade(settings.effective_database_url)
    run(settings)


@app.command()
def worker(
    queues: str = typer.Option(
        "gpu,cpu,backlog,training",
        help="Queues to consume, in the order a free worker takes from them (backlog is added to any list with gpu).",
    ),
    concurrency: int = typer.Option(1, help="Worker processes."),
) -> None:
    """Run a Celery worker (same as `celery -A workers.celery_app worker -Q gpu,cpu,backlog,training`)."""
    _setup("worker")
    from workers.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


@app.command()
def run() -> None:
    """Embedded run: migrate, then start the listener and a worker as separate processes; Ctrl-C stops both.

    A part that exits is restarted (with a pause), so a crash never leaves the service half up.
    """
    from db.migrate import upgrade
    from listener.server import ListenerConfigError, check_exposure

    _setup("supervisor")
    settings = get_settings()
    try:
        check_exposure(settings)  # before any part starts: a refused listener would be restarted forever
    except ListenerConfigError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc
    upgrade(settings.effective_database_url)
    registry = Registry(settings.models_dir)
    promoted = registry.promoted_name()
    console.print(f"[bold]cxr-triage[/bold] - {DEMO_DISCLAIMER}")
    console.print(f"  DICOM listener: AE title {settings.ae_title} on {settings.bind_address}:{settings.port}")
    console.print(f"  database: {settings.effective_database_url}")
    console.print(f"  broker: {settings.effective_broker_url}  spool: {settings.effective_spool_dir}")
    console.print(f"  promoted model set: {promoted or 'none (instances wait as awaiting_model)'}")
    console.print(f"  worklist page: http://{settings.api_host}:{settings.api_port}/ (users: cxr-triage users create)")
    commands = {
        "listener": [sys.executable, "-m", "service", "listener"],
        "worker": [sys.executable, "-m", "service", "worker"],
        "api": [sys.executable, "-m", "service", "api"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
    stopping = False

    def _stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stopping:
        time.sleep(0.5)
        for name, proc in list(procs.items()):
            if proc.poll() is not None and not stopping:
                log.warning("supervisor.restart", part=name, exit_code=proc.returncode)
                time.sleep(2)
                procs[name] = subprocess.Popen(commands[name])
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@app.command()
def status(limit: int = typer.Option(20, help="Most recent instances to list.")) -> None:
    """Counts per status and the most recent instances (no patient data)."""
    from sqlalchemy import select

    from db.models import Instance
    from db.repo import status_counts
    from db.session import session_scope

    settings = get_settings()
    with session_scope(settings.effective_database_url) as session:
        counts = status_counts(session)
        rows = session.scalars(select(Instance).order_by(Instance.id.desc()).limit(limit)).all()
        table = Table("id", "SOP Instance UID", "modality", "status", "reason / label")
        for row in rows:
            table.add_row(str(row.id), row.sop_instance_uid, row.modality or "", row.status, row.status_reason or "")
    console.print(json.dumps(counts, sort_keys=True))
    console.print(table)


@app.command()
def health(listener: bool = typer.Option(True, help="Also C-ECHO the listener.")) -> None:
    """Check database, broker, spool, promoted model and listener; prints JSON, exits 1 if any check fails."""
    from infra.health import run_checks

    checks = run_checks(get_settings(), listener=listener)
    console.print_json(json.dumps({c.name: {"ok": c.ok, "detail": c.detail} for c in checks}))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command("outbox")
def outbox_flush() -> None:
    """Send every instance that is due (never queued, stale, or awaiting a model that now exists)."""
    from listener.dispatch import Dispatcher

    _setup("outbox")
    sent = Dispatcher(get_settings()).flush_outbox()
    console.print(f"sent {sent}")


@spool_app.command("prune")
def spool_prune() -> None:
    """Apply the retention policy now (CXR_SPOOL_RETENTION_DAYS, CXR_SPOOL_MAX_BYTES); the listener does so hourly."""
    from listener.retention import prune_spool

    _setup("spool")
    pruned = prune_spool(get_settings())
    console.print(f"removed {pruned.files} spool file(s), {pruned.bytes / 1e6:.1f} MB")


@models_app.command("list")
def models_list() -> None:
    """Model versions and ensembles; the promoted one is marked."""
    registry = Registry(get_settings().models_dir)
    promoted = registry.promoted_name()
    table = Table("version", "architecture", "size", "status", "initial weights", "licence", "weights file")
    for version in registry.versions():
        card = registry.card(version)
        init = card.initial_weights or {"kind": "scratch"}
        origin = init.get("distribution") or init.get("file") or "from scratch"
        has_weights = (registry.version_dir(version) / "model.safetensors").is_file()
        table.add_row(version, card.architecture, str(card.input_size), card.status, origin, init.get("licence", ""),
                      "yes" if has_weights else "no (card and report only)")  # fmt: skip
    console.print(table)
    for name in registry.ensembles():
        spec = registry.ensemble(name)
        mark = " (promoted)" if name == promoted else ""
        tuned = sum(1 for m in spec.members if registry.card(m).initial_weights.get("kind") not in (None, "scratch"))
        extra = f"; {tuned} of {len(spec.members)} fine-tuned from ImageNet" if tuned else ""
        if spec.operating_point:
            extra += f"; T={spec.temperature}, STAT >= {spec.operating_point['stat_threshold']}"
        if spec.ood:
            extra += f"; OOD detector on {spec.ood['member']}"
        console.print(f"ensemble {name}{mark}: {', '.join(spec.members)}{extra}")


@models_app.command("prune")
def models_prune() -> None:
    """Keep weights only for the promoted ensemble and the one before it (rollback); cards and reports stay."""
    registry = Registry(get_settings().models_dir)
    removed = registry.prune_weights()
    console.print(f"removed the weights of {len(removed)} version(s): {', '.join(removed) or '-'}")


@models_app.command("show")
def models_show(version: str) -> None:
    """Print a model card."""
    try:
        card = Registry(get_settings().models_dir).card(version)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print_json(json.dumps(card.to_json()))


@models_app.command("promote")
def models_promote(ensemble: str, reason: str = typer.Option("promoted by hand", help="Why.")) -> None:
    """Point the service at ensemble ENSEMBLE; running workers switch between tasks, no restart.

    The set is loaded first (on CPU, by the workers' loader): one that does not load is refused with exit status 1
    and the pointer stays where it was.
    """
    import torch

    from cxr_triage.registry import EnsembleSpec, PromotionRefused
    from workers.ensemble import load_ensemble

    registry = Registry(get_settings().models_dir)

    def loads(spec: EnsembleSpec) -> None:
        load_ensemble(registry, spec.name, torch.device("cpu"))

    try:
        registry.promote(ensemble, reason=reason, verify=loads)
    except PromotionRefused as exc:
        typer.echo(str(exc), err=True)  # one line, unwrapped
        raise typer.Exit(1) from exc
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"promoted {ensemble}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Re-promote the previously promoted ensemble."""
    try:
        name = Registry(get_settings().models_dir).rollback()
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"rolled back to {name}")


@sr_app.command("show")
def sr_show(path: Path) -> None:
    """Print a stored SR in plain words (finding, probabilities, algorithm, source image)."""
    import pydicom

    from workers.sr import describe_sr

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from exc
    if ds.get("Modality") != "SR":
        raise typer.BadParameter(f"{path} is not a Structured Report (Modality {ds.get('Modality')})")
    for line in describe_sr(ds):
        console.print(line, highlight=False)


def main() -> None:
    """Console entry point; `cxr-triage training ...` loads the (heavier) training package on demand."""
    if len(sys.argv) > 1 and sys.argv[1] == "training":
        from service.feedback_cli import export_feedback
        from training.cli import app as training_app

        training_app.command("export-feedback")(export_feedback)

        app.add_typer(training_app, name="training", help="Dataset, training, evaluation, promotion gate.")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
