"""One serving process's state: the session, its scheduler and metrics, and the steps of a
request that are not HTTP (validate, submit, encode). The FastAPI app (``app.py``) maps
routes onto it; a Ray replica holds one.

The session is a text-to-image :class:`~bitdance_rt.runtime.session.Session`, or, for a
checkpoint directory of the class-conditional ImageNet family, an
:class:`~bitdance_rt.imagenet.serving.ImageNetSession` (the same calls; ``family`` tells them
apart): the routes, limits, queue and scheduler are the same for both."""

from __future__ import annotations

import logging
import threading
import time

from ..limits import DEFAULT_SEED
from ..request import GenerationRequest, ImagePlan
from .api import IMAGENET, T2I, ApiError, ImagesBody, size_text, to_request
from .config import ServeConfig
from .metrics import Metrics
from .redact import redact
from .scheduler import Job, QueueFull, Scheduler, SchedulerClosed

log = logging.getLogger("bitdance_rt.serve")

LOADING, READY, FAILED, DRAINING = "loading", "ready", "failed", "draining"
DROPPED_JOIN_S = 2.0    # after drop_all: how long close() waits for the worker's current block


class ImageService:
    """Loads the model (``load``, blocking, or ``start_loading`` in a thread), then serves
    requests through one :class:`Scheduler`. ``session`` may be given (tests)."""

    def __init__(self, config: ServeConfig, session=None):
        self.config = config
        self.metrics = Metrics()
        self.session = session
        self.scheduler: Scheduler | None = None
        self.state = LOADING
        self.error: BaseException | None = None
        self.created = int(time.time())
        self._dropped = False
        # known before the model loads (a request's fields are checked against it)
        self.family = (getattr(session, "family", T2I) if session is not None
                       else config.family)

    # -- life cycle -------------------------------------------------------------------------

    def load(self, say=None) -> None:
        """Open the session (unless given), warm it up, start the scheduler: then ready.
        Raises what ``Session.open`` (``ImageNetSession.open``) raises (and records it)."""
        from ..runtime.session import Session, builtin_checkpoint

        try:
            if self.session is None:
                c = self.config
                if self.family == IMAGENET:
                    from ..imagenet.serving import ImageNetSession

                    self.session = ImageNetSession.open(c.checkpoint, backend=c.backend,
                                                        device=c.device, dtype=c.dtype)
                else:
                    checkpoint = c.checkpoint or builtin_checkpoint(say=say or log.warning)
                    self.session = Session.open(checkpoint, backend=c.backend,
                                                device=c.device, dtype=c.dtype,
                                                engine_dir=c.engine_dir,
                                                cuda_graphs=c.cuda_graphs, compile=c.compile,
                                                warn=lambda m: log.warning(m))
            if self.config.warmup:
                t0 = time.monotonic()
                self.session.generate(self.warmup_request())
                log.info("warmed up in %.1f s", time.monotonic() - t0)
        except BaseException as e:
            self.error, self.state = e, FAILED
            raise
        self.scheduler = Scheduler(self.session, self.config.max_batch, self.config.max_queue,
                                   observer=self.metrics)
        self.metrics.watch_queue(self.scheduler)
        self.metrics.watch_gpu(self.session.settings.get("device", "cpu"))
        self.metrics.ready.set(1)
        self.state = READY
        log.info("ready: %s on %s, up to %d images a run, %d requests queued", self.model_id,
                 self.session.settings.get("device"), self.config.max_batch,
                 self.config.max_queue)

    def start_loading(self, on_fail=None, say=None) -> threading.Thread:
        """``load`` in a thread; ``on_fail(error)`` if it fails."""
        def run():
            try:
                self.load(say=say)
            except BaseException as e:  # noqa: BLE001 (handed to on_fail, shown by the CLI)
                log.error("loading the model failed: %s", e)
                if on_fail:
                    on_fail(e)
        t = self._loader = threading.Thread(target=run, name="bitdance-load", daemon=True)
        t.start()
        return t

    def loading(self) -> bool:
        """Whether the model is still loading (in a thread that may be inside native code)."""
        loader = getattr(self, "_loader", None)
        return loader is not None and loader.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests; finish what is queued and running (waiting at most
        ``timeout`` seconds for the worker; after :meth:`drop_all`, a few)."""
        if self.state == READY:
            self.state = DRAINING
        self.metrics.ready.set(0)
        if self.scheduler is not None:
            self.scheduler.close(DROPPED_JOIN_S if self._dropped else timeout)

    def worker_busy(self) -> bool:
        """Whether the scheduler's worker is still in a run (after close: a block it could
        not leave in time)."""
        return self.scheduler is not None and self.scheduler.alive()

    def drop_all(self, reason: str = "shutdown") -> tuple[int, int]:
        """Give up every queued and running request (their handlers answer 503) and take no
        new ones; returns (queued, running) dropped. For a drain past its bound."""
        if self.state == READY:
            self.state = DRAINING
        self._dropped = True
        if self.scheduler is None:
            return 0, 0
        return self.scheduler.drop_all(reason)

    @property
    def imagenet(self) -> bool:
        """Whether the model is class-conditional (ImageNet)."""
        return self.family == IMAGENET

    def warmup_request(self) -> GenerationRequest:
        """One image at the model's smallest size, one step, the default guidance (ImageNet:
        one image of class 0, one step)."""
        if self.imagenet:
            return self.session.warmup_plan()
        spec = self.session.spec
        h, w = min(spec.info.sizes, key=lambda s: s[0] * s[1])
        return GenerationRequest("warm-up", h, w, steps=1, seed=0)

    # -- what the routes call ---------------------------------------------------------------

    @property
    def model_id(self) -> str:
        if self.session is None:
            return "loading"
        return self.session.name if self.imagenet else self.session.spec.name

    @property
    def checkpoint_name(self) -> str:
        """What an answer says of the checkpoint: its directory's name, never its path."""
        path = getattr(self.session, "checkpoint", None) or self.config.checkpoint
        return path.name if path else ""

    def public(self, text: str) -> str:
        """``text`` fit for a client: server paths cut to their names (see ``redact``)."""
        known = {}
        for path in (self.config.checkpoint, self.config.engine_dir,
                     getattr(self.session, "checkpoint", None)):
            if path:
                known[str(path)] = path.name
        return redact(text, known)

    def check_ready(self) -> None:
        if self.state == READY:
            return
        if self.state == LOADING:
            raise ApiError(503, "the model is still loading; retry in a few seconds (GET "
                           "/healthz says when it is ready)", headers={"Retry-After": "5"})
        if self.state == DRAINING:
            raise ApiError(503, "the server is shutting down; retry on another server",
                           headers={"Retry-After": "5"})
        raise ApiError(503, f"the model failed to load: {self.public(str(self.error))}")

    def request_from(self, body: ImagesBody) -> ImagePlan:
        """The request's plan (checked and tokenized once; it travels to the scheduler)."""
        self.check_ready()
        n, most = body.n, self.config.max_batch
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= most):
            more = "; send several requests for more images" if isinstance(n, int) and n > most \
                else ""
            raise ApiError(400, f"n must be from 1 to {most} on this server (its --max-batch), "
                           f"got {n!r}{more}", "n")
        return to_request(body, self.session, self.model_id)

    def submit(self, plan: ImagePlan, listener=None) -> Job:
        # known before it runs (ImageNet: its AR steps)
        blocks = (self.session.num_blocks if self.imagenet
                  else plan.tokens // self.session.spec.parallel_num)
        job = Job(plan, listener=listener, blocks_total=blocks)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), headers={"Retry-After": str(e.retry_after)},
                           kind="rate_limit_exceeded") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from None
        return job

    def cancel(self, job: Job, reason: str) -> bool:
        """Give up ``job``; False when it was already over."""
        return self.scheduler.cancel(job, reason)

    def png_bytes(self, job: Job) -> list[bytes]:
        """The job's images as PNG files with the CLI's text metadata (the runtime's writer),
        except that the checkpoint is named by its directory's name, not its path."""
        from ..runtime.images import png_bytes

        meta = self.session.metadata(job.request)
        if "checkpoint" in meta or not self.imagenet:
            meta = {**meta, "checkpoint": self.checkpoint_name}
        return [png_bytes(image.numpy(), {**meta, "image_index": i})
                for i, image in enumerate(job.images)]

    def image_size(self, job: Job) -> tuple[int, int]:
        """(height, width) of the job's images."""
        if self.imagenet:
            return (self.session.image_size,) * 2
        return job.request.height, job.request.width

    def models(self) -> dict:
        """``GET /v1/models``: the OpenAI list shape, with the sizes (width x height) and
        defaults of the model."""
        data = []
        if self.session is not None and self.imagenet:
            s = self.session
            size = size_text(s.image_size, s.image_size)
            data.append({
                "id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "bitdance-rt", "family": IMAGENET,
                "sizes": [size], "default_size": size,
                "defaults": {**s.defaults, "seed": DEFAULT_SEED},
                "max_images": self.config.max_batch,
                "num_classes": s.num_classes, "ar_steps": s.num_blocks,
                "description": f"class-conditional ImageNet model ({s.num_classes} classes): "
                               "send \"class\", an index or a class name",
            })
        elif self.session is not None:
            spec = self.session.spec
            d = spec.info.defaults
            data.append({
                "id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "bitdance-rt",
                "family": T2I, "sizes": [size_text(h, w) for h, w in spec.info.sizes],
                "default_size": size_text(d.height, d.width),
                "defaults": {"steps": d.steps, "guidance": d.guidance, "seed": DEFAULT_SEED},
                "max_images": self.config.max_batch,
                "description": spec.info.description,
            })
        return {"object": "list", "data": data}

    def health(self) -> tuple[int, dict]:
        body = {"status": self.state, "model": self.model_id}
        if self.state == FAILED:
            body["error"] = self.public(str(self.error))
        if self.scheduler is not None:
            body["queued"] = self.scheduler.queued()
        return (200 if self.state == READY else 503), body
