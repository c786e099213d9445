"""Ingest benchmark: dcmtk storescu -> our listener vs. dcmtk storescp, 1 and 4 concurrent associations.

Usage (from the repository root):  python -m bench.ingest [--count 40] [--repeat 3] [--intake chest|skip]
                                                          [--files DIR] [--database-url URL] [--broker-url URL]

Both targets get the same files over the same dcmtk storescu profile (deploy/dcmtk/storescu.cfg, "CXR"). Each
measurement starts a fresh target (fresh spool / output directory, fresh SQLite database or a fresh PostgreSQL
database) so no run hits the duplicate fast path. The time is from the start of the first storescu to the end
of the last; every run is checked to have stored every file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DICOM_DIR = ROOT / "tests" / "data" / "dicom"
STORESCU_CFG = ROOT / "deploy" / "dcmtk" / "storescu.cfg"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
AE_TITLE = "CXRTRIAGE"
CALLING_AET = "BENCHSCU"
ASSOCIATION_COUNTS = (1, 4)

# Real CR films from tests/data/dicom, all 16-bit and >= 1576x1976; decoded they are 6.2-7.2 MB each. (The hip
# film, 12-bit JPEG Extended, is left out: no installed plugin decodes it.)
SOURCE_FILMS = (
    "cr_extremity_mono1_rle_RG3_RLE.dcm",
    "cr_extremity_mono1_j2k_lossless_RG3_J2KR.dcm",
    "cr_chest_mono1_j2k_lossy_RG1_J2KI.dcm",
    "cr_dental_mono1_jpeg_lossless_modality_lut_seq.dcm",
)


@dataclass
class Run:
    target: str
    associations: int
    seconds: float
    stored: int


@dataclass
class Result:
    target: str
    associations: int
    files: int
    megabytes: float
    seconds_median: float
    files_per_s: float
    mb_per_s: float
    seconds_all: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- input set


def generate_inputs(out_dir: Path, count: int, intake: str) -> list[Path]:
    """`count` Explicit VR Little Endian copies of the decoded source films, each with new UIDs."""
    with warnings.catch_warnings():  # the RG* films carry an invalid sample UID (999.999...); not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        return _generate_inputs(out_dir, count, intake)


def _generate_inputs(out_dir: Path, count: int, intake: str) -> list[Path]:
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    decoded = []
    for name in SOURCE_FILMS:
        ds = dcmread(DICOM_DIR / name)
        ds.decompress()  # -> Explicit VR Little Endian, native pixel data
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        decoded.append(ds)
    files = []
    for i in range(count):
        ds = decoded[i % len(decoded)]
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "CR"
        if intake == "chest":
            ds.BodyPartExamined = "CHEST"
            ds.ViewPosition = "PA"
        else:  # outside the intake policy: stored and recorded as skipped, not queued
            ds.BodyPartExamined = "EXTREMITY"
            ds.ViewPosition = "AP"
        path = out_dir / f"bench-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# --------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_echo(port: int, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    """Wait until a C-ECHO to the target succeeds (the target is fully up, not only listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode} before answering C-ECHO on {port}")
        echo = subprocess.run(
            [ECHOSCU, "-aet", CALLING_AET, "-aec", AE_TITLE, "-to", "5", "127.0.0.1", str(port)],
            capture_output=True,
            check=False,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no C-ECHO answer on port {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send(port: int, files: list[Path], associations: int) -> float:
    """Send `files` with `associations` concurrent storescu processes (one association each); seconds taken."""
    shares = [files[k::associations] for k in range(associations)]
    base = [STORESCU, "-aet", CALLING_AET, "-aec", AE_TITLE, "-xf", str(STORESCU_CFG), "CXR"]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*base, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for share in shares
        if share
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    elapsed = time.perf_counter() - started
    for proc, output in zip(procs, outputs, strict=True):
        text = output.decode(errors="replace")
        if proc.returncode != 0 or "E:" in text:
            raise RuntimeError(f"storescu failed (exit {proc.returncode}):\n{text}")
    return elapsed


def wait_count(count_fn: Any, expected: int, what: str, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    found = count_fn()
    while found < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        found = count_fn()
    if found != expected:
        raise RuntimeError(f"{what}: expected {expected} stored files, found {found}")
    return int(found)


# --------------------------------------------------------------------------------------------- targets


class PostgresDatabase:
    """A fresh database per run on the server of `admin_url`, dropped afterwards (as tests/conftest.py does)."""

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy import create_engine, text

        self._text = text
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.name = f"cxr_bench_{uuid.uuid4().hex[:10]}"
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(self._text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.engine.dispose()


def status_counts(database_url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM instances GROUP BY status"))
            return {str(status): int(n) for status, n in rows}
    finally:
        engine.dispose()


def run_ours(workdir: Path, files: list[Path], associations: int, args: argparse.Namespace, intake: str) -> Run:
    home = workdir / "home"
    models = workdir / "models"
    home.mkdir(parents=True)
    models.mkdir()
    pg = PostgresDatabase(args.database_url) if args.database_url.startswith("postgresql") else None
    database_url = pg.url if pg else args.database_url
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_HOME": str(home),
            "CXR_MODELS_DIR": str(models),
            "CXR_PORT": str(port),
            "CXR_BIND_ADDRESS": "127.0.0.1",
            "CXR_AE_TITLE": AE_TITLE,
            "CXR_MAX_ASSOCIATIONS": str(max(8, 2 * associations)),
            "PYTHONPATH": str(ROOT),
        }
    )
    if database_url:
        env["CXR_DATABASE_URL"] = database_url
    if args.broker_url:
        env["CXR_BROKER_URL"] = args.broker_url
    log = (workdir / "listener.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "listener"], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_echo(port, proc)
        seconds = send(port, files, associations)
        spool = home / "spool"
        stored = wait_count(lambda: sum(1 for _ in spool.rglob("*.dcm")), len(files), "listener spool")
        counts = status_counts(database_url or f"sqlite:///{(home / 'cxr-triage.sqlite3').resolve()}")
        want = "queued" if intake == "chest" else "skipped"
        if counts.get(want, 0) != len(files):
            raise RuntimeError(f"listener database: expected {len(files)} {want}, got {counts}")
    except Exception:
        sys.stderr.write((workdir / "listener.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        stop(proc)
        log.close()
        if pg is not None:
            pg.drop()
    return Run("cxr-triage listener", associations, seconds, stored)


def run_storescp(workdir: Path, files: list[Path], associations: int) -> Run:
    out = workdir / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    cmd = [STORESCP, "-aet", AE_TITLE, "+xa", "-od", str(out)]
    if associations > 1:
        cmd.append("--fork")  # otherwise storescp serves one association at a time
    log = (workdir / "storescp.log").open("wb")
    proc = subprocess.Popen([*cmd, str(port)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(port, proc)
        seconds = send(port, files, associations)
        stored = wait_count(
            lambda: sum(1 for p in out.iterdir() if p.is_file() and not p.name.startswith(".")),
            len(files),
            "storescp output directory",
        )
    finally:
        stop(proc)
        log.close()
    return Run("dcmtk storescp", associations, seconds, stored)


# --------------------------------------------------------------------------------------------- report


def machine_facts() -> dict[str, Any]:
    dcmtk = subprocess.run([STORESCP, "--version"], capture_output=True, text=True, check=False).stdout
    import pynetdicom

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": dcmtk.splitlines()[0].strip("$ ").strip() if dcmtk else "?",
    }


NOTES = (
    "Durability differs: our listener fsyncs every file (temp file + fsync + rename + directory fsync), writes "
    "a database row and sends a broker message before it answers Success; dcmtk storescp does not fsync (page "
    "cache only), has no database and no queue. storescp is the floor for 'receive and write', not a peer.",
    "Both write every file to disk on the same file system (work directory below); storescp runs with +xa -od "
    "(default options otherwise: it parses the data set and writes it in the received transfer syntax), with "
    "--fork for the 4-association runs (one process per association); our listener is one Python process.",
    "Each target uses its default maximum receive PDU (storescp 16 KiB; our listener 1 MiB, CXR_MAX_PDU).",
    "Time: start of the first storescu to the exit of the last (all C-STORE responses received); target start-up "
    "and verification are not timed. MB = 10^6 bytes. Median of the repeats. ratio = ours MB/s / storescp MB/s.",
    "The machine may be shared (see load average): treat small differences as noise.",
)


def format_table(results: list[Result]) -> str:
    header = ("target", "assoc", "files", "MB", "seconds", "files/s", "MB/s")
    rows = [
        (
            r.target,
            str(r.associations),
            str(r.files),
            f"{r.megabytes:.1f}",
            f"{r.seconds_median:.2f}",
            f"{r.files_per_s:.1f}",
            f"{r.mb_per_s:.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(results: list[Result]) -> dict[int, float]:
    out: dict[int, float] = {}
    for n in sorted({r.associations for r in results}):
        ours = next(r for r in results if r.associations == n and r.target.startswith("cxr"))
        theirs = next(r for r in results if r.associations == n and r.target.startswith("dcmtk"))
        out[n] = ours.mb_per_s / theirs.mb_per_s
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--count", "-n", type=int, default=40, help="Generated copies (default 40).")
    parser.add_argument("--files", type=Path, help="Use the .dcm files in this folder instead of generating.")
    parser.add_argument(
        "--intake",
        choices=("chest", "skip"),
        default="chest",
        help="chest: copies labelled CHEST/PA (spool + DB + queue); skip: outside the policy (spool + DB).",
    )
    parser.add_argument("--repeat", type=int, default=3, help="Runs per measurement; the median is reported.")
    parser.add_argument(
        "--database-url",
        default="",
        help="e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test "
        "(a fresh database is created on that server per run); default SQLite in a temp home.",
    )
    parser.add_argument("--broker-url", default="", help="e.g. redis://127.0.0.1:6379/9; default filesystem broker.")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="Where inputs and received files go (default: system temp). "
        "Must not be a tmpfs if fsync cost is to be measured.",
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"ingest-{stamp}.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).is_file():
            raise SystemExit(f"dcmtk tool {tool} not found (apt-get install dcmtk)")
    facts = machine_facts()
    base = Path(tempfile.mkdtemp(prefix="cxr-bench-ingest-", dir=args.workdir))
    try:
        if args.files is not None:
            files = sorted(p for p in args.files.iterdir() if p.suffix.lower() == ".dcm")
            if not files:
                raise SystemExit(f"no .dcm files in {args.files}")
            source = f"{args.files} (as given)"
        else:
            print(f"generating {args.count} copies of {len(SOURCE_FILMS)} decoded films ...", flush=True)
            files = generate_inputs(base / "input", args.count, args.intake)
            source = f"{args.count} Explicit VR LE copies of {', '.join(SOURCE_FILMS)} (intake={args.intake})"
        total_bytes = sum(p.stat().st_size for p in files)
        megabytes = total_bytes / 1e6

        runs: list[Run] = []
        for rep in range(args.repeat):
            for n in ASSOCIATION_COUNTS:
                for target in ("ours", "storescp"):
                    workdir = base / f"run-{rep}-{n}-{target}"
                    workdir.mkdir()
                    if target == "ours":
                        run = run_ours(workdir, files, n, args, args.intake)
                    else:
                        run = run_storescp(workdir, files, n)
                    shutil.rmtree(workdir)
                    runs.append(run)
                    print(
                        f"  run {rep + 1}/{args.repeat}: {run.target:<20} assoc={n}  {run.seconds:6.2f} s  "
                        f"({run.stored} stored)",
                        flush=True,
                    )

        results = []
        for n in ASSOCIATION_COUNTS:
            for target in ("cxr-triage listener", "dcmtk storescp"):
                seconds_all = [r.seconds for r in runs if r.target == target and r.associations == n]
                median = statistics.median(seconds_all)
                results.append(
                    Result(
                        target, n, len(files), megabytes, median, len(files) / median, megabytes / median, seconds_all
                    )
                )
        ratio = ratios(results)

        print()
        print("cxr-triage ingest benchmark (dcmtk storescu -> target, same machine)")
        print(
            f"  machine: {facts['cpu_count']} cores ({facts['cpus_usable']} usable), load average at start "
            f"{facts['load_average_at_start']}, {facts['platform']}"
        )
        print(f"  python {facts['python']}, pynetdicom {facts['pynetdicom']}, {facts['dcmtk']}")
        print(f"  input: {len(files)} files, {megabytes:.1f} MB ({megabytes / len(files):.2f} MB/file); {source}")
        dbdesc = args.database_url or "SQLite (temp home)"
        print(
            f"  ours: database {dbdesc}, broker {args.broker_url or 'filesystem (temp home)'}; "
            f"work dir {base}; median of {args.repeat}"
        )
        print("  notes:")
        for note in NOTES:
            print(f"   - {note}")
        print()
        print(format_table(results))
        print()
        for n, value in ratio.items():
            print(f"ratio ours/storescp (MB/s), {n} association{'s' if n > 1 else ''}: {value:.2f}")

        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "benchmark": "ingest",
            "when": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": facts,
            "input": {"files": len(files), "bytes": total_bytes, "source": source},
            "ours": {
                "database_url": args.database_url or "sqlite (temp)",
                "broker_url": args.broker_url or "filesystem",
            },
            "repeat": args.repeat,
            "notes": list(NOTES),
            "results": [asdict(r) for r in results],
            "ratio_ours_over_storescp_mb_per_s": {str(k): v for k, v in ratio.items()},
            "runs": [asdict(r) for r in runs],
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
