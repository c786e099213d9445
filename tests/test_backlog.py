"""Issue 14, item 2: fresh studies ahead of the backlog. Instances that can wait (an old StudyDate, a bulk sender, a low
requested priority) are triaged on queue `backlog`, which a worker takes from only when `gpu` is empty, on Redis and
on the embedded filesystem broker; every worker that consumes gpu consumes backlog too."""

from __future__ import annotations

import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from kombu.messaging import Consumer
from sqlalchemy import select

from cxr_triage.settings import Settings
from db import repo
from db.migrate import upgrade
from db.models import Instance, InstanceStatus, Prediction, as_utc
from db.session import session_scope
from infra.health import check_queues, queue_consumers
from infra.queue import (
    QUEUE_BACKLOG,
    QUEUE_CPU,
    QUEUE_GPU,
    QUEUE_TRAINING,
    QUEUES,
    producer,
    queue_depth,
    send_triage,
    worker_queues,
)
from listener.dispatch import Dispatcher, Routing, triage_queue
from tests.conftest import DICOM_DIR, declare_queues, new_copies, received_instance, wait_until

SOURCE = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
NOW = datetime(2025, 3, 10, 14, 0)  # local time, as DICOM dates are
BACKLOG_SIZE = 200


def _queue(settings: Settings, routing: Routing) -> str:
    return triage_queue(settings, routing, now=NOW)[0]


# --- the rule ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routing", "queue", "reason"),
    [
        (Routing("20250310", None, "CR_ROOM2"), QUEUE_GPU, None),  # today
        (Routing("20250308", "ROUTINE", "CR_ROOM2"), QUEUE_GPU, None),  # ended 38 h ago: not 48 h
        (Routing("20250307", None, "CR_ROOM2"), QUEUE_BACKLOG, "old-study"),  # ended 62 h ago
        (Routing("19010101", None, None), QUEUE_BACKLOG, "old-study"),
        (Routing("20250310", "LOW", "CR_ROOM2"), QUEUE_BACKLOG, "low-priority"),
        (Routing("20250310", " low ", "CR_ROOM2"), QUEUE_BACKLOG, "low-priority"),
        (Routing("20250310", "STAT", "MIGRATION"), QUEUE_BACKLOG, "bulk-sender"),
        (Routing("20250310", None, "migration"), QUEUE_GPU, None),  # AE titles are compared exactly
        (Routing(None, None, None), QUEUE_GPU, None),  # what the rule cannot read is fresh
        (Routing("2004-08-", None, None), QUEUE_GPU, None),
        (Routing("20041331", None, None), QUEUE_GPU, None),
    ],
)
def test_old_studies_bulk_senders_and_low_priorities_wait_on_the_backlog(
    routing: Routing, queue: str, reason: str | None
) -> None:
    settings = Settings(backlog_age_h=48, backlog_calling_aets="MIGRATION")  # type: ignore[arg-type]
    assert triage_queue(settings, routing, now=NOW) == (queue, reason)


def test_a_study_date_counts_from_its_last_minute() -> None:
    """Only the date is recorded: a study is never taken for older than it can be."""
    settings = Settings(backlog_age_h=24)
    assert _queue(settings, Routing("20250309", None, None)) == QUEUE_GPU  # could have been 23:59 yesterday
    assert _queue(settings, Routing("20250308", None, None)) == QUEUE_BACKLOG  # ended 38 h ago
    assert triage_queue(settings, Routing("20250309", None, None), now=datetime(2025, 3, 11, 0, 0))[0] == QUEUE_BACKLOG


def test_each_rule_can_be_switched_off() -> None:
    off = Settings(backlog_age_h=0, backlog_priorities="")  # type: ignore[arg-type]
    assert _queue(off, Routing("19010101", "LOW", "MIGRATION")) == QUEUE_GPU
    assert _queue(Settings(), Routing("19010101", "ROUTINE", "MIGRATION")) == QUEUE_GPU  # the defaults: LOW only
    assert _queue(Settings(), Routing("19010101", "LOW", None)) == QUEUE_BACKLOG


def test_every_worker_that_consumes_gpu_consumes_the_backlog_after_its_other_queues() -> None:
    assert worker_queues([QUEUE_GPU]) == [QUEUE_GPU, QUEUE_BACKLOG]
    assert worker_queues([QUEUE_GPU, QUEUE_CPU]) == [QUEUE_GPU, QUEUE_CPU, QUEUE_BACKLOG]
    assert worker_queues([QUEUE_GPU, QUEUE_CPU, QUEUE_TRAINING]) == [
        QUEUE_GPU,
        QUEUE_CPU,
        QUEUE_BACKLOG,
        QUEUE_TRAINING,
    ]
    assert worker_queues([QUEUE_CPU]) == [QUEUE_CPU]
    assert worker_queues([QUEUE_BACKLOG, QUEUE_GPU]) == [QUEUE_BACKLOG, QUEUE_GPU]  # the operator's order stands
    assert worker_queues(list(QUEUES)) == list(QUEUES)  # a worker without -Q: deliveries before the backlog
    assert QUEUES.index(QUEUE_CPU) < QUEUES.index(QUEUE_BACKLOG) < QUEUES.index(QUEUE_TRAINING)


def test_triage_goes_to_gpu_or_backlog_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="triage goes to one of"):
        send_triage(Settings(home=tmp_path), 1, sop_instance_uid="1.2.3", queue=QUEUE_CPU)


# --- the brokers -------------------------------------------------------------------------------------------------


@pytest.fixture(params=["filesystem", "redis"])
def broker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "redis":
        return declare_queues(Settings(home=tmp_path, broker_url=request.getfixturevalue("redis_url")))
    return Settings(home=tmp_path)


def _take(settings: Settings, queues: list[str], count: int) -> list[tuple[str, int]]:
    """Consume `count` triage messages from `queues` as a worker with prefetch 1 does: (queue, instance id) each."""
    app = producer(settings)
    taken: list[tuple[str, int]] = []
    with app.connection_for_read() as conn:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)

        def take(body: Any, message: Any) -> None:  # a task message's body: [args, kwargs, embed]
            taken.append((str(message.delivery_info["routing_key"]), int(body[0][0])))
            message.ack()

        consumer = Consumer(channel, queues=[app.amqp.queues[q] for q in queues], callbacks=[take], accept=["json"])
        with consumer:
            while len(taken) < count:
                conn.drain_events(timeout=10)
    return taken


def test_a_worker_takes_from_the_first_of_its_queues_that_holds_work(broker_settings: Settings) -> None:
    """gpu, gpu, backlog in the broker: both gpu messages come first. kombu's default strategy (round robin on Redis,
    FairCycle on the filesystem transport) would hand out the backlog message second."""
    send_triage(broker_settings, 1, sop_instance_uid="1.1", queue=QUEUE_BACKLOG)
    send_triage(broker_settings, 2, sop_instance_uid="1.2")
    send_triage(broker_settings, 3, sop_instance_uid="1.3")
    assert {q: queue_depth(broker_settings, q) for q in (QUEUE_GPU, QUEUE_BACKLOG)} == {QUEUE_GPU: 2, QUEUE_BACKLOG: 1}
    taken = _take(broker_settings, [QUEUE_GPU, QUEUE_BACKLOG], 3)
    assert [queue for queue, _ in taken] == [QUEUE_GPU, QUEUE_GPU, QUEUE_BACKLOG], taken


def test_health_reports_the_backlog_and_fails_when_nobody_consumes_it(redis_url: str, tmp_path: Path) -> None:
    settings = declare_queues(Settings(home=tmp_path, broker_url=redis_url))
    send_triage(settings, 1, sop_instance_uid="1.1", queue=QUEUE_BACKLOG)
    check = check_queues(settings)
    assert "backlog: 1 waiting, 0 consumer(s)" in check.detail
    assert not check.ok and "no worker consumes backlog" in check.detail


# --- dispatch and the outbox -------------------------------------------------------------------------------------


def _record(url: str, n: int, *, study_date: str | None, status: InstanceStatus = InstanceStatus.RECEIVED) -> int:
    rec = received_instance(
        f"1.2.826.0.1.88.{n}",
        SOURCE,
        study_instance_uid=f"1.2.826.0.1.88.{n}",
        series_instance_uid=f"1.2.826.0.1.88.{n}.0",
        study_date=study_date,
        status=status,
    )
    with session_scope(url) as session:
        instance, _ = repo.record_received(session, rec)
        return instance.id


def test_the_listener_and_its_outbox_route_an_instance_the_same_way(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, backlog_age_h=24)
    url = settings.effective_database_url
    upgrade(url)
    dispatcher = Dispatcher(settings)
    old = _record(url, 1, study_date="20040826")
    fresh = _record(url, 2, study_date=date.today().strftime("%Y%m%d"))
    assert dispatcher.dispatch(old, sop_instance_uid="1.2.826.0.1.88.1")
    assert dispatcher.dispatch(fresh, sop_instance_uid="1.2.826.0.1.88.2")
    assert (queue_depth(settings, QUEUE_GPU), queue_depth(settings, QUEUE_BACKLOG)) == (1, 1)
    # Never handed over (the broker was down): the outbox sends each where the listener would have.
    _record(url, 3, study_date="20040826")
    _record(url, 4, study_date=None)
    assert dispatcher.flush_outbox() == 2
    assert (queue_depth(settings, QUEUE_GPU), queue_depth(settings, QUEUE_BACKLOG)) == (2, 2)
    with session_scope(url) as session:
        assert set(session.scalars(select(Instance.status))) == {InstanceStatus.QUEUED}


def test_a_waiting_backlog_is_not_taken_for_lost_messages(tmp_path: Path) -> None:
    """gpu empty but backlog full: queued instances still have their messages, so the outbox does not re-send them
    after the heartbeat timeout; once both queues are empty, it does."""
    settings = Settings(home=tmp_path, backlog_age_h=24, heartbeat_timeout_s=0.001)
    url = settings.effective_database_url
    upgrade(url)
    dispatcher = Dispatcher(settings)
    ids = [_record(url, n, study_date="20040826") for n in range(3)]
    assert dispatcher.flush_outbox() == 3
    time.sleep(0.05)  # the heartbeat timeout passes
    assert queue_depth(settings, QUEUE_GPU) == 0 and queue_depth(settings, QUEUE_BACKLOG) == 3
    assert dispatcher.flush_outbox() == 0
    assert sorted(_take(settings, [QUEUE_BACKLOG], 3)) == [(QUEUE_BACKLOG, i) for i in ids]  # as if Redis restarted
    assert dispatcher.flush_outbox() == 3
    assert queue_depth(settings, QUEUE_BACKLOG) == 3


# --- end to end --------------------------------------------------------------------------------------------------


def _done_predictions(url: str) -> list[tuple[int, str, datetime]]:
    """(prediction id, SOP Instance UID, created_at) of every live prediction, in the order they were stored."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Prediction.id, Instance.sop_instance_uid, Prediction.created_at)
            .join(Instance, Instance.id == Prediction.instance_id)
            .order_by(Prediction.id)
        ).all()
    return [(int(i), str(uid), at) for i, uid, at in rows]


@pytest.mark.integration
@pytest.mark.parametrize("brokers", ["redis+postgresql", "embedded"])
def test_a_fresh_instance_is_triaged_before_half_the_backlog(
    brokers: str, service_factory, tiny_registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """storescu -> listener -> broker -> worker: 200 old studies are queued on backlog and the worker is draining
    them when a study from today arrives; it is triaged next, long before half the backlog is done, and the worker
    then goes back to the backlog. The worker is started with -Q gpu,cpu: it consumes backlog all the same."""
    if brokers == "embedded":
        database_url, broker_url = f"sqlite:///{tmp_path / 'cxr.sqlite3'}", ""
    else:
        database_url, broker_url = request.getfixturevalue("pg_url"), request.getfixturevalue("redis_url")
    service = service_factory(database_url=database_url, broker_url=broker_url, models_dir=tiny_registry.root,
                              backlog_age_h="24", results_heatmap="false")  # fmt: skip
    settings = Settings(home=service.home / "var", database_url=database_url, broker_url=broker_url)
    backlog = new_copies(SOURCE, tmp_path / "backlog", BACKLOG_SIZE, StudyDate="20040826")
    (fresh,) = new_copies(SOURCE, tmp_path / "fresh", 1, StudyDate=date.today().strftime("%Y%m%d"))
    fresh_uid = str(pydicom.dcmread(fresh, stop_before_pixels=True).SOPInstanceUID)

    service.start_listener()
    sent = service.storescu(*backlog)
    assert sent.returncode == 0, sent.stderr[-2000:]
    with session_scope(database_url) as session:
        assert list(session.scalars(select(Instance.status).distinct())) == [InstanceStatus.QUEUED]
    # (The outbox may have sent a row the listener was about to send: a duplicate message, which the claim turns away.)
    assert (queue_depth(settings, QUEUE_BACKLOG) or 0) >= BACKLOG_SIZE and queue_depth(settings, QUEUE_GPU) == 0

    service.start_worker(queues="gpu,cpu")
    wait_until(lambda: len(_done_predictions(database_url)) >= 1, 180, "the worker to start on the backlog")
    sent = service.storescu(fresh)
    assert sent.returncode == 0, sent.stderr[-2000:]

    def fresh_done() -> bool:
        return any(uid == fresh_uid for _, uid, _ in _done_predictions(database_url))

    wait_until(fresh_done, 180, "the fresh instance to be triaged")
    done = _done_predictions(database_url)
    position = next(n for n, (_, uid, _) in enumerate(done) if uid == fresh_uid)
    with session_scope(database_url) as session:
        queued_at = session.scalars(select(Instance.queued_at).where(Instance.sop_instance_uid == fresh_uid)).one()
    assert queued_at is not None
    after_it_came = [uid for _, uid, at in done[:position] if as_utc(at) >= as_utc(queued_at)]
    assert position < BACKLOG_SIZE // 2, f"{position} backlog instances were triaged before the fresh one"
    # With prefetch 1 the worker held at most one backlog message when the fresh one arrived; it took gpu next.
    assert len(after_it_came) <= 1, f"{len(after_it_came)} backlog instances finished after the fresh one was queued"

    if broker_url:  # Redis answers remote control: the worker started with -Q gpu,cpu consumes backlog too
        wait_until(lambda: (queue_consumers(settings) or {}).get(QUEUE_BACKLOG) == 1, 60, "a consumer of backlog")
    # ... and goes back to it: the worker never idles while a queue holds work.
    wait_until(lambda: len(_done_predictions(database_url)) >= position + 10, 180, "the worker to resume the backlog")
