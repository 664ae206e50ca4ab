"""Prometheus metrics of the job system, registered into the service's own registry (``GET /metrics``).

Recorded as they happen:

* ``medserve_instances_received_total{source, outcome}``: instances by how they came (stow, dimse, pull) and
  what became of them (accepted, duplicate, refused).
* ``medserve_delivery_attempts_total{outcome}``: delivery attempts: ``delivered``, ``transient`` (retried),
  ``permanent`` (the archive refused the result).
* ``medserve_delivery_latency_seconds``: from a job's creation (the instance accepted) to its result delivered.

Read from the job store at each scrape:

* ``medserve_jobs{state}``: jobs by state (every state, zeros included);
* ``medserve_jobs_queue_age_seconds``: age of the oldest queued job (0 when none is queued).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.pacs.store import JobStore

logger = logging.getLogger("medserve.pacs.metrics")

# From an instant classification to results waiting out an archive outage.
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


class _StoreState(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.counts()
            oldest = self.store.oldest_queued_at()
        except Exception:  # an unreachable database must not break the scrape
            logger.warning("cannot read the job store for metrics", exc_info=True)
            return
        jobs = GaugeMetricFamily("medserve_jobs", "Jobs in the job store by state", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state], count)
        age = GaugeMetricFamily(
            "medserve_jobs_queue_age_seconds", "Age of the oldest queued job (0 when none is queued)"
        )
        age.add_metric([], max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        yield from (jobs, age)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, JobMetrics] = weakref.WeakKeyDictionary()


class JobMetrics:
    """The job system's metrics in ``registry`` (the app's ``ServiceMetrics.registry``)."""

    def __init__(self, registry: CollectorRegistry, store: JobStore) -> None:
        self.received = Counter(
            "medserve_instances_received",
            "Instances received, by source (stow, dimse, pull) and outcome (accepted, duplicate, refused)",
            ["source", "outcome"],
            registry=registry,
        )
        self.delivery_attempts = Counter(
            "medserve_delivery_attempts",
            "Result delivery attempts by outcome (delivered, transient, permanent)",
            ["outcome"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "medserve_delivery_latency_seconds",
            "Time from an instance's acceptance to its job's result delivered",
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        self._state = _StoreState(store)
        registry.register(self._state)

    @classmethod
    def of(cls, registry: CollectorRegistry, store: JobStore) -> JobMetrics:
        """The job metrics of ``registry``, made on first use; a later lifespan of the same app (tests run
        several) reads the new store into the same series instead of registering them twice."""
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = _BY_REGISTRY[registry] = cls(registry, store)
        metrics._state.store = store
        return metrics

    def observe_received(self, source: str, outcome: str) -> None:
        self.received.labels(source, outcome).inc()

    def observe_delivery(self, outcome: str, latency_s: float | None = None) -> None:
        self.delivery_attempts.labels(outcome).inc()
        if latency_s is not None:
            self.delivery_latency.observe(latency_s)
