"""Shared fixtures: real PostgreSQL and Redis databases, a tiny model registry, and service processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from cxr_triage.architectures import create_model, save_state
from cxr_triage.registry import EnsembleSpec, ModelCard, Registry
from cxr_triage.settings import Settings
from db import repo
from db.models import Instance, InstanceStatus, Prediction
from db.session import session_scope

ROOT = Path(__file__).resolve().parents[1]
DICOM_DIR = ROOT / "tests" / "data" / "dicom"
STORESCU_CFG = ROOT / "deploy" / "dcmtk" / "storescu.cfg"
PG_ADMIN_URL = os.environ.get("CXR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("CXR_TEST_REDIS_HOST", "127.0.0.1")

CHEST_FILES = (
    "cr_chest_siim_jpeg_baseline_8bit.dcm",
    "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm",
    "cr_chest_mono1_j2k_lossy_RG1_J2KI.dcm",
)
NON_CHEST_FILES = (
    "cr_hip_mono2_jpeg_extended_lossy_RG2_JPLY.dcm",
    "cr_extremity_mono1_j2k_lossless_RG3_J2KR.dcm",
    "cr_dental_mono1_jpeg_lossless_modality_lut_seq.dcm",
    "cr_extremity_mono1_rle_RG3_RLE.dcm",
)
NOMETA_CHEST = "cr_chest_pa_mono1_implicit_nometa_CR-MONO1-10-chest.dcm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def received_instance(sop: str, path: Path, **fields: Any) -> repo.ReceivedInstance:
    """A chest CR as the listener records it after spooling `path`; `fields` override any attribute."""
    values: dict[str, Any] = {
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "study_instance_uid": "1.2.3.4",
        "series_instance_uid": "1.2.3.4.5",
        "transfer_syntax_uid": "1.2.840.10008.1.2.4.50",
        "calling_aet": "MODALITY",
        "modality": "CR",
        "body_part": "CHEST",
        "view_position": "PA",
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": "0" * 64,
        "status": InstanceStatus.RECEIVED,
        "status_reason": None,
        **fields,
    }
    return repo.ReceivedInstance(**values)


def instance_outcomes(url: str) -> dict[str, tuple[str, str | None, int]]:
    """SOP Instance UID -> (status, reason, number of predictions)."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.status, Instance.status_reason, func.count(Prediction.id))
            .outerjoin(Prediction)
            .group_by(Instance.id)
        ).all()
    return {sop: (status, reason, count) for sop, status, reason, count in rows}


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1 (openssl), for DICOM TLS tests."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=cxr-triage-test",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def make_tiny_registry(
    root: Path, *, architectures: tuple[str, ...] = ("mobilenetv2_100",), size: int = 64
) -> Registry:
    """A registry with small random-weight models (real timm architectures) promoted as ensemble `test`."""
    registry = Registry(root)
    torch.manual_seed(0)
    versions = []
    for arch in architectures:
        version = f"{arch}-test"
        registry.version_dir(version).mkdir(parents=True, exist_ok=True)
        save_state(create_model(arch), registry.version_dir(version) / "model.safetensors")
        registry.write_card(ModelCard(version=version, architecture=arch, device_uid=generate_uid(), input_size=size))
        # Random weights trained on nothing: an empty training split, so evaluation's leak check has a record.
        (registry.version_dir(version) / "split.csv").write_text("path,label,patient_id,source,group,split,sha256\n")
        versions.append(version)
    registry.write_ensemble(EnsembleSpec(name="test", members=tuple(versions)))
    registry.promote("test", reason="test fixture")
    return registry


@pytest.fixture(scope="session")
def tiny_registry_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    make_tiny_registry(root)
    return root


@pytest.fixture
def tiny_registry(tiny_registry_template: Path, tmp_path: Path) -> Registry:
    root = tmp_path / "models"
    shutil.copytree(tiny_registry_template, root)
    return Registry(root)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the real server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"cxr_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from db.session import _factory

        _factory.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on the embedded SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis logical database on the real server, flushed before and after."""
    import redis

    db = 5 + (os.getpid() % 8)
    client = redis.Redis(host=REDIS_HOST, port=6379, db=db)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:6379/{db}"
    finally:
        client.flushdb()


def new_copies(source: Path, folder: Path, count: int, *, prefix: str = "copy", **attributes: Any) -> list[Path]:
    """`count` copies of the DICOM file `source` in `folder`, each its own study, series and SOP instance (new UIDs),
    with `attributes` (keyword=value, e.g. StudyDate) set on every copy."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(source)
    for keyword, value in attributes.items():
        setattr(template, keyword, value)
    paths = []
    for n in range(count):
        template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{prefix}-{n:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def declare_queues(settings: Settings) -> Settings:
    """Declare every queue on a new connection, as a worker does when it starts. (A send declares its queue only once
    per pooled connection, and the redis_url fixture flushes Redis under this process's pool between tests; in
    production a Redis emptied under a running listener is covered by the outbox's lost-message detection.)"""
    from infra.queue import producer

    app = producer(settings)
    with app.connection_for_write() as conn:
        for queue in app.amqp.queues.values():
            queue.bind(conn.default_channel).declare()
    return settings


class S3Server:
    """A real S3 API server (moto in server mode, its own process) and one fresh bucket per test."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.env = {
            "AWS_ACCESS_KEY_ID": "cxr-test",
            "AWS_SECRET_ACCESS_KEY": "cxr-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def s3_server(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """A fresh bucket on the S3 server; the AWS_* credentials are set for this process too."""
    server = S3Server(s3_endpoint, f"cxr-{uuid.uuid4().hex[:12]}")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    server.client().create_bucket(Bucket=server.bucket)
    return server


class Service:
    """Listener and worker processes with one environment; stopped at teardown."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.port = int(env["CXR_PORT"])
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.home)
        self.procs.append(proc)
        return proc

    def start_listener(self) -> subprocess.Popen[bytes]:
        proc = self._spawn("listener", [sys.executable, "-m", "service", "listener"])
        wait_for_port(self.port, proc=proc)
        return proc

    def start_worker(self, queues: str = "gpu,cpu") -> subprocess.Popen[bytes]:
        return self._spawn(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                queues,
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
        )

    def storescu(
        self, *files: Path, calling_aet: str = "STORESCU", extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "/usr/bin/storescu",
            "-aet",
            calling_aet,
            "-aec",
            self.env["CXR_AE_TITLE"],
            "-xf",
            str(STORESCU_CFG),
            "CXR",
            *extra,
            "127.0.0.1",
            str(self.port),
            *map(str, files),
        ]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    services: list[Service] = []

    def make(*, database_url: str, broker_url: str, models_dir: Path, **overrides: str) -> Service:
        home = tmp_path / f"svc{len(services)}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(
            {
                "CXR_HOME": str(home / "var"),
                "CXR_DATABASE_URL": database_url,
                "CXR_BROKER_URL": broker_url,
                "CXR_MODELS_DIR": str(models_dir),
                "CXR_PORT": str(free_port()),
                "CXR_AE_TITLE": "CXRTRIAGE",
                "CXR_OUTBOX_INTERVAL_S": "1",
                "CXR_MODEL_POLL_S": "0.5",
                # A worker killed mid-task is taken over after 10 s of silence, not the production 60 s.
                "CXR_HEARTBEAT_S": "2",
                "CXR_HEARTBEAT_TIMEOUT_S": "10",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update({f"CXR_{k.upper()}": v for k, v in overrides.items()})
        service = Service(home, env)
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()
