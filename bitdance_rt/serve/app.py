"""The HTTP face of an :class:`~bitdance_rt.serve.service.ImageService`: a FastAPI app with the
OpenAI Images API, health, metrics and the page. The same app runs under uvicorn
(``bitdance-rt serve``) and as the ingress of every Ray Serve replica (``--ray``).

Routes: ``POST /v1/images/generations`` (JSON, or server-sent progress events with
``"stream": true``), ``GET /v1/models``, ``GET /healthz`` (200 only when loaded and warmed up;
never needs the key), ``GET /metrics`` (Prometheus), ``GET /`` (the page). Every route is
behind the rules of ``limits.py`` (body size, client timeouts, the count of every answer);
every error is OpenAI's error shape, and no answer carries a server path, host or process id.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .api import ApiError, parse_body, size_text
from .limits import CLIENT_GONE, Guard, record_status
from .metrics import CONTENT_TYPE
from .page import PAGE
from .scheduler import CANCELLED, DONE, FAILED, Job
from .service import ImageService

GENERATIONS = "/v1/images/generations"
ROUTES = (GENERATIONS, "/v1/models", "/healthz", "/metrics", "/")
POLL_S = 0.25          # how often a waiting request looks for its client and its deadline
# which process (Ray: replica) answered: random, so that it names neither the host nor the pid
SERVED_BY = secrets.token_hex(4)


def create_app(service: ImageService, load: str = "background", on_fail=None) -> FastAPI:
    """The app over ``service``. ``load``: "background" (the port answers at once and
    /healthz says when the model is ready; ``on_fail(error)`` if loading fails), "startup"
    (loaded before the app takes requests: Ray replicas) or "none" (already loaded)."""

    @asynccontextmanager
    async def lifespan(app):
        if load == "background":
            service.start_loading(on_fail=on_fail)
        elif load == "startup":
            await anyio.to_thread.run_sync(service.load)
        yield
        await anyio.to_thread.run_sync(service.close)

    app = FastAPI(title="bitdance-rt", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    if service.config.api_key:
        app.add_middleware(ApiKey, key=service.config.api_key)

    def on_answer(scope, status: int) -> None:
        path = scope.get("path")
        service.metrics.responded(path if path in ROUTES else "other", status)
        if path == GENERATIONS:
            service.metrics.answered(status)

    # outside the key check: its 401s are counted, an oversized body is refused unread
    app.add_middleware(Guard, client_timeout=service.config.client_timeout, on_answer=on_answer)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e, service)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # 404, 405: OpenAI's error shape too
        # the client's own path is named as sent (cut to 200 characters), never redacted
        path = " ".join(request.url.path.split())
        path = path if len(path) <= 200 else path[:197] + "..."
        err = ApiError(e.status_code, service.public(f"{e.detail}; the routes are: "
                                                     f"{', '.join(ROUTES)}"),
                       headers=dict(e.headers or {}))
        body = err.body()
        body["error"]["message"] = f"{request.method} {path}: {err.message}"
        return JSONResponse(body, err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug: the log has the traceback
        return error_response(ApiError(500, f"internal error ({type(e).__name__}); the server "
                                       "keeps serving: retry, or report it with the server "
                                       "log"), service)

    @app.get("/healthz")
    async def healthz():
        status, body = service.health()
        return JSONResponse(body, status)

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.post(GENERATIONS)
    async def generations(request: Request):
        t0 = time.monotonic()
        watch = Watch()
        try:  # the body is counted and timed as it arrives (limits.Guard)
            body = parse_body(await request.body(), service.family)
            req = await run_in_threadpool(service.request_from, body)  # tokenizes the prompt
            job = service.submit(req, watch.listener)
        except ApiError as e:
            return error_response(e, service)
        deadline = job.arrived + service.config.timeout
        if body.stream:
            return StreamingResponse(_events(service, job, watch, deadline, t0, request.scope),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for _ in _follow(service, job, watch, deadline, request.is_disconnected):
                pass
        except asyncio.CancelledError:  # the server cancelled us (Ray: the client went away)
            service.cancel(job, "disconnected")
            raise
        try:
            pngs = await _finish(service, job, t0)
        except ApiError as e:
            return error_response(e, service)
        return JSONResponse(
            {"created": int(time.time()),
             "data": [{"b64_json": base64.b64encode(p).decode()} for p in pngs]},
            headers={"X-Batch-Images": str(job.batch_images),
                     "X-Queue-Seconds": f"{job.started - job.arrived:.3f}",
                     "X-Served-By": SERVED_BY})

    return app


def error_response(e: ApiError, service: ImageService | None = None) -> JSONResponse:
    return JSONResponse(_error_body(e, service), e.status, headers=e.headers)


def _error_body(e: ApiError, service: ImageService | None) -> dict:
    """OpenAI's error shape, its message without server paths."""
    body = e.body()
    if service is not None:
        body["error"]["message"] = service.public(body["error"]["message"])
    return body


class Watch:
    """Wakes an asyncio task when the scheduler (another thread) changes a job."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def listener(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    async def changed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.event.clear()


async def _follow(service: ImageService, job: Job, watch: Watch, deadline: float,
                  is_disconnected=None):
    """Yields after every change of ``job`` until it is over; gives it up when its deadline
    passes or (``is_disconnected``) its client has gone away."""
    while not job.over:
        left = deadline - time.monotonic()
        if left <= 0:
            service.cancel(job, "timeout")
            break
        await watch.changed(min(left, POLL_S))
        if is_disconnected is not None and await is_disconnected():
            service.cancel(job, "disconnected")
            break
        yield job


async def _finish(service: ImageService, job: Job, t0: float) -> list[bytes]:
    """The PNGs of a finished job, or the ApiError that answers it; records the metrics."""
    m = service.metrics
    if job.state == DONE:
        t_enc = time.monotonic()
        pngs = await run_in_threadpool(service.png_bytes, job)
        now = time.monotonic()
        m.request_done(job.started - job.arrived, now - t_enc, now - t0, job.size)
        return pngs
    if job.state == FAILED:
        err = job.error
        first = (str(err).strip().splitlines() or [""])[0][:300]
        e = ApiError(500, f"generation failed ({type(err).__name__}: {first}); this request's "
                     "batch was dropped, the server keeps serving: retry, or report it with "
                     "the server log")
    elif job.state == CANCELLED and job.reason == "timeout":
        e = ApiError(504, f"the request did not finish within {service.config.timeout:g} s "
                     "(the server's --timeout); retry when the queue is shorter, or ask for "
                     "fewer steps or images", kind="timeout")
    elif job.state == CANCELLED and job.reason == "shutdown":
        e = ApiError(503, f"the server shut down before this request finished (its drain "
                     f"lasts at most {service.config.drain_seconds:g} s, --drain-timeout); "
                     "retry on another server", headers={"Retry-After": "5"})
    else:
        e = ApiError(CLIENT_GONE, "the client went away")
    m.request_done(None if job.started is None else job.started - job.arrived, None,
                   time.monotonic() - t0)
    raise e


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(service: ImageService, job: Job, watch: Watch, deadline: float, t0: float,
                  scope: dict):
    """Server-sent events: ``image_generation.progress`` (state, place in the queue, blocks
    done) on every change, then one ``image_generation.completed`` per image (OpenAI's
    streaming event, with ``b64_json``) or one ``error``. A client that goes away cancels the
    job (the next write fails, or the server cancels the stream)."""
    last = _progress(service, job)
    try:
        yield _sse("image_generation.progress", last)
        async for _ in _follow(service, job, watch, deadline):
            p = _progress(service, job)
            if p != last:
                last = p
                yield _sse("image_generation.progress", p)
        try:
            pngs = await _finish(service, job, t0)
        except ApiError as e:
            record_status(scope, e.status)  # sent as 200: count what it was
            yield _sse("error", {"type": "error", **_error_body(e, service)})
            return
        r = job.request
        size = size_text(*service.image_size(job))
        for i, png in enumerate(pngs):
            yield _sse("image_generation.completed", {
                "type": "image_generation.completed", "image_index": i,
                "b64_json": base64.b64encode(png).decode(), "created_at": int(time.time()),
                "size": size, "output_format": "png", "seed": r.seed,
                "batch_images": job.batch_images})
    finally:  # the client went away (a gone client is counted 499 by limits.Guard)
        service.cancel(job, "disconnected")


def _progress(service: ImageService, job: Job) -> dict:
    return {"type": "image_generation.progress", "state": job.state,
            "queue_position": service.scheduler.position(job) if job.state == "queued" else 0,
            "blocks_done": job.blocks_done, "blocks_total": job.blocks_total,
            "batch_images": job.batch_images}


class ApiKey:
    """ASGI middleware: every route but /healthz needs ``Authorization: Bearer KEY`` (or HTTP
    Basic with KEY as the password, so a browser can open the page)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def _ok(self, scope) -> bool:
        auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(value.strip(), self.key)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(value.strip()).partition(b":")[2]
            except ValueError:
                return False
            return hmac.compare_digest(password, self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/healthz" or self._ok(scope):
            return await self.app(scope, receive, send)
        challenge = 'Basic realm="bitdance-rt"' if scope["path"] == "/" else "Bearer"
        sent = dict(scope.get("headers") or ()).get(b"authorization")
        what = ("the API key sent is not this server's: send the key it was started with"
                if sent else "this server needs an API key: send the header 'Authorization: "
                "Bearer KEY'")
        e = ApiError(401, f"{what} (the key given to bitdance-rt serve --api-key or "
                     "BITDANCE_API_KEY)",
                     headers={"WWW-Authenticate": challenge}, kind="authentication_error")
        await error_response(e)(scope, receive, send)
