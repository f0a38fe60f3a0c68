"""What the server takes from a client, and for how long: the rules against hostile or broken
clients, applied to every route.

- A request body is counted as it arrives and refused with 413 once it is over
  ``SERVE_MAX_BODY`` bytes (a ``Content-Length`` over it is refused before a byte is read),
  whatever its framing (``Content-Length`` or chunked): the server never holds more of it.
- A request's body must arrive within ``--client-timeout`` seconds of its head; then 408, and
  the connection is closed. Under uvicorn (:func:`guarded_protocol`) the head too must arrive
  within that time of the connection (or of the previous answer on it).
- Each piece of an answer must be taken by the client within ``--client-timeout`` seconds;
  then the connection is closed (a client that stops reading a stream).
- An answer given before its request's body was read (401, 404, ...) closes the connection,
  so that the rest of the body cannot hold it.
- Every answer is counted by route and status once it is over; an answer the client did not
  stay for counts as 499 and is logged as one line (no traceback).

:class:`Guard` is the ASGI middleware (it runs in the app, so under uvicorn and on Ray Serve);
the head timeout needs the HTTP protocol and is uvicorn's only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import anyio
from starlette.requests import ClientDisconnect

from ..limits import SERVE_MAX_BODY
from .api import ApiError

log = logging.getLogger("bitdance_rt.serve")

CLIENT_GONE = 499      # recorded for requests whose client went away (nginx's convention)
ANSWER = "bitdance.answer"   # the scope key of a request's Answer (routes may set its status)


class Answer:
    """What became of one request: the status sent, or the one a route records for it (a
    stream that ends in an error event was sent as 200)."""

    def __init__(self):
        self.sent: int | None = None        # the status of http.response.start
        self.status: int | None = None      # set by a route: the outcome to count
        self.finishing = False              # the last piece of the answer is on its way
        self.gone = False                   # the client went away before that


def record_status(scope, status: int) -> None:
    """Count this request as answered with ``status`` (whatever status line it was sent)."""
    answer = scope.get(ANSWER)
    if answer is not None:
        answer.status = status


class _SlowReader(Exception):
    """The client did not take a piece of the answer in time."""


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit // 1024} KiB; a request is a JSON "
                    "object with a prompt and a few settings", headers={"Connection": "close"})


def too_slow(seconds: float) -> ApiError:
    return ApiError(408, f"the request body did not arrive within {seconds:g} s of its head "
                    "(the server's --client-timeout); send the whole body at once",
                    headers={"Connection": "close"})


class Guard:
    """ASGI middleware: the body limit, the body and answer timeouts, and the count of every
    answer (``on_answer(scope, status)``) — see the module docstring."""

    def __init__(self, app, client_timeout: float, max_body: int = SERVE_MAX_BODY,
                 on_answer=None):
        self.app, self.timeout, self.max_body = app, client_timeout, max_body
        self.on_answer = on_answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answer = scope[ANSWER] = Answer()
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        received, body_done = 0, False
        has_body = _has_body(scope)

        async def guarded_receive():
            nonlocal received, body_done
            if body_done:
                message = await receive()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise too_slow(self.timeout)
                try:
                    with anyio.fail_after(left):
                        message = await receive()
                except TimeoutError:
                    raise too_slow(self.timeout) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise too_large(self.max_body)
                    body_done = not message.get("more_body", False)
            if message["type"] == "http.disconnect" and not answer.finishing:
                answer.gone = True
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                answer.sent = message["status"]
                headers = list(message.get("headers", ()))
                if has_body and not body_done and not any(
                        k.lower() == b"connection" for k, _ in headers):
                    # answered unread (401, 404, ...): close, or the rest would hold it open
                    message = {**message, "headers": headers + [(b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                answer.finishing = True
            try:
                with anyio.fail_after(self.timeout):
                    await send(message)
            except TimeoutError:
                raise _SlowReader() from None

        status, why = None, "the connection closed before the answer"
        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body:
                await _answer(too_large(self.max_body), send)
                answer.sent = 413
                return
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:  # one line below, no traceback
            status = CLIENT_GONE
        except _SlowReader:
            status = CLIENT_GONE
            why = f"the client did not take the answer within {self.timeout:g} s"
        except asyncio.CancelledError:  # the server cancelled us (Ray: the client went away)
            status = CLIENT_GONE
            raise
        except BaseException:
            status = 500  # the app failed: the server error middleware answers 500
            raise
        finally:
            if status is None:
                gone = answer.gone and not answer.finishing
                status = CLIENT_GONE if gone else (answer.status or answer.sent or 500)
            if status == CLIENT_GONE:
                client = scope.get("client") or ("?", 0)
                log.info("%s:%s - \"%s %s\" %d: %s after %.1f s; its request was dropped",
                         client[0], client[1], scope.get("method"), scope.get("path"),
                         CLIENT_GONE, why, time.monotonic() - t0)
            if self.on_answer is not None:
                self.on_answer(scope, status)


def _has_body(scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(e: ApiError, send) -> None:
    body = json.dumps(e.body(), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw_answer(e: ApiError) -> bytes:
    """``e`` as the bytes of an HTTP/1.1 answer that closes the connection (for a client whose
    request head never arrived, below ASGI)."""
    body = json.dumps(e.body(), separators=(",", ":")).encode()
    return (f"HTTP/1.1 {e.status} {_REASONS.get(e.status, 'Error')}\r\n"
            "content-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


_REASONS = {408: "Request Timeout"}


def guarded_protocol(base: type, client_timeout: float, on_timeout=None) -> type:
    """``base`` (uvicorn's HTTP protocol class) with a head timeout: a connection that has not
    delivered a complete request head within ``client_timeout`` seconds of its start (or of
    its previous answer's end plus its first byte) is answered 408 and closed.
    ``on_timeout(client)`` hears of each."""

    class Guarded(base):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data):
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc):
            self._stop_head_timer()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _watch_head(self):
            if self._waiting_for_head() and not self.transport.is_closing():
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(client_timeout, self._head_late)
            else:
                self._stop_head_timer()

        def _stop_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self):
            self._head_timer = None
            if not self._waiting_for_head() or self.transport.is_closing():
                return
            client = "%s:%s" % tuple(self.client) if self.client else "?"
            log.info("%s - closed: no complete request head within %g s (--client-timeout)",
                     client, client_timeout)
            self.transport.write(raw_answer(ApiError(
                408, f"the request head did not arrive within {client_timeout:g} s (the "
                "server's --client-timeout); send the whole request at once")))
            self.transport.close()
            if on_timeout is not None:
                on_timeout(client)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
