"""``--attention native``: the KV-cache attention of the LLM graphs as standard ONNX operators
that TensorRT (>= 10.15, and TensorRT-RTX) imports as its own layers, so no plugin is needed.

Per layer, with the cache ``[S, Hkv, S_max, D]`` of that layer a graph input (written once per
graph)::

    cache'  = TensorScatter(cache, new, write_indices=cache_lens, axis=2)   (opset 24)
    out     = Attention(q, k_cache', v_cache', mask)                        (opset 23)
    mask    = [S, 1, T, S_max] boolean: slot j is seen by new token i iff
              j < cache_lens[s] + T         ("block": the cache and the whole block)
              j < cache_lens[s] + i + 1     ("causal": the cache and new tokens <= i)

and ``cache'`` is a graph output. TensorRT maps TensorScatter to ``IKVCacheUpdateLayer``, whose
output must share its input's memory: the runtime binds both to one buffer, so the cache is
written in place (cache in, cache out) and the runtime does not scatter keys itself. ONNX
Runtime (>= 1.31 on the CPU) runs both operators and, bound the same way, writes in place too.
TensorRT needs the cache's sequence axis static: ``S_max`` is fixed at export (``--max-seq``).

This is an export-graph form of :func:`bitdance_rt.attention.plain.attend` (the one
plain-PyTorch owner of the contract); the tests compare the two. The attention itself is
``F.scaled_dot_product_attention``, which ``torch.onnx`` emits as the ``Attention`` operator from
opset 23; ``TensorScatter`` has no torch op, so :func:`tensor_scatter` is a custom op with a
translation to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.plain import valid_slots, visible, write_at

OPSET = 24  # TensorScatter


@torch.library.custom_op("bitdance::tensor_scatter", mutates_args=())
def tensor_scatter(past: torch.Tensor, update: torch.Tensor,
                   write_indices: torch.Tensor) -> torch.Tensor:
    """ONNX ``TensorScatter`` (axis 2, linear mode) in PyTorch: a copy of ``past``
    ``[S, H, S_max, D]`` with ``update[s]`` ``[H, T, D]`` written at slots
    ``[write_indices[s], write_indices[s] + T)``."""
    return write_at(past.clone(), update, write_indices, 2)


@tensor_scatter.register_fake
def _(past, update, write_indices):
    return torch.empty_like(past)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` of a native export: the TensorScatter node."""
    from onnxscript import values

    op = values.Opset("", OPSET)

    def translate(past, update, write_indices):
        return op.TensorScatter(past, update, write_indices, axis=2)

    return {torch.ops.bitdance.tensor_scatter.default: translate}


class PromptKV:
    """The prompt pass of a native prefill graph: the cache is empty, so the prompt attends
    causally over its own keys only (``Attention`` with ``is_causal``); its keys and values
    are collected, zeroed past each row's length ``lens [S]``, for :class:`NativeKV`'s
    ``prefix``."""

    def __init__(self, lens):
        self.lens = lens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def positions(self, batch, t, device) -> torch.Tensor:
        return torch.arange(t, device=device)[None, :].expand(batch, t)

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        keep = valid_slots(self.lens, q.shape[2])[:, None, :, None]
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        self.keys.append(torch.where(keep, k, zero))
        self.values.append(torch.where(keep, v, zero))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=q.shape[1] != k.shape[1])


def with_prefix(prefix: torch.Tensor, new: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """``[S, H, T + P, D]``: row s holds ``prefix[s]`` (zero past ``lens[s]``) at
    ``[0, lens[s])``, ``new[s]`` at ``[lens[s], lens[s] + P)`` and zeros after."""
    s, h, t, d = prefix.shape
    p = new.shape[2]
    j = torch.arange(t + p, device=new.device)[None, :]
    rel = j - lens[:, None]  # [S, T + P]: the slot's index among the new tokens
    idx = rel.clamp(0, p - 1)[:, None, :, None].expand(s, h, t + p, d)
    shifted = torch.gather(new, 2, idx)
    padded = torch.cat([prefix, torch.zeros_like(new)], dim=2)
    zero = torch.zeros((), dtype=new.dtype, device=new.device)
    in_new = ((rel >= 0) & (rel < p))[:, None, :, None]
    return torch.where(rel[:, None, :, None] < 0, padded, torch.where(in_new, shifted, zero))


class NativeKV:
    """The cache object :class:`~bitdance_rt.models.qwen3.Qwen3Model` calls in a native graph.

    ``k_caches``/``v_caches``: per-layer caches ``[S, Hkv, S_max, D]`` (graph inputs) holding
    ``cache_lens [S]`` tokens per row; the T new tokens go to slots ``cache_lens[s] + i`` (also
    their RoPE positions). With ``prefix`` (the :class:`PromptKV` of a prefill graph) the first
    ``cache_lens[s]`` tokens are not in the cache yet but are the prefix's keys and values: they
    are written with the new ones, by one TensorScatter at slot 0 (TensorRT's cache update
    must read the graph's input cache, so each layer's cache is written exactly once). The
    updated caches are :attr:`k_out`/:attr:`v_out`.
    """

    def __init__(self, k_caches, v_caches, cache_lens, prefix: PromptKV | None = None):
        self.k_in, self.v_in = list(k_caches), list(v_caches)
        self.cache_lens, self.prefix = cache_lens, prefix
        self.k_out: list[torch.Tensor] = []
        self.v_out: list[torch.Tensor] = []
        self._mask = {}

    def positions(self, batch, t, device) -> torch.Tensor:
        return self.cache_lens[:, None] + torch.arange(t, device=device)[None, :]

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        at = self.cache_lens
        if self.prefix is not None:
            k = with_prefix(self.prefix.keys[layer], k, self.cache_lens)
            v = with_prefix(self.prefix.values[layer], v, self.cache_lens)
            at = torch.zeros_like(self.cache_lens)
        kc = torch.ops.bitdance.tensor_scatter(self.k_in[layer], k, at)
        vc = torch.ops.bitdance.tensor_scatter(self.v_in[layer], v, at)
        self.k_out.append(kc)
        self.v_out.append(vc)
        if mode not in self._mask:  # one mask per graph pass, shared by its layers
            self._mask[mode] = visible(self.cache_lens, q.shape[2], kc.shape[2], mode)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=self._mask[mode],
                                              enable_gqa=q.shape[1] != kc.shape[1])

    def caches(self) -> list[torch.Tensor]:
        """The updated caches in the graph's output order (keys, then values)."""
        return self.k_out + self.v_out
