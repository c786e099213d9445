"""Prometheus metrics read from the database at scrape time: instance counts, queue depth, turnaround histogram."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from db.models import Instance, InstanceStatus, Prediction, as_utc
from db.repo import status_counts
from db.session import session_scope

# Seconds from arrival (C-STORE response) to the result in the worklist.
TURNAROUND_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
QUEUED_STATES = (
    InstanceStatus.RECEIVED,
    InstanceStatus.QUEUED,
    InstanceStatus.PROCESSING,
    InstanceStatus.AWAITING_MODEL,
)


class DatabaseCollector(Collector):
    """Every scrape reads the current state, so restarts of the API lose nothing."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.database_url) as session:
            counts = status_counts(session)
            first_results = (
                select(Prediction.instance_id, func.min(Prediction.created_at).label("at"))
                .group_by(Prediction.instance_id)
                .subquery()
            )
            pairs = session.execute(
                select(Instance.received_at, first_results.c.at).join(
                    first_results, first_results.c.instance_id == Instance.id
                )
            ).all()
        yield _counter("cxr_instances_received", "Instances received and stored.", sum(counts.values()))
        yield _counter("cxr_instances_triaged", "Instances with a triage result.", counts.get(InstanceStatus.DONE, 0))
        yield _counter("cxr_instances_failed", "Instances whose triage failed.", counts.get(InstanceStatus.FAILED, 0))
        depth = GaugeMetricFamily("cxr_queue_depth", "Instances waiting for a result, by status.", labels=["status"])
        for state in QUEUED_STATES:
            depth.add_metric([state], counts.get(state, 0))
        yield depth
        yield _histogram([(as_utc(done) - as_utc(received)).total_seconds() for received, done in pairs])


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _histogram(values: list[float]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = [
        (str(le), float(sum(1 for v in values if v <= le))) for le in TURNAROUND_BUCKETS
    ]
    buckets.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(
        "cxr_triage_turnaround_seconds",
        "From an instance's arrival to its result in the worklist.",
        buckets=buckets,
        sum_value=sum(values),
    )
