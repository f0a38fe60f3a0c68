"""The small interface every backend implements; the AR loop (``loop.py``) is written once.

A backend owns its buffers, caches and graphs; the loop owns the order of calls and the random
numbers. Shapes: S sequences in the batch (B conditional rows, then B unconditional rows when
guidance is on), P tokens per block, H the LLM width, 32 binary channels per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImagePlan:
    """What one generation call needs to size its buffers."""

    h: int                 # latent rows
    w: int                 # latent columns
    images: int            # B
    seq_ids: tuple         # token id lists, one per distinct prompt (cond, then uncond)
    steps: int             # head sampling steps N
    guidance: float

    @property
    def rows(self) -> int:
        """Sequences in the LLM batch (S = B * number of prompts)."""
        return self.images * len(self.seq_ids)

    def max_len(self, parallel_num: int) -> int:
        """KV slots per sequence: the longest prompt plus every image block but the last."""
        return max(len(s) for s in self.seq_ids) + self.h * self.w - parallel_num


class Backend(ABC):
    """Five calls, in this order per image: ``begin`` (cache allocation), ``prefill``, then per
    block ``sample_head`` and (except after the last block) ``block_step``, then ``decode``."""

    name = "backend"
    device: torch.device
    parallel_num: int
    ch_target: int = 32
    gan_decoder: bool = False  # the decoder takes noise drawn after the AR steps

    @abstractmethod
    def begin(self, plan: ImagePlan) -> None:
        """Allocate (or reuse) the KV cache and per-size buffers; raise ResourceError if the
        plan cannot fit."""

    @abstractmethod
    def prefill(self) -> torch.Tensor:
        """Run every prompt sequence; return the head condition of block 0, ``[S, P, H]``
        (hidden state plus the block's position embedding, float32)."""

    @abstractmethod
    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        """N + 1 head evaluations with guidance; ``noise`` = x_0 and one tensor per step,
        ``[B, P, 32]`` each. Returns x ``[B, P, 32]`` float32 (before ``sign``)."""

    @abstractmethod
    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """Feed the +-1 tokens ``[B, P, 32]`` of ``block`` to the LLM for every sequence;
        return the head condition of ``block + 1``, ``[S, P, H]``."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """``[B, h*w, 32]`` tokens in patch raster order -> uint8 ``[B, 16h, 16w, 3]`` (CPU)."""

    def weight_bytes(self, plan: ImagePlan) -> dict:
        """Weight bytes each stage reads (``prefill``, ``block_step`` per call, ``head`` per
        block, ``decode``) and call counts (``prefill_calls``, ``head_calls`` per block), for
        the benchmark's table. Unknown entries may be left out."""
        return {}
