"""What a server is started with: the model to load and the limits it serves under.

Checked before anything loads, with one-line errors that name the flag and the fix (the CLI
prints them); the same object configures the single-process server and every Ray replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import BitDanceError
from ..limits import MAX_IMAGES, SERVE_MAX_BATCH, SERVE_MAX_QUEUE, SERVE_TIMEOUT_S


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

    def check(self) -> "ServeConfig":
        """Raise :class:`BitDanceError` naming the first flag that cannot work."""
        from ..runtime.session import check_backend

        check_backend(self.backend, self.engine_dir)
        if not (isinstance(self.max_batch, int) and 1 <= self.max_batch <= MAX_IMAGES):
            raise BitDanceError(f"--max-batch must be from 1 to {MAX_IMAGES} images, got "
                                f"{self.max_batch}")
        if not (isinstance(self.max_queue, int) and self.max_queue >= 0):
            raise BitDanceError(f"--max-queue must be 0 or more requests, got {self.max_queue}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise BitDanceError(f"--timeout must be a positive number of seconds, got "
                                f"{self.timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise BitDanceError("--api-key is empty; give a secret string or leave the flag out")
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise BitDanceError(f"--checkpoint {self.checkpoint} is not a directory; give a "
                                "checkpoint directory (released layout) or leave it out for the "
                                "built-in model")
        return self
