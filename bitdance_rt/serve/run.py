"""Run the app in this process on uvicorn: bind (loopback by default), load the model in the
background (/healthz says when it is ready), serve until SIGTERM or Ctrl-C.

SIGTERM drains: uvicorn stops accepting connections, every request already received (queued
or running) is answered, the scheduler stops, and the process exits 0. The drain lasts at most
``--drain-timeout`` seconds (default: the ``--timeout``): then every request still queued or
running is answered 503, the connections still open are closed, one line says what was
dropped, and the process exits 0 all the same. A second Ctrl-C forces the exit.

Slow clients are bounded too (``limits.py``): a request head or body that takes longer than
``--client-timeout`` is answered 408 and its connection closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

from .. import signals
from ..errors import BitDanceError
from .config import ServeConfig

log = logging.getLogger("bitdance_rt.serve")


def check_port(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be bound."""
    if not 0 <= port <= 65535:
        raise BitDanceError(f"--port must be from 0 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise BitDanceError(f"cannot listen on {host}:{port} ({e.strerror}); choose another "
                                "--port or --host") from None


DROP_GRACE_S = 1.0   # after dropping the requests: time for their 503s before connections close
CLOSE_GRACE_S = 3.0  # after closing the connections: time for their handlers before exiting


def make_server(app, service, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info"):
    """The uvicorn server of ``app``: request heads timed (``limits.guarded_protocol``),
    SIGTERM's drain bounded by ``service.config.drain_seconds``."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .limits import guarded_protocol

    config = service.config

    def head_late(client):
        service.metrics.responded("other", 408)

    protocol = guarded_protocol(AutoHTTPProtocol, config.client_timeout, on_timeout=head_late)
    return _server_class()(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                          lifespan="on", http=protocol,
                                          timeout_graceful_shutdown=None), service)


def _server_class():
    """uvicorn.Server with a bounded drain (uvicorn is imported only when serving)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with a bounded drain (see the module docstring)."""

        def __init__(self, config, service):
            super().__init__(config)
            self.service = service
            self.dropped = None       # (queued, running, connections) once the bound passed

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                came = signals.received()  # before uvicorn's handlers were in place
                if came is not None:
                    self.handle_exit(came, None)
                yield

        async def shutdown(self, sockets=None):
            bound = self.service.config.drain_seconds
            task = asyncio.get_running_loop().create_task(self._bound(bound))
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

        async def _bound(self, bound: float):
            await asyncio.sleep(bound)
            queued, running = self.service.drop_all("shutdown")
            await asyncio.sleep(DROP_GRACE_S if queued + running else 0)
            connections = list(self.server_state.connections)
            for conn in connections:
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.abort()
            self.dropped = (queued, running, len(connections))
            log.warning("the drain passed its bound of %g s (--drain-timeout): dropped %d "
                        "queued and %d running request(s) (answered 503), closed %d "
                        "connection(s)", bound, queued, running, len(connections))
            await asyncio.sleep(CLOSE_GRACE_S)
            if self.server_state.tasks:
                log.warning("%d request handler(s) still busy; exiting without them",
                            len(self.server_state.tasks))
            self.force_exit = True

    return Server


def serve_forever(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> int:
    """Serve until a signal; raises the loading error (a BitDanceError names the fix)."""
    from .app import create_app
    from .service import ImageService

    check_port(host, port)
    service = ImageService(config)
    failed = {}
    server = None

    def on_fail(error):
        failed["error"] = error
        server.should_exit = True

    app = create_app(service, load="background", on_fail=on_fail)
    server = make_server(app, service, host, port, log_level)
    # A signal before the server runs stops it here; from now on uvicorn's handlers take the
    # signals (one that comes before they are in place is handed to them), and re-raise the one
    # they drained on: a drained SIGTERM is a clean exit (0), a Ctrl-C an interrupted one (130).
    signals.check()
    recording = signals.record_only()
    previous = None if recording else signal.signal(signal.SIGTERM, lambda *_: None)
    interrupted = None
    try:
        server.run()
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupted is None and signals.received() == signal.SIGINT:
        interrupted = signals.Interrupted(signal.SIGINT)
    signals.clear()  # answered here: the CLI does not stop on it again
    if service.loading() or (interrupted is not None and service.worker_busy()):
        # a thread is inside native code (loading the weights, or a block that a second
        # Ctrl-C cut short): the interpreter's shutdown would abort on it, so exit now
        if interrupted is not None:
            print("interrupted", file=sys.stderr)
            _exit_now(130)
        log.info("stopped while the model was loading")
        _exit_now(0)
    if interrupted is not None:
        raise interrupted
    if "error" in failed:
        raise failed["error"]
    if not server.started:
        raise BitDanceError(f"the server did not start on {host}:{port}; see the log above")
    if not server.dropped:
        log.info("drained and stopped")
        return 0
    if service.worker_busy():  # its block goes on in native code: do not wait for it
        log.info("stopped (the drain was cut short, see above; the current block was left "
                 "unfinished)")
        _exit_now(0)
    log.info("stopped (the drain was cut short: see above)")
    return 0


def _exit_now(status: int) -> None:
    """Exit at once with ``status``, the logs flushed: a worker thread still inside a block
    would otherwise abort the interpreter's shutdown."""
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
