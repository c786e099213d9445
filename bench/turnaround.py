"""Turnaround: seconds from each C-STORE response to the result being visible in the worklist API.

Starts the real service (listener, one worker, API) on a temporary home, sends N chest radiographs one by one with a
pynetdicom SCU (each a new study), polls the API for each study's prediction, and prints the distribution (p50, p95,
max) next to its floor, the worker's own decode + inference time for the same instances (SR and heatmap writing,
database and queue hops are what the ratio turnaround / worker time adds on top).
Run: `python -m bench.turnaround [--count 20] [--database-url postgresql+psycopg://HOST/any] [--broker-url URL]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

from bench.ingest import PostgresDatabase

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "cr_chest_siim_jpeg_baseline_8bit.dcm",
    "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm",
    "cr_chest_mono1_j2k_lossy_RG1_J2KI.dcm",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing on port {port}")


def shown_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it, else its name only."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else resolved.name


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def api_get(port: int, path: str, token: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between sends")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="registry with a promoted ensemble")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--broker-url", default="")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs) for inspection")
    parser.add_argument(
        "--inference-threads",
        type=int,
        default=1,
        help="CXR_INFERENCE_THREADS of the one worker (default 1, the setting's default; a worker alone on a host may "
        "use its cores)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="CXR_TRIAGE_BATCH_SIZE of the worker")
    parser.add_argument(
        "--backend", default="eager", choices=["eager", "channels-last", "onnx", "openvino"],
        help="CXR_INFERENCE_BACKEND of the worker",
    )  # fmt: skip
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="cxr-turnaround-"))
    # A PostgreSQL URL names the server: the run gets a fresh database there, dropped afterwards.
    database = PostgresDatabase(args.database_url) if args.database_url.startswith("postgresql") else None
    ports = {"dicom": free_port(), "api": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_HOME": str(home / "var"),
            "CXR_DATABASE_URL": database.url if database else args.database_url,
            "CXR_BROKER_URL": args.broker_url,
            "CXR_MODELS_DIR": str(args.models.resolve()),
            "CXR_PORT": str(ports["dicom"]),
            "CXR_API_PORT": str(ports["api"]),
            "CXR_OUTBOX_INTERVAL_S": "1",
            "CXR_INFERENCE_THREADS": str(args.inference_threads),
            "CXR_TRIAGE_BATCH_SIZE": str(args.batch_size),
            "CXR_INFERENCE_BACKEND": args.backend,
            "CXR_LOG_LEVEL": "INFO" if args.keep else "WARNING",
            "PYTHONPATH": str(ROOT),
        }
    )
    cli = [sys.executable, "-m", "service"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*cli, "users", "create", "bench", "--password-stdin"], env=env, input=b"bench-password\n", check=True,
        capture_output=True,
    )  # fmt: skip
    token = subprocess.run([*cli, "users", "token", "bench"], env=env, check=True, capture_output=True, text=True)
    api_token = token.stdout.strip().split()[-1]
    logs = (home / "service.log").open("wb")
    procs = [
        subprocess.Popen([*cli, name], env=env, stdout=logs, stderr=subprocess.STDOUT) for name in ("listener", "api")
    ]
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "gpu,cpu", "--pool", "solo",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
            env=env, stdout=logs, stderr=subprocess.STDOUT,
        )
    )  # fmt: skip
    try:
        wait_port(ports["dicom"])
        wait_port(ports["api"])
        turnaround, sent_at = run(args, ports, api_token)
        worker_ms = worker_times(env, sent_at)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if database is not None:
            database.drop()
    report(args, turnaround, worker_ms)
    if args.keep:
        print(f"kept {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)


def run(args: argparse.Namespace, ports: dict[str, int], token: str) -> tuple[list[float], dict[str, float]]:
    """Send the instances; returns turnaround seconds per instance and the send time per study UID."""
    sent_at: dict[str, float] = {}
    done_at: dict[str, float] = {}
    ae = AE(ae_title="BENCH")
    datasets = [pydicom.dcmread(ROOT / "tests" / "data" / "dicom" / name) for name in SOURCES]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", ports["dicom"], ae_title="CXRTRIAGE")
    if not assoc.is_established:
        raise RuntimeError("association with the listener failed")
    try:
        # Warm-up (not counted): the worker imports torch and loads the ensemble on its first task.
        warm = datasets[0]
        warm.StudyInstanceUID, warm.SOPInstanceUID = generate_uid(), generate_uid()
        warm.file_meta.MediaStorageSOPInstanceUID = warm.SOPInstanceUID
        assoc.send_c_store(warm)
        warm_sent, warm_done = {str(warm.StudyInstanceUID): time.monotonic()}, {}  # type: ignore[var-annotated]
        deadline = time.monotonic() + 180
        while not warm_done and time.monotonic() < deadline:
            poll(ports["api"], token, warm_sent, warm_done)
            time.sleep(0.1)
        for i in range(args.count):
            ds = datasets[i % len(datasets)]
            ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            status = assoc.send_c_store(ds)
            sent_at[str(ds.StudyInstanceUID)] = time.monotonic()
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE failed: {status}")
            poll(ports["api"], token, sent_at, done_at)
            time.sleep(args.interval)
    finally:
        assoc.release()
    deadline = time.monotonic() + 60 + 10 * args.count
    while len(done_at) < len(sent_at) and time.monotonic() < deadline:
        poll(ports["api"], token, sent_at, done_at)
        time.sleep(0.05)
    if len(done_at) < len(sent_at):
        raise RuntimeError(f"only {len(done_at)} of {len(sent_at)} results became visible")
    return [done_at[uid] - sent_at[uid] for uid in sent_at], sent_at


def poll(port: int, token: str, sent_at: dict[str, float], done_at: dict[str, float]) -> None:
    page = api_get(port, "/api/worklist?limit=200", token)
    now = time.monotonic()
    for item in page["items"]:
        uid = item["study_instance_uid"]
        if uid in sent_at and uid not in done_at and item.get("label"):
            done_at[uid] = now


def worker_times(env: dict[str, str], sent_at: dict[str, float]) -> list[float]:
    """Decode + inference per prediction, from the database (the worker's own floor); the warm-up is dropped."""
    code = (
        "import json,sys\n"
        "from sqlalchemy import select\n"
        "from cxr_triage.settings import get_settings\n"
        "from db.models import Prediction\n"
        "from db.session import session_scope\n"
        "with session_scope(get_settings().effective_database_url) as s:\n"
        "    rows = s.scalars(select(Prediction).order_by(Prediction.id)).all()[1:]\n"
        "    print(json.dumps([p.decode_ms + p.inference_ms for p in rows]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return [float(v) for v in json.loads(out.stdout)]


def report(args: argparse.Namespace, turnaround: list[float], worker_ms: list[float]) -> None:
    worker_s = [v / 1000 for v in worker_ms]
    rows = [("turnaround (C-STORE response -> visible in API)", turnaround), ("worker decode + inference", worker_s)]
    print(f"cxr-triage turnaround: {len(turnaround)} instances, {os.cpu_count()} cores, "
          f"database {args.database_url or 'SQLite'}, broker {args.broker_url or 'filesystem'}, "
          f"worker: {args.backend}, {args.inference_threads} inference thread(s), batch {args.batch_size}")  # fmt: skip
    print(f"{'measure':50} {'p50 s':>8} {'p95 s':>8} {'max s':>8}")
    for name, values in rows:
        print(f"{name:50} {percentile(values, 0.5):8.3f} {percentile(values, 0.95):8.3f} {max(values):8.3f}")
    ratio = statistics.median(turnaround) / statistics.median(worker_s)
    print(f"ratio turnaround / worker time (medians): {ratio:.1f}")
    out = args.out or ROOT / "bench" / "results" / f"turnaround-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "turnaround",
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "count": len(turnaround),
                "database": args.database_url or "sqlite",
                "broker": args.broker_url or "filesystem",
                "inference_threads": args.inference_threads,
                "batch_size": args.batch_size,
                "backend": args.backend,
                # the registry as given, relative to the repository when it is in it (no host paths in results)
                "models": shown_path(args.models),
                "turnaround_s": turnaround,
                "worker_s": worker_s,
                "p50_s": percentile(turnaround, 0.5),
                "p95_s": percentile(turnaround, 0.95),
                "ratio_to_worker_median": ratio,
            },
            indent=2,
        )
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
