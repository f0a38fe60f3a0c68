"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own so that several
servers (tests, Ray replicas) in one process do not share counters.

- ``bitdance_queue_depth``: requests waiting; ``bitdance_running_requests``: in the current run
- ``bitdance_requests_total{status}``: answered image requests by HTTP status (499: the client
  went away, or did not take its answer in time)
- ``bitdance_responses_total{route,status}``: every answer of every route (``other``: a path
  the server does not serve, or a request whose head never arrived)
- ``bitdance_stage_seconds{stage}``: latency histograms: ``queue`` (arrival to start),
  ``prefill``, ``block_step``, ``head``, ``decode`` (per run, from the runtime's stage timer),
  ``run`` (one AR run), ``encode`` (PNG) and ``total`` (arrival to answer) per request
- ``bitdance_batch_images``: images per AR run; ``bitdance_images_total``
- ``bitdance_images_per_second``: images finished over the last minute, per second
- ``bitdance_runs_total{outcome}``: ok, failed, abandoned (every client gone)
- ``bitdance_ready``: 1 once loaded and warmed up
- ``bitdance_gpu_memory_bytes{kind}``: allocated, reserved, peak (CUDA only)
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_S = 60.0

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters and histograms of one server; also the scheduler's run observer."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("bitdance_queue_depth", "Requests waiting in the queue",
                                 registry=r)
        self.running = Gauge("bitdance_running_requests", "Requests in the current AR run",
                             registry=r)
        self.requests = Counter("bitdance_requests", "Answered image requests by HTTP status",
                                ["status"], registry=r)
        self.responses = Counter("bitdance_responses", "Answers of every route by HTTP status",
                                 ["route", "status"], registry=r)
        self.stage = Histogram("bitdance_stage_seconds", "Latency per stage", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.batch = Histogram("bitdance_batch_images", "Images per AR run",
                               buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("bitdance_images", "Images generated and answered", registry=r)
        self.rate = Gauge("bitdance_images_per_second",
                          f"Images finished over the last {RATE_WINDOW_S:g} s, per second",
                          registry=r)
        self.runs = Counter("bitdance_runs", "AR runs by outcome", ["outcome"], registry=r)
        self.ready = Gauge("bitdance_ready", "1 once the model is loaded and warmed up",
                           registry=r)
        self._done = collections.deque()          # (time, images) within the rate window
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self.rate.set_function(self._images_per_second)
        self._gpu = None

    def watch_queue(self, scheduler) -> None:
        self.queue_depth.set_function(scheduler.queued)
        self.running.set_function(scheduler.running)

    def watch_gpu(self, device: str) -> None:
        """Export CUDA memory of ``device`` (nothing on the CPU)."""
        import torch

        if not device.startswith("cuda") or self._gpu is not None:
            return
        self._gpu = Gauge("bitdance_gpu_memory_bytes", "CUDA memory of the serving device",
                          ["kind"], registry=self.registry)
        dev = torch.device(device)
        self._gpu.labels("allocated").set_function(lambda: torch.cuda.memory_allocated(dev))
        self._gpu.labels("reserved").set_function(lambda: torch.cuda.memory_reserved(dev))
        self._gpu.labels("peak").set_function(lambda: torch.cuda.max_memory_allocated(dev))

    # -- observations -----------------------------------------------------------------------

    def answered(self, status: int) -> None:
        """One answer of the images route."""
        self.requests.labels(str(status)).inc()

    def responded(self, route: str, status: int) -> None:
        """One answer of any route."""
        self.responses.labels(route, str(status)).inc()

    def request_done(self, queue_s: float | None, encode_s: float | None, total_s: float,
                     images: int = 0) -> None:
        if queue_s is not None:
            self.stage.labels("queue").observe(queue_s)
        if encode_s is not None:
            self.stage.labels("encode").observe(encode_s)
        self.stage.labels("total").observe(total_s)
        if images:
            self.images.inc(images)
            with self._lock:
                self._done.append((time.monotonic(), images))

    def _images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - RATE_WINDOW_S:
                self._done.popleft()
            window = min(RATE_WINDOW_S, max(now - self._t0, 1.0))
            return sum(n for _, n in self._done) / window

    # the scheduler's observer
    def run_done(self, timer, images: int, seconds: float) -> None:
        for name, stats in timer.stats.items():
            self.stage.labels(name).observe(stats.seconds)
        self.stage.labels("run").observe(seconds)
        self.batch.observe(images)
        self.runs.labels("ok").inc()

    def run_failed(self) -> None:
        self.runs.labels("failed").inc()

    def run_abandoned(self) -> None:
        self.runs.labels("abandoned").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
