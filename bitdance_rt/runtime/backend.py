"""The small interface every backend implements; the AR loop (``loop.py``) is written once.

A backend owns its buffers, caches and graphs; the loop owns the order of calls and the random
numbers. Shapes: S sequences in the batch (B conditional rows, then B unconditional rows when
guidance is on), P tokens per block, H the LLM width, 32 binary channels per token.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch

from ..request import ImagePlan
from .timing import WorkMeter, model_meter_modules, watch_modules

__all__ = ["Backend", "ImagePlan"]


class Backend(ABC):
    """Five calls, in this order per image: ``begin`` (buffers), ``prefill``, then per block
    ``sample_head`` and (except after the last block) ``block_step``, then ``decode``."""

    name = "backend"
    device: torch.device
    parallel_num: int
    ch_target: int = 32
    gan_decoder: bool = False  # the decoder takes noise drawn after the AR steps
    # The reference runs the LLM once more after the last block (its result is unused), as
    # the authors' pipeline does; a fast backend does not.
    final_block_step: bool = False
    # Whether drop() can stop computing images in the middle of a run.
    can_drop: bool = False
    # The WorkMeter counting this backend's work while a timed run is metered (else None).
    meter: WorkMeter | None = None

    @abstractmethod
    def begin(self, plan: ImagePlan) -> None:
        """Make the KV cache and per-plan buffers ready (reusing those that are large
        enough); raise ResourceError, before allocating, if the plan cannot fit."""

    @abstractmethod
    def prefill(self) -> torch.Tensor:
        """Run every prompt sequence; return the head condition of block 0, ``[S, P, H]``
        (hidden state plus the block's position embedding, float32)."""

    @abstractmethod
    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        """N + 1 head evaluations with guidance; ``noise`` = x_0 and one tensor per
        Euler-Maruyama step, ``[B, P, 32]`` each. Returns x ``[B, P, 32]`` float32 (before
        ``sign``)."""

    @abstractmethod
    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """Feed the +-1 tokens ``[B, P, 32]`` of ``block`` to the LLM for every sequence;
        return the head condition of ``block + 1``, ``[S, P, H]``."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """``[B, h*w, 32]`` tokens in patch raster order -> uint8 ``[B, 16h, 16w, 3]`` (CPU)."""

    def drop(self, keep: list[int], cond: torch.Tensor) -> torch.Tensor:
        """Stop computing every image of the current run but ``keep`` (indices among its
        images); return the head condition of the next block for the rows that remain. The
        kept images' results do not change. Only called when ``can_drop``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def metered(self, meter: WorkMeter):
        """Count, into ``meter``, the model calls and weight bytes this backend really reads
        while the block runs (the timing table's columns). This default watches the model's
        PyTorch modules; a backend that runs other graphs counts them itself (``meter`` is
        :attr:`meter` meanwhile)."""
        self.meter = meter
        try:
            with watch_modules(meter, *model_meter_modules(self.model)):
                yield
        finally:
            self.meter = None
