"""KV caches for :class:`bitdance_rt.models.qwen3.Qwen3Model`.

A cache owns the keys and values of every layer and the attention over them. Two kinds:

- :class:`ConcatKVCache`: the reference pipeline's cache. All sequences of the batch share one
  length; each call concatenates the new keys and values (as the authors' pipeline does through
  transformers' ``DynamicCache``) and calls SDPA with the same arguments transformers uses, so a
  float32 CPU run reproduces the reference.
- :class:`StaticKVCache`: one preallocated buffer ``[L, B, Hkv, S_max, D]`` written in place at
  per-sequence offsets (sequences may have different lengths). Used by the runtime.
"""

from __future__ import annotations

import torch

from ..attention.op import kv_attention
from ..attention.sdpa import attend_like_reference


class ConcatKVCache:
    """The reference pipeline's growing cache (one shared length for the whole batch)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def positions(self, batch: int, t: int, device) -> torch.Tensor:
        """``[batch, t]`` RoPE positions of t new tokens (every row has the same length)."""
        start = self.length
        return torch.arange(start, start + t, device=device)[None].expand(batch, t)

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        past = 0 if self.k[layer] is None else self.k[layer].shape[2]
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return attend_like_reference(q, k, v, mode == "causal", past)


class StaticKVCache:
    """Preallocated cache ``[L, B, Hkv, S_max, D]`` written in place.

    ``lens`` ``[B]`` (device) are the tokens already in the cache per sequence; a host copy is
    kept so that attention reads only ``max(lens) + T`` slots without a device sync.
    The caller advances the lengths after each model call with :meth:`advance`.
    """

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device,
                 attention=None):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.lens_host = [0] * batch
        self.attention = attention  # the op's contract; default: bitdance::kv_attention

    @staticmethod
    def nbytes_for(num_layers, batch, num_kv_heads, max_len, head_dim, dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * batch * num_kv_heads * max_len * head_dim * itemsize

    def reset(self):
        self.lens.zero_()
        self.lens_host = [0] * len(self.lens_host)

    def positions(self, batch: int, t: int, device) -> torch.Tensor:
        """``[batch, t]`` RoPE positions of t new tokens: each row's length onwards (computed
        on the device, so a captured graph replays it for any lengths)."""
        return self.lens[:, None] + torch.arange(t, device=device)

    def set_lens(self, lens):
        """Set every sequence's length (a list of ints): rewinds the cache for a replay; the
        contents beyond the new lengths are left and get overwritten by the next call."""
        lens = [int(n) for n in lens]
        if len(lens) != len(self.lens_host) or min(lens) < 0 or max(lens) > self.max_len:
            raise ValueError(f"cache lengths {lens} do not fit {len(self.lens_host)} sequences "
                             f"of at most {self.max_len} tokens")
        self.lens_host = lens
        self.lens.copy_(torch.tensor(lens, dtype=torch.long).to(self.lens.device))

    def advance(self, n):
        """Add ``n`` (int, or list of per-sequence ints) to every sequence's length."""
        ns = [n] * len(self.lens_host) if isinstance(n, int) else list(n)
        self.lens_host = [a + b for a, b in zip(self.lens_host, ns)]
        if max(self.lens_host) > self.max_len:
            raise RuntimeError("KV cache overflow: allocate a larger max_len")
        self.lens.add_(torch.tensor(ns, dtype=torch.long).to(self.lens.device, non_blocking=True))

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        t = q.shape[2]
        if max(self.lens_host) + t > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {max(self.lens_host)} + {t} tokens > max_len {self.max_len}"
            )
        kc, vc = self.k[layer], self.v[layer]
        attention = self.attention or kv_attention
        return attention(q, k, v, kc, vc, self.lens, mode)

    def rows(self, start: int, end: int) -> "StaticKVCache":
        """A cache of sequences ``[start, end)`` sharing this cache's buffers and lengths
        tensor (writes and device-side advances land here); its host lengths are its own, so
        use one of the two at a time."""
        view = object.__new__(StaticKVCache)
        view.k, view.v = self.k[:, start:end], self.v[:, start:end]
        view.max_len, view.attention = self.max_len, self.attention
        view.lens, view.lens_host = self.lens[start:end], self.lens_host[start:end]
        return view
