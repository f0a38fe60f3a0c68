"""What a server is started with: the model to load and the limits it serves under.

Checked before anything loads, with one-line errors that name the flag and the fix (the CLI
prints them); the same object configures the single-process server and every Ray replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import BitDanceError
from ..limits import (MAX_IMAGES, SERVE_CLIENT_TIMEOUT_S, SERVE_MAX_BATCH, SERVE_MAX_QUEUE,
                      SERVE_TIMEOUT_S)

API_KEY_ENV = "BITDANCE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """The model (as ``Session.open`` takes it) and the scheduler's limits."""

    checkpoint: Path | None = None     # None: the built-in model (made on first use)
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    engine_dir: Path | None = None
    cuda_graphs: bool = True
    compile: bool = False
    max_batch: int = SERVE_MAX_BATCH   # images in one AR run
    max_queue: int = SERVE_MAX_QUEUE   # requests waiting (not running); more get 429
    timeout: float = SERVE_TIMEOUT_S   # seconds from arrival to the response; then 504
    api_key: str | None = None         # every route but /healthz needs it when set
    warmup: bool = True                # one small generation before /healthz says ready
    client_timeout: float = SERVE_CLIENT_TIMEOUT_S  # head, body, each piece of an answer
    drain_timeout: float | None = None  # SIGTERM's drain at most; None: the timeout

    @property
    def family(self) -> str:
        """``"imagenet"`` for a class-conditional ImageNet checkpoint directory, else
        ``"text-to-image"`` (read from the directory's small JSON file only)."""
        from ..imagenet.checkpoint import family_of

        if self.checkpoint is not None and family_of(self.checkpoint) == "imagenet":
            return "imagenet"
        return "text-to-image"

    @property
    def drain_seconds(self) -> float:
        """How long SIGTERM's drain may last before what is left is dropped."""
        return self.timeout if self.drain_timeout is None else self.drain_timeout

    def check(self) -> "ServeConfig":
        """Raise :class:`BitDanceError` naming the first flag that cannot work."""
        from ..runtime.session import check_backend

        if self.family == "imagenet":
            check_imagenet(self)
        else:
            check_backend(self.backend, self.engine_dir)
        if not (isinstance(self.max_batch, int) and 1 <= self.max_batch <= MAX_IMAGES):
            raise BitDanceError(f"--max-batch must be from 1 to {MAX_IMAGES} images, got "
                                f"{self.max_batch}")
        if not (isinstance(self.max_queue, int) and self.max_queue >= 0):
            raise BitDanceError(f"--max-queue must be 0 or more requests, got {self.max_queue}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise BitDanceError(f"--timeout must be a positive number of seconds, got "
                                f"{self.timeout}")
        for flag, value in (("--client-timeout", self.client_timeout),
                            ("--drain-timeout", self.drain_seconds)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise BitDanceError(f"{flag} must be a positive number of seconds, got {value}")
        check_api_key(self.api_key)
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise BitDanceError(f"--checkpoint {self.checkpoint} is not a directory; give a "
                                "checkpoint directory (released layout) or leave it out for the "
                                "built-in model")
        return self


def check_imagenet(config: ServeConfig) -> None:
    """A class-conditional ImageNet checkpoint is served by the PyTorch runners only."""
    from ..imagenet.serving import SERVE_BACKENDS

    name = Path(config.checkpoint).name
    if config.backend not in SERVE_BACKENDS:
        raise BitDanceError(f"--backend {config.backend}: {name} is a class-conditional "
                            "ImageNet checkpoint, served with --backend "
                            f"{' or '.join(SERVE_BACKENDS)}; leave --backend out")
    if config.engine_dir is not None:
        raise BitDanceError(f"--export-dir: {name} is a class-conditional ImageNet checkpoint, "
                            "served from its own weights in PyTorch; leave --export-dir out")


def check_api_key(key: str | None) -> None:
    """A key every client can send as ``Authorization: Bearer KEY`` (or as a browser's
    password), or None (no authentication). An empty key, spaces around it, or a character an
    HTTP header cannot carry would start a server that is open, or that nobody can use."""
    where = f"the API key (--api-key or {API_KEY_ENV})"
    if key is None:
        return
    if not key.strip():
        raise BitDanceError(f"{where} is empty; give a secret string, or unset {API_KEY_ENV} "
                            "and leave out --api-key to serve without authentication")
    if key != key.strip():
        raise BitDanceError(f"{where} has white space at its start or end, which no client "
                            "can send; remove it")
    bad = next((c for c in key if not " " <= c <= "~"), None)
    if bad is not None:
        raise BitDanceError(f"{where} holds the character {bad!r}, which an HTTP header cannot "
                            "carry; use printable ASCII (letters, digits, punctuation)")
