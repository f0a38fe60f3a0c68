"""Run the app in this process on uvicorn: bind (loopback by default), load the model in the
background (/healthz says when it is ready), serve until SIGTERM or Ctrl-C.

SIGTERM drains: uvicorn stops accepting connections, every request already received (queued
or running) is answered, the scheduler stops, and the process exits 0. A second Ctrl-C forces
the exit."""

from __future__ import annotations

import logging
import signal
import socket

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


def serve_forever(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> int:
    """Serve until a signal; raises the loading error (a BitDanceError names the fix)."""
    import uvicorn

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
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           lifespan="on", timeout_graceful_shutdown=None))
    # uvicorn re-raises the signal it drained on; a drained SIGTERM is a clean exit (0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "error" in failed:
        raise failed["error"]
    if not server.started:
        raise BitDanceError(f"the server did not start on {host}:{port}; see the log above")
    log.info("drained and stopped")
    return 0
