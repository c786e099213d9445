"""The fault suite: the real service under failing parts, and what it lost or did twice.

Starts its own PostgreSQL cluster, Redis server and Orthanc (the PACS that receives the SRs and heatmaps), then the
listener and two Celery workers (`cxr-triage listener`, `celery -A workers.celery_app worker -Q gpu,cpu`) with the
production defaults for heartbeats and re-sends, and runs each scenario on a fresh database:

- worker-kill: a worker is `kill -9`ed in the middle of a task, 10 times, and restarted;
- redis-empty: Redis is stopped for 30 s in the middle of a 200-instance send and restarted empty;
- postgres-restart: PostgreSQL restarts while instances are being processed;
- listener-kill: the listener is `kill -9`ed in the middle of an association; the sender re-sends what failed;
- disk-watermark: the spool is below the free-space watermark; the sender retries once it is not.

Each instance is its own study (so duplicate SRs at the PACS can be counted per study). For each scenario it prints
sent, acknowledged (C-STORE Success), triaged exactly once, lost (acknowledged but not triaged when the scenario
ends), duplicate predictions, duplicate SRs at the PACS, and the recovery time (from the end of the fault until
every acknowledged instance was triaged and its SR was at the PACS).

The models are a tiny random-weight set (the suite measures integrity, not accuracy, and must fit a 2-core machine);
`--models DIR` runs the shipped ensemble instead. Run: `python -m bench.faults.run [--scenario NAME ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from bench.turnaround import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "data" / "dicom" / "cr_chest_siim_jpeg_baseline_8bit.dcm"
STORESCU_CFG = ROOT / "deploy" / "dcmtk" / "storescu.cfg"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
AE_TITLE = "CXRTRIAGE"


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


# --- the parts ----------------------------------------------------------------------------------------------------


class Postgres:
    """A private PostgreSQL cluster (trust auth, loopback), so that restarting it touches nothing else."""

    def __init__(self, root: Path) -> None:
        self.data = root / "pgdata"
        self.port = free_port()
        self.data.mkdir(parents=True)
        shutil.chown(root, "postgres")
        shutil.chown(self.data, "postgres")
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._pg("pg_ctl", "-D", str(self.data), "-o", opts, "-w", "-l", str(self.data / "log"), "start")

    def restart(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.start()

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres", isolation_level="AUTOCOMMIT"
        )
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


class Redis:
    """A Redis server that keeps nothing on disk: a restart is a restart empty."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.root)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class Service:
    """Listener and workers of one scenario, on its own home, database and Redis database."""

    home: Path
    env: dict[str, str]
    listener: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = (self.home / f"{name}.log").open("ab")
        return subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def start_listener(self) -> None:
        self.listener = self._spawn("listener", [sys.executable, "-m", "service", "listener"])
        wait_port(int(self.env["CXR_PORT"]))

    def start_worker(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "gpu,cpu", "--pool",
                "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel", "WARNING"]  # fmt: skip
        worker = self._spawn(f"worker{len(self.workers)}", args)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for proc in [self.listener, *self.workers]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [self.listener, *self.workers]:
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


# --- instances, sending, counting -----------------------------------------------------------------------------------


def make_instances(folder: Path, count: int) -> dict[str, Path]:
    """`count` chest radiographs, each its own study; SOP Instance UID -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(SOURCE)
    made: dict[str, Path] = {}
    for i in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = f"Fault^Case{i}", f"FAULT{i:04d}"
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path)
        made[str(ds.SOPInstanceUID)] = path
    return made


def storescu(port: int, files: list[Path], timeout: float = 600) -> set[str]:
    """Send `files` on one association; returns the SOP Instance UIDs answered with Success."""
    if not files:
        return set()
    cmd = ["/usr/bin/storescu", "-v", "-aet", "FAULTS", "-aec", AE_TITLE, "-to", "30", "-ta", "30", "-td", "60",
           "-xf", str(STORESCU_CFG), "CXR", "127.0.0.1", str(port), *map(str, files)]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        output = result.stderr + result.stdout
    except subprocess.TimeoutExpired as exc:
        output = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
    acknowledged: set[str] = set()
    current: str | None = None
    uid_of = {str(f): uid for uid, f in _uids(files).items()}
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = uid_of.get(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.add(current)
    return acknowledged


def _uids(files: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}


@dataclass
class Counts:
    done: set[str]
    predictions: dict[str, int]
    srs_per_study: dict[str, int]


def counts(database_url: str, orthanc: Any) -> Counts:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            done = {str(r[0]) for r in conn.execute(text("SELECT sop_instance_uid FROM instances WHERE status='done'"))}
            rows = conn.execute(
                text(
                    "SELECT i.sop_instance_uid, count(p.id) FROM instances i JOIN predictions p "
                    "ON p.instance_id = i.id WHERE p.superseded_at IS NULL GROUP BY i.sop_instance_uid"
                )
            )
            predictions = {str(uid): int(n) for uid, n in rows}
    except Exception:  # the database is down in the middle of a scenario
        return Counts(set(), {}, {})
    finally:
        engine.dispose()
    srs: dict[str, int] = {}
    try:
        query = json.dumps({"Level": "Series", "Query": {"Modality": "SR"}, "Expand": True}).encode()
        for series in orthanc.post("/tools/find", query):
            study = _study_uid(orthanc, series["ParentStudy"])
            srs[study] = srs.get(study, 0) + len(series.get("Instances", []))
    except OSError:
        pass
    return Counts(done, predictions, srs)


_STUDY_UIDS: dict[str, str] = {}


def _study_uid(orthanc: Any, orthanc_id: str) -> str:
    if orthanc_id not in _STUDY_UIDS:
        _STUDY_UIDS[orthanc_id] = str(orthanc.get(f"/studies/{orthanc_id}")["MainDicomTags"]["StudyInstanceUID"])
    return _STUDY_UIDS[orthanc_id]


@dataclass
class Result:
    scenario: str
    sent: int
    acknowledged: int
    triaged_once: int
    lost: int
    duplicate_predictions: int
    duplicate_srs_at_pacs: int
    recovery_s: float | None
    note: str = ""


# --- the scenarios ----------------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, work: Path, models: Path | None, settings: dict[str, str] | None = None) -> None:
        from tests.orthanc import Orthanc

        self.work = work
        self.pg = Postgres(work / "pg")
        self.redis = Redis(work)
        self.orthanc = Orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port(), triage_aet=AE_TITLE,
                               triage_port=free_port())  # fmt: skip
        self.orthanc.start()
        if models is None:
            from tests.conftest import make_tiny_registry

            models = work / "models"
            make_tiny_registry(models)
        self.models = models
        self.settings = settings or {}
        self.n = 0

    def close(self) -> None:
        self.orthanc.stop()
        self.redis.stop()
        self.pg.stop()

    def service(self, name: str, **overrides: str) -> tuple[Service, str]:
        self.n += 1
        home = self.work / name
        home.mkdir()
        database_url = self.pg.create_database(f"faults_{self.n}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(
            {
                "CXR_HOME": str(home / "var"),
                "CXR_DATABASE_URL": database_url,
                "CXR_BROKER_URL": f"redis://127.0.0.1:{self.redis.port}/{self.n}",
                "CXR_MODELS_DIR": str(self.models),
                "CXR_PORT": str(free_port()),
                "CXR_AE_TITLE": AE_TITLE,
                "CXR_RESULTS_DESTINATION_AET": "ORTHANC",
                "CXR_RESULTS_DESTINATION_HOST": "127.0.0.1",
                "CXR_RESULTS_DESTINATION_PORT": str(self.orthanc.dicom_port),
                "CXR_RESULTS_RETRY_BASE_S": "2",
                "CXR_LOG_LEVEL": "INFO",
                "PYTHONPATH": str(ROOT),
                **self.settings,
                **{f"CXR_{k.upper()}": v for k, v in overrides.items()},
            }
        )
        service = Service(home, env)
        service.start_listener()
        service.start_worker()
        service.start_worker()
        return service, database_url

    def settle(self, database_url: str, expected: set[str], timeout: float) -> float | None:
        """Seconds until every expected instance is done and its study has its SR at the PACS; None on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            now = counts(database_url, self.orthanc)
            if expected <= now.done:
                studies = self._studies(database_url, expected)
                if all(now.srs_per_study.get(study, 0) >= 1 for study in studies):
                    return time.monotonic() - started
            time.sleep(1)
        return None

    def result(self, name: str, database_url: str, sent: int, acknowledged: set[str], recovery: float | None,
               note: str = "") -> Result:  # fmt: skip
        final = counts(database_url, self.orthanc)
        studies = self._studies(database_url, acknowledged)
        return Result(
            scenario=name,
            sent=sent,
            acknowledged=len(acknowledged),
            triaged_once=sum(1 for uid in acknowledged if uid in final.done and final.predictions.get(uid) == 1),
            lost=len(acknowledged - final.done),
            duplicate_predictions=sum(max(0, final.predictions.get(uid, 0) - 1) for uid in acknowledged),
            duplicate_srs_at_pacs=sum(max(0, final.srs_per_study.get(s, 0) - 1) for s in studies),
            recovery_s=round(recovery, 1) if recovery is not None else None,
            note=note,
        )

    def _studies(self, database_url: str, sops: set[str]) -> set[str]:
        from sqlalchemy import create_engine, text

        engine = create_engine(database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT i.sop_instance_uid, s.study_instance_uid FROM instances i "
                        "JOIN studies s ON s.id = i.study_id"
                    )
                )
                return {str(study) for sop, study in rows if sop in sops}
        finally:
            engine.dispose()

    # Each scenario returns its Result.

    def worker_kill(self, kills: int = 10) -> Result:
        service, url = self.service("worker-kill")
        files = make_instances(self.work / "worker-kill-data", 40)
        acknowledged: set[str] = set()
        sender = threading.Thread(
            target=lambda: acknowledged.update(storescu(int(service.env["CXR_PORT"]), list(files.values())))
        )
        sender.start()
        done_kills = 0
        deadline = time.monotonic() + 600
        while done_kills < kills and time.monotonic() < deadline:
            if _processing(url):
                victim = random.choice([w for w in service.workers if w.poll() is None])
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                service.workers.remove(victim)
                service.start_worker()
                done_kills += 1
                time.sleep(random.uniform(0.5, 3.0))
            else:
                time.sleep(0.05)
        sender.join()
        recovery = self.settle(url, acknowledged, 600)
        result = self.result("worker-kill", url, len(files), acknowledged, recovery, f"{done_kills} kill -9 mid-task")
        service.stop()
        return result

    def redis_empty(self, count: int = 200, outage_s: float = 30.0) -> Result:
        service, url = self.service("redis-empty")
        files = make_instances(self.work / "redis-empty-data", count)
        acknowledged: set[str] = set()
        sender = threading.Thread(
            target=lambda: acknowledged.update(storescu(int(service.env["CXR_PORT"]), list(files.values())))
        )
        sender.start()
        _wait(lambda: len(counts(url, self.orthanc).done) >= count // 5, 300)
        self.redis.stop()
        log(f"redis stopped for {outage_s:.0f} s")
        time.sleep(outage_s)
        self.redis.start()
        log("redis restarted empty")
        restored = time.monotonic()
        sender.join()
        recovery = self.settle(url, acknowledged, 900)
        measured = time.monotonic() - restored if recovery is not None else None
        result = self.result("redis-empty", url, count, acknowledged, measured,
                             f"Redis down {outage_s:.0f} s mid-send, restarted empty")  # fmt: skip
        service.stop()
        return result

    def postgres_restart(self, count: int = 60) -> Result:
        service, url = self.service("postgres-restart")
        files = make_instances(self.work / "postgres-restart-data", count)
        port = int(service.env["CXR_PORT"])
        acknowledged = storescu(port, list(files.values()))
        _wait(lambda: len(counts(url, self.orthanc).done) >= count // 4, 300)
        self.pg.restart()
        log("postgres restarted")
        restored = time.monotonic()
        # What the listener refused while the database was away, the sender sends again.
        acknowledged |= storescu(port, [f for uid, f in files.items() if uid not in acknowledged])
        recovery = self.settle(url, acknowledged, 600)
        measured = time.monotonic() - restored if recovery is not None else None
        result = self.result("postgres-restart", url, count, acknowledged, measured, "restart -m fast mid-processing")
        service.stop()
        return result

    def listener_kill(self, count: int = 50) -> Result:
        service, url = self.service("listener-kill")
        files = make_instances(self.work / "listener-kill-data", count)
        port = int(service.env["CXR_PORT"])
        acknowledged: set[str] = set()
        sender = threading.Thread(target=lambda: acknowledged.update(storescu(port, list(files.values()))))
        sender.start()
        _wait(lambda: len(_rows(url)) >= count // 3, 120)
        assert service.listener is not None
        os.kill(service.listener.pid, signal.SIGKILL)
        service.listener.wait()
        log("listener killed mid-association")
        sender.join()
        first = len(acknowledged)
        service.start_listener()
        restored = time.monotonic()
        acknowledged |= storescu(port, [f for uid, f in files.items() if uid not in acknowledged])  # the retry
        recovery = self.settle(url, acknowledged, 600)
        measured = time.monotonic() - restored if recovery is not None else None
        result = self.result("listener-kill", url, count, acknowledged, measured,
                             f"{first} acknowledged before the kill, the rest on the sender's retry")  # fmt: skip
        service.stop()
        return result

    def disk_watermark(self, count: int = 10) -> Result:
        free = shutil.disk_usage(self.work).free
        service, url = self.service("disk-watermark", min_free_bytes=str(free + 10**9))
        files = make_instances(self.work / "disk-watermark-data", count)
        port = int(service.env["CXR_PORT"])
        refused = storescu(port, list(files.values()))
        rows_while_full = len(_rows(url))
        service.stop()
        service.env["CXR_MIN_FREE_BYTES"] = str(10**9)  # space freed: the site's normal watermark
        service.listener, service.workers = None, []
        service.start_listener()
        service.start_worker()
        service.start_worker()
        restored = time.monotonic()
        acknowledged = refused | storescu(port, list(files.values()))  # the sender's retry
        recovery = self.settle(url, acknowledged, 300)
        measured = time.monotonic() - restored if recovery is not None else None
        note = f"{len(refused)} acknowledged and {rows_while_full} stored while below the watermark"
        result = self.result("disk-watermark", url, count, acknowledged, measured, note)
        service.stop()
        return result


def _rows(url: str) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(text("SELECT sop_instance_uid FROM instances"))]
    except Exception:
        return []
    finally:
        engine.dispose()


def _processing(url: str) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(text("SELECT count(*) FROM instances WHERE status='processing'")).scalar())
    except Exception:
        return False
    finally:
        engine.dispose()


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.5)


SCENARIOS = ("worker-kill", "redis-empty", "postgres-restart", "listener-kill", "disk-watermark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="Run only these (repeatable).")
    parser.add_argument("--models", type=Path, help="A model registry (default: a tiny random-weight set).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Where the JSON report goes.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs) for inspection.")
    parser.add_argument("--batch-size", type=int, default=1, help="CXR_TRIAGE_BATCH_SIZE of the workers.")
    parser.add_argument("--backend", default="eager", help="CXR_INFERENCE_BACKEND of the workers.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-faults-"))
    work.chmod(0o755)  # the PostgreSQL cluster runs as user postgres
    suite = Suite(
        work,
        args.models,
        {"CXR_TRIAGE_BATCH_SIZE": str(args.batch_size), "CXR_INFERENCE_BACKEND": args.backend},
    )
    results: list[Result] = []
    try:
        for name in args.scenario or SCENARIOS:
            log(f"scenario {name}")
            results.append(getattr(suite, name.replace("-", "_"))())
            log(json.dumps(asdict(results[-1])))
    finally:
        suite.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    header = ("scenario", "sent", "acked", "triaged once", "lost", "dup. predictions", "dup. SRs at PACS", "recovery s")
    rows = [(r.scenario, r.sent, r.acknowledged, r.triaged_once, r.lost, r.duplicate_predictions,
             r.duplicate_srs_at_pacs, "-" if r.recovery_s is None else r.recovery_s) for r in results]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for line in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))
    for r in results:
        print(f"  {r.scenario}: {r.note}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"faults-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    config = {"batch_size": args.batch_size, "backend": args.backend}
    report.write_text(json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"report: {report}")
    if any(r.lost or r.duplicate_predictions or r.duplicate_srs_at_pacs for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
