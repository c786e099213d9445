"""Worklist API hardening (issue 10, item 12): failed-login limits (429), the scrypt cost, the password policy, the
request body cap (413), /readyz reasons without raw errors, and a /metrics scrape that does not read the history."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from select import select as wait_readable
from typing import Any

import pytest
import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import event, select
from typer.testing import CliRunner

from cxr_triage.labels import COVID19, NO_FINDING, PNEUMONIA
from cxr_triage.settings import Settings
from db import repo
from db.migrate import upgrade
from db.models import Instance
from db.session import engine_for, session_scope
from db.worklist_models import User
from tests.conftest import free_port, wait_for_port
from tests.test_worklist_api import (
    COVID,
    FAST_SCRYPT_N,
    PATIENT,
    add_study,
    fast_password_hashes,  # noqa: F401 (autouse: scrypt at a test cost; the default cost has its own test)
)
from worklist.app import create_app
from worklist.auth import create_user, hash_password, verify_password
from worklist.limits import Attempt, Lockout, LoginLimiter
from worklist.metrics import DatabaseCollector

PASSWORD = "correct horse battery"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_settings(url: str, home: Path, **overrides: Any) -> Settings:
    return Settings(home=home, database_url=url, **overrides)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    upgrade(url)
    return url


@pytest.fixture
def settings(sqlite_url: str, tmp_path: Path) -> Settings:
    settings = make_settings(sqlite_url, tmp_path / "var", login_max_failures=3, login_window_s=300)
    with session_scope(settings.effective_database_url) as session:
        create_user(session, "reader", PASSWORD)
    return settings


def _app_with_clock(settings: Settings) -> tuple[FastAPI, FakeClock]:
    app = create_app(settings)
    clock = FakeClock()
    app.state.login_limiter.clock = clock
    return app, clock


def _login(client: TestClient, username: str, password: str) -> Any:
    return client.post("/api/login", json={"username": username, "password": password})


# --- login: failed-login limit --------------------------------------------------------------------------------------


def test_failed_logins_for_a_username_get_429_with_retry_after_until_the_window_passes(settings: Settings) -> None:
    app, clock = _app_with_clock(settings)
    with TestClient(app) as client, structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert _login(client, "reader", "wrong password").status_code == 401
        locked = _login(client, "reader", PASSWORD)
        assert locked.status_code == 429, "locked: even the right password is refused without being checked"
        assert locked.json() == {"detail": "too many failed logins: try again later"}
        assert 1 <= int(locked.headers["Retry-After"]) <= 300
        clock.now += 100
        assert 1 <= int(_login(client, "reader", PASSWORD).headers["Retry-After"]) <= 200
        clock.now += 201
        assert _login(client, "reader", PASSWORD).status_code == 200, "the window has passed"
    events = [entry for entry in logs if entry["event"] == "auth.locked"]
    assert events and events[0]["scope"] == "username" and events[0]["username"] == "reader"
    assert "wrong password" not in repr(logs) and PASSWORD not in repr(logs), "no password in any log line"


def test_a_successful_login_resets_the_usernames_count(settings: Settings) -> None:
    app, _ = _app_with_clock(settings)
    app.state.login_limiter.limits["address"] = 100
    with TestClient(app) as client:
        for _ in range(2):
            assert _login(client, "reader", "wrong password").status_code == 401
        assert _login(client, "reader", PASSWORD).status_code == 200
        for _ in range(2):
            assert _login(client, "reader", "wrong password").status_code == 401
        assert _login(client, "reader", PASSWORD).status_code == 200, "2 + 2 failures, not 4 in a row"


def test_failed_logins_from_one_address_lock_that_address_only(settings: Settings) -> None:
    app, _ = _app_with_clock(settings)
    with TestClient(app, client=("10.0.0.1", 50000)) as attacker, TestClient(app, client=("10.0.0.2", 50000)) as other:
        for name in ("alice", "bob", "carol"):
            assert _login(attacker, name, "guess guess guess").status_code == 401
        refused = _login(attacker, "reader", PASSWORD)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert _login(other, "reader", PASSWORD).status_code == 200, "another address is not locked"


def test_the_login_page_form_is_limited_too(settings: Settings) -> None:
    add_study(settings, probabilities=COVID)
    app, _ = _app_with_clock(settings)
    with TestClient(app) as browser:
        for _ in range(3):
            form = {"username": "reader", "password": "wrong password", "next": "/"}
            assert browser.post("/login", data=form).status_code == 401
        locked = browser.post("/login", data={"username": "reader", "password": PASSWORD, "next": "/"})
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
        assert "Too many failed sign-ins" in locked.text and PATIENT not in locked.text
        assert "cxr_session" not in browser.cookies


def test_concurrent_attempts_count_before_they_finish_and_errors_of_ours_do_not_count() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(2, 60, clock=clock)
    first, second = limiter.begin("u", "a"), limiter.begin("u", "a")
    assert isinstance(first, Attempt) and isinstance(second, Attempt)
    third = limiter.begin("u", "a")
    assert isinstance(third, Lockout) and third.retry_after_s == 60, "two guesses in flight fill the count"
    limiter.cancel(first)
    assert isinstance(limiter.begin("u", "a"), Attempt), "an attempt that ended in our error is taken back"
    small = LoginLimiter(1, 60, clock=clock, max_keys=10)
    for i in range(50):
        small.begin(f"user{i}", f"10.0.0.{i}")
    assert len(small._failures) <= 10, "a spray of usernames cannot grow the limiter without bound"


# --- password hashing -----------------------------------------------------------------------------------------------


def test_new_hashes_use_scrypt_n_2_17_by_default_and_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_triage import settings as settings_module

    assert Settings.model_fields["password_scrypt_n"].default == 2**17
    monkeypatch.delenv("CXR_PASSWORD_SCRYPT_N")
    settings_module.get_settings.cache_clear()
    stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt$131072$8$1$")
    assert verify_password(PASSWORD, stored), "maxmem is raised for N=2^17 (the default 32 MiB refuses it)"
    assert not verify_password("wrong password", stored)
    with pytest.raises(ValidationError):
        Settings(password_scrypt_n=100_000)


def test_an_old_hash_still_verifies_and_is_rehashed_at_the_current_cost(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "var", password_scrypt_n=2 * FAST_SCRYPT_N)
    with session_scope(sqlite_url) as session:
        create_user(session, "veteran", PASSWORD, scrypt_n=FAST_SCRYPT_N)
    with TestClient(create_app(settings)) as client:
        assert _login(client, "veteran", PASSWORD).status_code == 200
        with session_scope(sqlite_url) as session:
            stored = session.scalars(select(User.password_hash).where(User.username == "veteran")).one()
        assert stored.startswith(f"scrypt${2 * FAST_SCRYPT_N}$8$1$")
        assert _login(client, "veteran", PASSWORD).status_code == 200


# --- password policy ------------------------------------------------------------------------------------------------


def test_users_create_and_passwd_enforce_the_password_policy(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr_triage import settings as settings_module
    from service.cli import app

    monkeypatch.setenv("CXR_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "var"))
    settings_module.get_settings.cache_clear()
    runner = CliRunner()

    def users(*args: str, password: str) -> Any:
        return runner.invoke(app, ["users", *args, "--password-stdin"], input=f"{password}\n")

    short = users("create", "dr.short", password="elevenchars")
    assert short.exit_code == 2 and "at least 12 characters" in short.output
    same = users("create", "radiologist.one", password="Radiologist.One")
    assert same.exit_code == 2 and "must not be the username" in same.output
    assert users("create", "dr.ok", password="twelve chars").exit_code == 0
    assert users("create", "dr.ok", password="twelve chars").exit_code != 0, "the user exists"
    weak = users("passwd", "dr.ok", password="short")
    assert weak.exit_code == 2 and "at least 12 characters" in weak.output
    assert users("passwd", "dr.ok", password="a longer passphrase").exit_code == 0
    with session_scope(sqlite_url) as session:
        usernames = set(session.scalars(select(User.username)))
    assert usernames == {"dr.ok"}
    monkeypatch.setenv("CXR_PASSWORD_MIN_LENGTH", "20")
    settings_module.get_settings.cache_clear()
    assert users("passwd", "dr.ok", password="a longer passphrase").exit_code == 2, "the setting is used"
    settings_module.get_settings.cache_clear()


# --- request body cap -----------------------------------------------------------------------------------------------


@pytest.fixture
def capped(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_max_body_bytes": 1024})


def test_a_body_over_the_cap_gets_413(capped: Settings) -> None:
    with TestClient(create_app(capped)) as client:
        big = b'{"username": "reader", "password": "' + b"x" * 2000 + b'"}'
        response = client.post("/api/login", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.headers["X-Content-Type-Options"] == "nosniff"
        form = client.post("/login", data={"username": "reader", "password": "x" * 2000})
        assert form.status_code == 413
        assert _login(client, "reader", PASSWORD).status_code == 200, "a small body is untouched"


@pytest.fixture
def served(capped: Settings) -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(capped), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=30)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _status_line(sock: socket.socket) -> str:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_sent(served: int) -> None:
    with socket.create_connection(("127.0.0.1", served), timeout=5) as sock:
        sock.sendall(
            b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        started = time.monotonic()
        assert _status_line(sock).startswith("HTTP/1.1 413"), "answered without waiting for 100 MB"
        assert time.monotonic() - started < 5


def test_a_chunked_body_is_stopped_once_it_passes_the_cap(served: int) -> None:
    total, sent, answered = 4 * 1024 * 1024, 0, False
    with socket.create_connection(("127.0.0.1", served), timeout=5) as sock:
        sock.sendall(
            b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 4096
        try:
            while sent < total and not answered:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                answered = bool(wait_readable([sock], [], [], 0.01)[0])
        except (BrokenPipeError, ConnectionResetError):
            pass
        status = _status_line(sock)
    assert status.startswith("HTTP/1.1 413"), status
    assert sent < total, "the server answered long before the body ended"


# --- /readyz --------------------------------------------------------------------------------------------------------


def test_readyz_names_the_part_that_is_down_with_a_fixed_reason_and_logs_the_error(
    settings: Settings, tmp_path: Path
) -> None:
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["down"] == [] and ready.json()["checks"]["broker"] == "reachable"

    down = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    with TestClient(create_app(down)) as client, structlog.testing.capture_logs() as logs:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ok"] is False and body["down"] == ["database"] and body["checks"]["database"] == "unreachable"
    for raw in ("Error", "refused", "127.0.0.1", "port", "psycopg"):
        assert raw not in response.text, f"raw error text {raw!r} in the answer"
    logged = [entry for entry in logs if entry["event"] == "readyz.part_down"]
    assert logged and "OperationalError" in logged[0]["error"], "the raw error goes to the log"

    empty_url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    with TestClient(create_app(settings.model_copy(update={"database_url": empty_url}))) as client:
        assert client.get("/readyz").json()["checks"]["database"] == "schema missing"
    old_url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(old_url, "0004")
    with TestClient(create_app(settings.model_copy(update={"database_url": old_url}))) as client:
        assert client.get("/readyz").json()["checks"]["database"] == "schema out of date"

    no_broker = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(no_broker)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["down"] == ["broker"]
    assert response.json()["checks"]["broker"] == "unreachable" and "Error" not in response.text


# --- /metrics -------------------------------------------------------------------------------------------------------


def _samples(collector: DatabaseCollector) -> dict[str, float]:
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for metric in collector.collect()
        for sample in metric.samples
    }


INF = "cxr_triage_turnaround_seconds_bucket[('le', '+Inf')]"
SUM = "cxr_triage_turnaround_seconds_sum[]"


def test_a_scrape_reads_only_predictions_it_has_not_seen(settings: Settings) -> None:
    url = settings.effective_database_url
    first = add_study(settings, probabilities=COVID)
    collector = DatabaseCollector(url, cache_s=0)
    before = _samples(collector)
    assert before[INF] == 1.0
    with session_scope(url) as session:  # history the next scrape must not read again
        for instance in session.scalars(select(Instance)):
            instance.received_at -= timedelta(hours=1)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        add_study(settings, probabilities={COVID19: 0.1, PNEUMONIA: 0.1, NO_FINDING: 0.8})
        statements.clear()
        after = _samples(collector)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert after[INF] == 2.0 and after["cxr_instances_received_total[]"] == 2.0
    assert after[SUM] - before[SUM] < 60, "the first study's turnaround was not recomputed"
    reads = [s for s in statements if "predictions" in s]
    assert reads and all("predictions.id >" in s for s in reads), reads
    with session_scope(url) as session:  # a second prediction (another model set) is not a second turnaround
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid.startswith(first))).one()
        record_ = repo.PredictionRecord(
            model_set="other",
            model_versions=["m2"],
            label=COVID19,
            probabilities=COVID,
            member_probabilities={"m2": COVID},
            queue_wait_ms=1.0,
            decode_ms=1.0,
            inference_ms=1.0,
            not_for_clinical_use=True,
        )
        repo.save_prediction(session, instance, record_)
    assert _samples(collector)[INF] == 2.0


def test_a_scrape_does_bounded_work_and_answers_from_its_cache(settings: Settings) -> None:
    url = settings.effective_database_url
    for _ in range(3):
        add_study(settings, probabilities=COVID)
    bounded = DatabaseCollector(url, cache_s=0, max_rows_per_scrape=2)
    assert _samples(bounded)[INF] == 2.0, "at most 2 rows read in one scrape"
    assert _samples(bounded)[INF] == 3.0, "the rest on the next one"
    clock = FakeClock()
    cached = DatabaseCollector(url, cache_s=30, clock=clock)
    assert _samples(cached)["cxr_instances_received_total[]"] == 3.0
    add_study(settings, probabilities=COVID)
    assert _samples(cached)["cxr_instances_received_total[]"] == 3.0, "within CXR_METRICS_CACHE_S: no database read"
    clock.now += 31
    assert _samples(cached)["cxr_instances_received_total[]"] == 4.0
    with TestClient(create_app(settings.model_copy(update={"metrics_cache_s": 0}))) as client:
        assert 'cxr_triage_turnaround_seconds_bucket{le="+Inf"} 4.0' in client.get("/metrics").text
