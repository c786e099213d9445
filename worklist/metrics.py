"""Prometheus metrics read from the database at scrape time: instance counts, queue depth, turnaround histogram.

A scrape never reads the whole history. Counts and queue depth are one GROUP BY over the indexed `instances.status`
(the database answers with a handful of rows). The turnaround histogram is cumulative and kept in the process: each
scrape reads only the predictions after the last one it has seen (by primary key, at most `max_rows_per_scrape`
rows), so after the first scrapes of a process the work is proportional to the new results, not to the table. A
restarted process rebuilds the histogram in bounded steps over its first scrapes. Whole answers are reused for
CXR_METRICS_CACHE_S seconds, so a burst of scrapes (the endpoint is public) costs one database read.

The site's quality signals (the last 24 hours' label mix, mean scores, STAT and OOD rates, the drift checks, the AI's
agreement with confirmed reads per label and ISO week) come from the worklist's `QualityMonitor`, which re-reads
them at most every CXR_DRIFT_REFRESH_S.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from cxr_triage.labels import CLASS_LABELS
from cxr_triage.result_kinds import RESULT_KINDS
from cxr_triage.settings import Settings
from db.models import Instance, InstanceStatus, Prediction, PredictionRole, as_utc
from db.repo import result_counts, status_counts
from db.session import session_scope
from worklist.quality import QualityMonitor

# Seconds from arrival (C-STORE response) to the result in the worklist.
TURNAROUND_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
QUEUED_STATES = (
    InstanceStatus.RECEIVED,
    InstanceStatus.QUEUED,
    InstanceStatus.PROCESSING,
    InstanceStatus.AWAITING_MODEL,
)


class Turnaround:
    """A cumulative histogram of first-result turnaround, fed in order of prediction id."""

    def __init__(self) -> None:
        self.last_prediction_id = 0
        self.buckets = [0] * len(TURNAROUND_BUCKETS)
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        for i, le in enumerate(TURNAROUND_BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1
        self.count += 1
        self.total += seconds

    def advance(self, session: Session, max_rows: int, batch: int = 5000) -> None:
        """Add the first prediction of each instance among the predictions not seen yet (at most `max_rows`)."""
        earlier = aliased(Prediction)
        read = 0
        while read < max_rows:
            limit = min(batch, max_rows - read)
            rows = session.execute(
                select(Prediction.id, Prediction.created_at, Instance.received_at)
                .join(Instance, Instance.id == Prediction.instance_id)
                .where(Prediction.id > self.last_prediction_id, Prediction.role == PredictionRole.LIVE)
                # an instance's later predictions (another model set) are not its turnaround
                .where(
                    ~exists().where(
                        earlier.instance_id == Prediction.instance_id,
                        earlier.id < Prediction.id,
                        earlier.role == PredictionRole.LIVE,
                    )
                )
                .order_by(Prediction.id)
                .limit(limit)
            ).all()
            for prediction_id, done, received in rows:
                self.add((as_utc(done) - as_utc(received)).total_seconds())
                self.last_prediction_id = prediction_id
            read += len(rows)
            if len(rows) < limit:
                return

    def metric(self) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = [
            (str(le), float(n)) for le, n in zip(TURNAROUND_BUCKETS, self.buckets, strict=True)
        ]
        buckets.append(("+Inf", float(self.count)))
        return HistogramMetricFamily(
            "cxr_triage_turnaround_seconds",
            "From an instance's arrival to its result in the worklist.",
            buckets=buckets,
            sum_value=self.total,
        )


class DatabaseCollector(Collector):
    """Counts read at scrape time (restarts of the API lose nothing); the histogram advances incrementally."""

    def __init__(
        self,
        database_url: str,
        *,
        cache_s: float = 5.0,
        max_rows_per_scrape: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database_url = database_url
        self.cache_s = cache_s
        self.max_rows_per_scrape = max_rows_per_scrape
        self.clock = clock
        self.turnaround = Turnaround()
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self.clock()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._read())
            metrics = self._cached[1]
        yield from metrics

    def _read(self) -> list[Metric]:
        with session_scope(self.database_url) as session:
            counts = status_counts(session)
            results = result_counts(session)
            self.turnaround.advance(session, self.max_rows_per_scrape)
        depth = GaugeMetricFamily("cxr_queue_depth", "Instances waiting for a result, by status.", labels=["status"])
        for state in QUEUED_STATES:
            depth.add_metric([state], counts.get(state, 0))
        deliveries = GaugeMetricFamily(
            "cxr_result_objects",
            "Result objects by kind, interface (transport) and delivery status.",
            labels=["kind", "transport", "status"],
        )
        for (kind, delivery), n in sorted(results.items()):
            transport = str(RESULT_KINDS[kind].transport) if kind in RESULT_KINDS else "unknown"
            deliveries.add_metric([kind, transport, delivery], n)
        return [
            deliveries,
            _counter("cxr_instances_received", "Instances received and stored.", sum(counts.values())),
            _counter("cxr_instances_triaged", "Instances with a triage result.", counts.get(InstanceStatus.DONE, 0)),
            _counter("cxr_instances_failed", "Instances whose triage failed.", counts.get(InstanceStatus.FAILED, 0)),
            depth,
            self.turnaround.metric(),
        ]


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class SpoolCollector:
    """The spool's free space and the watermark below which the listener refuses new instances."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        from infra.disk import spool_space

        try:
            space = spool_space(self.settings)
        except OSError:
            return
        yield GaugeMetricFamily("cxr_spool_free_bytes", "Free bytes on the spool's filesystem.", value=space.free_bytes)
        yield GaugeMetricFamily(
            "cxr_spool_watermark_bytes", "Below this much free space the listener refuses.", value=space.watermark_bytes
        )


class QualityCollector(Collector):
    """The site's own performance and drift, from the monitor's last reading (no database read of its own)."""

    def __init__(self, monitor: QualityMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        quality = self.monitor.current()
        day = quality.last_day
        cases = day.cases if day is not None else 0
        yield GaugeMetricFamily("cxr_predictions_24h", "Live predictions in the last 24 hours.", value=cases)
        share = GaugeMetricFamily("cxr_label_share_24h", "Share of the last 24 hours' predictions per label.",
                                  labels=["label"])  # fmt: skip
        mean = GaugeMetricFamily(
            "cxr_mean_probability_24h", "Mean probability per class over the last 24 hours.", labels=["label"]
        )
        if day is not None and cases:
            for label in CLASS_LABELS:
                share.add_metric([label], day.labels.get(label, 0) / cases)
                mean.add_metric([label], day.mean_scores.get(label, 0.0))
            yield GaugeMetricFamily("cxr_stat_rate_24h", "Share of STAT in the last 24 hours.", value=day.rate("stat"))
            yield GaugeMetricFamily(
                "cxr_ood_rate_24h", "Share out of distribution in the last 24 hours.", value=day.rate("ood")
            )
        yield share
        yield mean
        warning = GaugeMetricFamily(
            "cxr_drift_warning",
            "1 when the last day's rate is outside the range of the previous days (CXR_DRIFT_*), else 0.",
            labels=["check"],
        )
        low = GaugeMetricFamily("cxr_drift_range_low", "Lower end of the baseline range of the daily rate.",
                                labels=["check"])  # fmt: skip
        high = GaugeMetricFamily("cxr_drift_range_high", "Upper end of the baseline range of the daily rate.",
                                 labels=["check"])  # fmt: skip
        for drift in quality.checks:
            warning.add_metric([drift.name], 1.0 if drift.outside else 0.0)
            if drift.low is not None and drift.high is not None:
                low.add_metric([drift.name], drift.low)
                high.add_metric([drift.name], drift.high)
        yield from (warning, low, high)
        ratio = GaugeMetricFamily(
            "cxr_ai_agreement_ratio",
            "Of the confirmed reads of studies the AI gave this label, the share read as that label, per ISO week.",
            labels=["label", "week"],
        )
        reads = GaugeMetricFamily(
            "cxr_ai_agreement_reads", "Confirmed reads behind cxr_ai_agreement_ratio.", labels=["label", "week"]
        )
        for cell in quality.agreement:
            ratio.add_metric([cell.ai_label, cell.week], cell.rate)
            reads.add_metric([cell.ai_label, cell.week], cell.confirmed)
        yield from (ratio, reads)
        confirmed = GaugeMetricFamily("cxr_confirmed_reads", "Current read findings recorded by radiologists.",
                                      labels=["finding"])  # fmt: skip
        for finding, n in quality.findings.items():
            confirmed.add_metric([finding], n)
        yield confirmed
