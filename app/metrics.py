"""Prometheus metrics of one service instance, served at ``GET /metrics`` (prometheus-client).

Every app instance has its own ``CollectorRegistry`` (no process-global state: several apps in one process,
as in the tests, never clash). Recorded as they happen:

* ``medserve_requests_total{endpoint, model, status}``: HTTP requests by route template (``/segment``;
  ``unmatched`` for unknown paths), the model that answered (``X-Model-Name``; empty when none did) and status.
* ``medserve_request_duration_seconds{endpoint, model}``: latency histogram, whole request.
* ``medserve_batch_size{model}``: requests per model batch.
* ``medserve_queue_wait_seconds{model}``: time each request waited in its model's queue before its batch ran.
* ``medserve_batch_duration_seconds{model}``: time of one batch in the model.
* ``medserve_ood_scored_total{model}`` / ``medserve_ood_flagged_total{model}``: images answered with an
  out-of-distribution score, and those of them flagged (``app.ood``).

Read from the live state at each scrape (a custom collector):

* ``medserve_queue_depth{model}`` (decoded, waiting) and ``medserve_queue_announced{model}`` (being read or
  decoded), ``medserve_queue_limit{model}``;
* ``medserve_model_ready{model}`` (1 ready, 0 loading or failed), ``medserve_model_load_seconds{model}``;
* ``medserve_model_version_info{model, version, state}``: 1 per loaded version (serving, previous, draining);
* ``medserve_rejected_total{model, reason}`` (queue_full, timeout, cancelled, failed) from the batchers;
* ``medserve_gpu_memory_allocated_bytes`` / ``_reserved_bytes`` / ``_max_allocated_bytes`` on CUDA only;
* ``process_*`` (resident memory, CPU time, open files) from prometheus-client's process collector.

Label values never come from the client: endpoints are route templates and models are names of served
checkpoints, so a caller cannot grow the number of series.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from app.errors import NotReady, retry_after
from app.registry import ModelRegistry

logger = logging.getLogger("medserve.metrics")

# Seconds: from a fast classification (few ms) to a large tiled segmentation on a CPU (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNMATCHED = "unmatched"


class _LiveState(Collector):
    """Queue depths, model status and load time, batcher refusals and GPU memory, read at scrape time."""

    def __init__(self) -> None:
        self.registry: ModelRegistry | None = None

    def collect(self) -> Iterator[Metric]:
        registry = self.registry
        if registry is None:
            return
        depth = GaugeMetricFamily(
            "medserve_queue_depth", "Decoded requests waiting for the model", labels=["model"]
        )
        announced = GaugeMetricFamily(
            "medserve_queue_announced",
            "Requests holding a queue place while read or decoded",
            labels=["model"],
        )
        limit = GaugeMetricFamily("medserve_queue_limit", "MEDSERVE_MAX_QUEUE per model", labels=["model"])
        ready = GaugeMetricFamily("medserve_model_ready", "1 when the model serves, else 0", labels=["model"])
        load = GaugeMetricFamily(
            "medserve_model_load_seconds", "Time to load and warm up the model", labels=["model"]
        )
        refused = CounterMetricFamily(
            "medserve_rejected",
            "Requests the batcher did not run: queue_full (503), timeout (504), cancelled (client gone), "
            "failed (the model raised)",
            labels=["model", "reason"],
        )
        versions = GaugeMetricFamily(
            "medserve_model_version_info",
            "1 per loaded version of a model (state: serving, previous or draining)",
            labels=["model", "version", "state"],
        )
        for version in [v for h in registry.models.values() for v in h.versions] + list(registry.draining):
            versions.add_metric([version.name, version.version, version.state], 1.0)
        for name, handle in list(registry.models.items()):
            ready.add_metric([name], 1.0 if handle.status == "ready" else 0.0)
            if handle.load_seconds is not None:
                load.add_metric([name], handle.load_seconds)
            batcher = handle.batcher
            if batcher is None:
                continue
            depth.add_metric([name], batcher.queue_depth)
            announced.add_metric([name], batcher.announced)
            limit.add_metric([name], batcher.max_queue)
            stats = batcher.stats
            for reason, count in (
                ("queue_full", stats.rejected),
                ("timeout", stats.timed_out),
                ("cancelled", stats.cancelled),
                ("failed", stats.failed),
            ):
                refused.add_metric([name, reason], count)
        yield from (depth, announced, limit, ready, load, refused, versions)
        yield from _gpu_memory(registry.device)


def _gpu_memory(device: torch.device) -> Iterator[Metric]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    try:
        values = {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "max_allocated": torch.cuda.max_memory_allocated(device),
        }
    except Exception:  # a broken CUDA context must not break the scrape
        logger.warning("cannot read CUDA memory statistics", exc_info=True)
        return
    for kind, value in values.items():
        gauge = GaugeMetricFamily(
            f"medserve_gpu_memory_{kind}_bytes",
            f"torch.cuda memory {kind} on the serving device",
            labels=["device"],
        )
        gauge.add_metric([str(device)], float(value))
        yield gauge


class ServiceMetrics:
    """The metrics of one app instance, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "medserve_requests",
            "HTTP requests by endpoint (route template), model and status code",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "medserve_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "medserve_batch_size",
            "Requests per model batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "medserve_queue_wait_seconds",
            "Time a request waited in its model's queue before its batch ran",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.batch_duration = Histogram(
            "medserve_batch_duration_seconds",
            "Time of one batch in the model (all its forward passes)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ood_scored = Counter(
            "medserve_ood_scored",
            "Images answered with an out-of-distribution score",
            ["model"],
            registry=self.registry,
        )
        self.ood_flagged = Counter(
            "medserve_ood_flagged",
            "Images answered with the out-of-distribution flag set",
            ["model"],
            registry=self.registry,
        )
        self._live = _LiveState()
        self.registry.register(self._live)
        ProcessCollector(registry=self.registry)

    def bind(self, registry: ModelRegistry) -> None:
        """Reads queue depths, model status and GPU memory from ``registry`` at each scrape."""
        self._live.registry = registry

    def observe_request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)

    def observe_batch(self, model: str, queue_seconds: Sequence[float], run_seconds: float) -> None:
        """Called by the batcher after each batch: each request's time in the queue and the batch's run time."""
        self.batch_size.labels(model).observe(len(queue_seconds))
        wait = self.queue_wait.labels(model)
        for seconds in queue_seconds:
            wait.observe(seconds)
        self.batch_duration.labels(model).observe(run_seconds)

    def observe_ood(self, model: str, scored: int, flagged: int) -> None:
        """Counts an answer's images with an OOD score and those flagged."""
        if scored:
            self.ood_scored.labels(model).inc(scored)
            self.ood_flagged.labels(model).inc(flagged)

    def render(self) -> bytes:
        """The Prometheus text format (version 0.0.4) of every metric."""
        return generate_latest(self.registry)


router = APIRouter()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request) -> Response:
    """Requests by endpoint, model and status, latency, batch size, queue depth and wait, model load time, GPU
    memory on CUDA, and process memory. Needs an API key unless ``MEDSERVE_METRICS_AUTH=false``."""
    service_metrics: Any = getattr(request.app.state, "metrics", None)
    if not isinstance(service_metrics, ServiceMetrics):
        raise NotReady("the service is starting", headers=retry_after(5))
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)
