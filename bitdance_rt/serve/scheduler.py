"""The scheduler in front of one :class:`~bitdance_rt.runtime.session.Session` (or an
:class:`~bitdance_rt.imagenet.serving.ImageNetSession`, which takes the same calls): a bounded
queue and one worker thread that runs compatible requests as one AR run.

Requests with the same size, steps and guidance share a run (up to ``max_batch`` images, in
arrival order: the oldest waiting request always goes next, and later compatible ones join
it). Each request keeps its own seed (the runtime gives every request its own generator), so
an image is the same whether it was batched or served alone. A plan may say what its requests
must share to run together (``batch_key``: ImageNet plans, whose size is the model's).

A request can be cancelled at any time (its client went away or its time ran out): it leaves
the queue at once, or, when running, its answer is given up at once and it is dropped from the
run at the next block (``on_step`` names it: the runtime stops computing its rows, and the
others' images do not change); when every request of a run is gone the run is abandoned.

Nothing here knows about HTTP: a job tells a listener (any thread) when it changes.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BitDanceError
from ..request import GenerationRequest, ImagePlan
from ..runtime.timing import StageTimer

log = logging.getLogger("bitdance_rt.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class QueueFull(BitDanceError):
    """The queue holds ``--max-queue`` requests already; ``retry_after`` seconds is a guess
    at when there will be room."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosed(BitDanceError):
    """The server is shutting down and takes no new work."""


class _Abandoned(Exception):
    """Raised from ``on_step`` when no request of the run is still waiting for it."""


@dataclass(eq=False)
class Job:
    """One request's way through the scheduler. ``listener()`` is called (from any thread)
    after every change of state or progress."""

    plan: ImagePlan                            # one request's, made (and tokenized) once
    listener: Callable[[], None] | None = None
    arrived: float = field(default_factory=time.monotonic)
    state: str = QUEUED
    blocks_done: int = 0
    blocks_total: int = 0
    batch_images: int = 0                      # images in the run this job was part of
    started: float | None = None
    finished: float | None = None
    images: object = None                      # uint8 [n, H, W, 3] when done
    error: BaseException | None = None
    reason: str | None = None                  # why it was cancelled

    @property
    def request(self) -> GenerationRequest:
        """The request, resolved: every setting filled in."""
        return self.plan.request

    @property
    def key(self) -> tuple:
        """Jobs of equal keys may share a run."""
        key = getattr(self.plan, "batch_key", None)
        if key is not None:
            return key
        r = self.request
        return (r.height, r.width, r.steps, r.guidance)

    @property
    def size(self) -> int:
        return self.request.num_images

    @property
    def over(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener()


class Scheduler:
    """Batches jobs onto ``session`` from one worker thread. ``observer`` (optional) hears of
    each run: ``run_done(timer, images, seconds)``, ``run_failed()``, ``run_abandoned()``."""

    def __init__(self, session, max_batch: int, max_queue: int, observer=None):
        self.session = session
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._running: list[Job] = []
        self._run_seconds = None               # moving average, for Retry-After
        self._thread = threading.Thread(target=self._work, name="bitdance-scheduler",
                                        daemon=True)
        self._thread.start()

    # -- the request side -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` or :class:`SchedulerClosed`."""
        if job.size > self.max_batch:
            raise BitDanceError(f"n must be at most {self.max_batch} on this server (its "
                                f"--max-batch); ask for fewer images per request")
        with self._cv:
            if self._closing:
                raise SchedulerClosed("the server is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue and (self._queue or self._running):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting, "
                                "--max-queue); retry later", self._retry_after())
            self._queue.append(job)
            self._cv.notify_all()

    def cancel(self, job: Job, reason: str) -> bool:
        """Give up ``job`` (``reason``: "timeout", "disconnected", ...); False if it was over."""
        with self._cv:
            if job.over:
                return False
            if job.state == QUEUED:
                self._queue.remove(job)
            job.state, job.reason, job.finished = CANCELLED, reason, time.monotonic()
        job._notify()
        return True

    def drop_all(self, reason: str) -> tuple[int, int]:
        """Take no new work and give up every queued and running job (the run stops at its
        next block); returns how many were (queued, running)."""
        with self._cv:
            self._closing = True
            queued = list(self._queue)
            running = [j for j in self._running if not j.over]
            self._cv.notify_all()
        dropped = [j for j in queued + running if self.cancel(j, reason)]
        return (sum(j in dropped for j in queued), sum(j in dropped for j in running))

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def running(self) -> int:
        with self._cv:
            return len(self._running)

    def position(self, job: Job) -> int:
        """How many requests wait ahead of ``job`` (0 when it is next or running)."""
        with self._cv:
            try:
                return self._queue.index(job)
            except ValueError:
                return 0

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued and running, stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def alive(self) -> bool:
        """Whether the worker thread is still running."""
        return self._thread.is_alive()

    def _retry_after(self) -> int:
        runs_ahead = 1 + sum(j.size for j in self._queue) / self.max_batch
        return max(1, math.ceil(runs_ahead * (self._run_seconds or 1.0)))

    # -- the worker -------------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        """The oldest waiting job and the compatible ones after it, up to max_batch images;
        None once closing with nothing left."""
        with self._cv:
            while not self._queue and not self._closing:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch, images = [first], first.size
            for job in list(self._queue):
                if job.key == first.key and images + job.size <= self.max_batch:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.size
            now = time.monotonic()
            for job in batch:
                job.state, job.started, job.batch_images = RUNNING, now, images
            self._running = batch
        for job in batch:
            job._notify()
        return batch

    def _settle(self, job: Job, state: str, images=None, error=None) -> None:
        with self._cv:
            if job.state != RUNNING:
                return
            job.state, job.images, job.error = state, images, error
            job.finished = time.monotonic()
        job._notify()

    def _on_step(self, batch: list[Job]):
        def on_step(done: int, total: int) -> list[int]:
            gone = []
            for i, job in enumerate(batch):
                if job.state == RUNNING:
                    job.blocks_done, job.blocks_total = done, total
                    job._notify()
                else:
                    gone.append(i)
            if len(gone) == len(batch):
                raise _Abandoned()
            return gone
        return on_step

    def _run(self, batch: list[Job]) -> None:
        timer = StageTimer(self.session.settings.get("device", "cpu"))
        t0 = time.monotonic()
        try:
            outs = self.session.generate(*[j.plan for j in batch],
                                         on_step=self._on_step(batch), timer=timer)
        except _Abandoned:
            log.info("run of %d request(s) abandoned: every client went away", len(batch))
            if self.observer:
                self.observer.run_abandoned()
            return
        except Exception as e:  # only this run's requests fail; the server keeps serving
            log.exception("a run of %d request(s) failed", len(batch))
            for job in batch:
                self._settle(job, FAILED, error=e)
            if self.observer:
                self.observer.run_failed()
            return
        seconds = time.monotonic() - t0
        self._run_seconds = seconds if self._run_seconds is None else (
            0.7 * self._run_seconds + 0.3 * seconds)
        for job, images in zip(batch, outs):
            if images is not None:
                self._settle(job, DONE, images=images)
        if self.observer:
            self.observer.run_done(timer, sum(j.size for j in batch), seconds)

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._running = []
