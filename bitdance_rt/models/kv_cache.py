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
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * n_rep, S, D]`` (each kv head repeated n_rep times)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def visible_mask(lens: torch.Tensor, t: int, s: int, mode: str) -> torch.Tensor:
    """bool ``[B, 1, T, S]``: key j is visible to new token i of sequence b.

    ``lens`` ``[B]`` are the cache lengths before the T new tokens were written.
    """
    q = torch.arange(t, device=lens.device)
    kv = torch.arange(s, device=lens.device)
    if mode == "causal":
        limit = lens[:, None] + q[None, :] + 1  # [B, T]
    else:
        limit = (lens + t)[:, None].expand(-1, t)
    return (kv[None, None, :] < limit[:, :, None])[:, None]


class ConcatKVCache:
    """The reference pipeline's growing cache (one shared length for the whole batch)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        past = 0 if self.k[layer] is None else self.k[layer].shape[2]
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        n_rep = q.shape[1] // k.shape[1]
        t = q.shape[2]
        if mode == "causal" and past == 0:
            # transformers skips the mask here and lets SDPA apply causality (GQA inside SDPA).
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=t > 1, enable_gqa=n_rep > 1
            )
        if mode == "block":
            # The reference passes an all-true 4-D boolean mask, which makes transformers
            # expand the kv heads itself.
            mask = torch.ones((q.shape[0], 1, t, k.shape[2]), dtype=torch.bool, device=q.device)
        else:
            lens = torch.full((q.shape[0],), past, device=q.device)
            mask = visible_mask(lens, t, k.shape[2], mode)
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask
        )


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
        self.attention = attention  # optional fused op with the plugin signature

    @staticmethod
    def nbytes_for(num_layers, batch, num_kv_heads, max_len, head_dim, dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * batch * num_kv_heads * max_len * head_dim * itemsize

    def reset(self):
        self.lens.zero_()
        self.lens_host = [0] * len(self.lens_host)

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
        if self.attention is not None:
            return self.attention(q, k, v, kc, vc, self.lens, mode)
        return self.write_and_attend(q, k, v, kc, vc, self.lens, mode,
                                     max(self.lens_host) + t)

    @staticmethod
    def write_and_attend(q, k, v, kc, vc, lens, mode, kv_len):
        b, hkv, t, d = k.shape
        slots = (lens[:, None] + torch.arange(t, device=lens.device))[:, None, :, None]
        slots = slots.expand(b, hkv, t, d)
        kc.scatter_(2, slots, k)
        vc.scatter_(2, slots, v)
        keys, values = kc[:, :, :kv_len], vc[:, :, :kv_len]
        mask = visible_mask(lens, t, kv_len, mode)
        n_rep = q.shape[1] // hkv
        return F.scaled_dot_product_attention(
            q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), attn_mask=mask
        )
