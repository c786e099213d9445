"""Issue 10, failing parts: exclusive claims on both databases, heartbeats instead of blind re-sends, lost messages
found within a minute, and queues that the broker's bindings route correctly (real Redis, SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from cxr_triage.settings import Settings
from db import repo
from db.migrate import upgrade
from db.models import Instance, InstanceEvent, InstanceStatus, Prediction
from db.session import session_scope
from infra.queue import QUEUES, producer, queue_depth, remove_legacy_bindings, send_triage
from tests.conftest import DICOM_DIR, declare_queues, new_copies, received_instance

SOURCE = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"


def _received(n: int, status: InstanceStatus = InstanceStatus.QUEUED) -> repo.ReceivedInstance:
    return received_instance(
        f"1.2.826.0.1.77.{n}",
        SOURCE,
        study_instance_uid="1.2.826.0.1.77",
        series_instance_uid="1.2.826.0.1.77.0",
        status=status,
    )


def _add(url: str, count: int, status: InstanceStatus = InstanceStatus.QUEUED) -> list[int]:
    ids = []
    with session_scope(url) as session:
        for n in range(count):
            instance, _ = repo.record_received(session, _received(n, status))
            ids.append(instance.id)
    return ids


def _claim_all(url: str, ids: list[int], start: multiprocessing.synchronize.Event) -> list[int]:  # runs in a process
    start.wait()
    claimed = []
    for instance_id in ids:
        with session_scope(url) as session:
            if repo.claim(session, instance_id, silent_before=repo.stale_cutoff(60)) is not None:
                claimed.append(instance_id)
    return claimed


def test_two_processes_never_claim_the_same_instance(db_url: str) -> None:
    upgrade(db_url)
    ids = _add(db_url, 150)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        start = manager.Event()
        runs = [pool.apply_async(_claim_all, (db_url, ids, start)) for _ in range(2)]
        start.set()
        first, second = (run.get(timeout=300) for run in runs)
    assert sorted(first + second) == ids, "an instance was claimed twice (or not at all)"
    with session_scope(db_url) as session:
        processing = session.scalars(select(InstanceEvent).where(InstanceEvent.status == "processing")).all()
        assert len(processing) == len(ids)
        assert set(session.scalars(select(Instance.attempts))) == {1}


def test_a_savepoint_does_not_commit_what_the_transaction_rolls_back(db_url: str) -> None:
    upgrade(db_url)
    (instance_id,) = _add(db_url, 1)
    record = repo.PredictionRecord("set", ["m"], "Pneumonia", {"Pneumonia": 1.0}, {}, None, 1.0, 1.0, True)
    try:
        with session_scope(db_url) as session:
            instance = session.get(Instance, instance_id)
            assert instance is not None
            repo.save_prediction(session, instance, record)  # a savepoint inside
            raise RuntimeError("storing the rest failed")
    except RuntimeError:
        pass
    with session_scope(db_url) as session:  # on SQLite the savepoint used to commit on its own
        assert session.scalar(select(func.count()).select_from(Prediction)) == 0


def test_a_live_holder_keeps_its_instance_and_a_silent_one_loses_it(db_url: str) -> None:
    upgrade(db_url)
    (instance_id,) = _add(db_url, 1)
    with session_scope(db_url) as session:
        assert repo.claim(session, instance_id, silent_before=repo.stale_cutoff(60)) is not None
    with session_scope(db_url) as session:  # a second delivery while the first worker works (and beats)
        assert repo.heartbeat(session, instance_id)
        assert repo.claim(session, instance_id, silent_before=repo.stale_cutoff(60)) is None
        assert instance_id not in repo.dispatchable(
            session,
            stale_before=repo.stale_cutoff(900),
            silent_before=repo.stale_cutoff(60),
            model_available=True,
        )
    later = repo.stale_cutoff(0) + timedelta(seconds=5)  # as if 60 s passed without a heartbeat
    with session_scope(db_url) as session:
        assert repo.dispatchable(
            session, stale_before=repo.stale_cutoff(900), silent_before=later, model_available=True
        ) == [instance_id]
        repo.mark_queued(session, instance_id)  # the outbox re-sent it: not again before the next timeout
    with session_scope(db_url) as session:
        assert (
            repo.dispatchable(
                session, stale_before=repo.stale_cutoff(900), silent_before=repo.stale_cutoff(60), model_available=True
            )
            == []
        )
        taken = repo.claim(session, instance_id, silent_before=later)
        assert taken is not None and taken.attempts == 2
    with session_scope(db_url) as session:
        row = session.get(Instance, instance_id)
        assert row is not None and row.status == InstanceStatus.PROCESSING


def test_queued_work_whose_messages_were_lost_is_due_after_the_heartbeat_timeout(db_url: str) -> None:
    upgrade(db_url)
    ids = _add(db_url, 3)
    with session_scope(db_url) as session:
        for instance_id in ids:
            repo.mark_queued(session, instance_id)
    soon = repo.stale_cutoff(0) + timedelta(seconds=5)
    with session_scope(db_url) as session:
        # The broker's queue still holds work: only requeue_after_s (900 s) makes them due.
        assert repo.dispatchable(session, stale_before=repo.stale_cutoff(900), model_available=True) == []
        # The broker's queue is empty (say, Redis restarted empty): due after the heartbeat timeout.
        assert (
            repo.dispatchable(session, stale_before=repo.stale_cutoff(900), lost_before=soon, model_available=True)
            == ids
        )


def test_the_outbox_sees_an_empty_redis_queue(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(broker_url=redis_url, home=tmp_path)
    assert queue_depth(settings) == 0  # never declared: empty, not unknown
    declare_queues(settings)  # as the worker does when it starts
    send_triage(settings, 1, sop_instance_uid="1.2.3")
    assert queue_depth(settings) == 1
    assert queue_depth(Settings(broker_url="redis://127.0.0.1:1/0", home=tmp_path)) is None  # unreachable: unknown


def test_each_queue_is_bound_to_its_own_exchange_and_routing_key(redis_url: str, tmp_path: Path) -> None:
    from kombu.entity import Exchange, Queue

    settings = Settings(broker_url=redis_url, home=tmp_path)
    app = producer(settings)
    for name in QUEUES:
        queue = app.amqp.queues[name]
        assert (queue.exchange.name, queue.routing_key) == (name, name)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        legacy = Exchange("cpu", type="direct")
        for name in ("gpu", "training"):  # what an older release left in Redis
            Queue(name, legacy, routing_key="cpu").bind(channel).declare()
        assert remove_legacy_bindings(settings) == 2
        for queue in app.amqp.queues.values():
            queue.bind(channel).declare()
        publish = conn.Producer(channel)
        for name in QUEUES:  # routed by exchange and key, as any AMQP-style client would
            publish.publish({"to": name}, exchange=Exchange(name, type="direct"), routing_key=name)
    assert {name: queue_depth(settings, name) for name in QUEUES} == {name: 1 for name in QUEUES}


def test_concurrent_associations_all_land_on_the_embedded_sqlite(service_factory, tiny_registry, tmp_path) -> None:
    """Four senders at once on the embedded defaults (SQLite, filesystem broker): every instance is stored and queued.

    A deferred SQLite transaction that reads before it writes fails at once ("database is locked") when another
    association wrote in between; transactions begin IMMEDIATE so that they wait their turn instead. kombu's
    filesystem transport rewrites its exchange tables while other threads read them: sends take turns."""
    import subprocess

    from tests.conftest import STORESCU_CFG

    service = service_factory(
        database_url=f"sqlite:///{tmp_path / 'embedded.sqlite3'}", broker_url="", models_dir=tiny_registry.root
    )
    service.start_listener()
    groups = [new_copies(SOURCE, tmp_path, 5, prefix=f"s{sender}") for sender in range(4)]
    base = ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "CXRTRIAGE", "-xf", str(STORESCU_CFG), "CXR", "127.0.0.1",
            str(service.port)]  # fmt: skip
    procs = [subprocess.Popen([*base, *map(str, files)], stderr=subprocess.PIPE, text=True) for files in groups]
    outcomes = [(proc.wait(timeout=120), proc.stderr.read() if proc.stderr else "") for proc in procs]
    assert all(code == 0 and "Store Failed" not in err for code, err in outcomes), outcomes
    assert "store.db_failed" not in service.log_text()
    assert "queue.send_failed" not in service.log_text()  # the filesystem broker's tables, read while rewritten
    with session_scope(f"sqlite:///{tmp_path / 'embedded.sqlite3'}") as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 20


def test_a_batch_triages_several_queued_instances_once_each(db_url: str, tiny_registry, tmp_path: Path) -> None:
    """CXR_TRIAGE_BATCH_SIZE: one task claims its instance and queued batch mates, runs the ensemble once for all;
    the mates' own messages then find them done; every instance gets exactly one prediction."""
    from workers.ensemble import EnsembleProvider
    from workers.triage import triage_instance

    upgrade(db_url)
    ids = _add(db_url, 6)
    with session_scope(db_url) as session:
        for instance_id in ids:
            repo.mark_queued(session, instance_id)
    settings = Settings(home=tmp_path, database_url=db_url, triage_batch_size=4, results_heatmap=False)
    provider = EnsembleProvider(tiny_registry, device="cpu", poll_s=0)
    assert triage_instance(settings, ids[2], provider).status == InstanceStatus.DONE
    with session_scope(db_url) as session:
        done = set(session.scalars(select(Instance.id).where(Instance.status == InstanceStatus.DONE)))
    assert len(done) == 4 and ids[2] in done and done - {ids[2]} == set(ids[:2] + ids[3:4])  # oldest mates first
    assert triage_instance(settings, ids[0], provider).status == "duplicate"  # its own message, later
    for instance_id in ids[4:]:
        triage_instance(settings, instance_id, provider)
    with session_scope(db_url) as session:
        per_instance = dict(
            session.execute(select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id)).all()
        )
        statuses = set(session.scalars(select(Instance.status)))
    assert per_instance == {instance_id: 1 for instance_id in ids} and statuses == {InstanceStatus.DONE}
