"""KV-cache attention inside exported LLM graphs, and the cache shim the Qwen3 model talks to.

Three forms (``--attention``):

- ``standard``: plain ONNX operators (below); runs everywhere, the runtime writes the cache.
- ``native``:   ONNX ``Attention`` and ``TensorScatter`` over per-layer caches written in place
                by the graph (:mod:`bitdance_rt.export.native`); TensorRT >= 10.15 and
                TensorRT-RTX import them as their own layers; ONNX Runtime runs them too.
- ``plugin``:   the custom ``bitdance::kv_attend`` node (datacenter TensorRT's plugin).

A standard or plugin graph never writes the KV cache: it reads the cache ``[S, Hkv, S_max, D]`` of each
layer plus per-sequence lengths ``cache_lens [S]``, attends over ``[0, cache_lens[s])`` of the
cache and over the T new tokens (causal or block mask among them), and returns the new keys and
values as outputs. The runtime writes those into its own buffer at ``cache_lens[s]`` (in place,
through IO binding on CUDA). Scores against the cache and against the new tokens are computed
separately and joined before the softmax, so the cache is read once per layer and never copied.

Every layer of such a graph calls :func:`attention_fn` (the ``--attention`` choice), so the
custom node replaces exactly one function.
"""

from __future__ import annotations

import torch

from ..errors import BitDanceError
from ..attention.plain import attend

ATTENTION_CHOICES = ("standard", "native", "plugin")


def standard_kv_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str):
    """:func:`~bitdance_rt.attention.plain.attend` as the graph computes it: products in the
    model dtype, softmax in float32, and no pass over the cache's unused slots (the runtime
    zero-initializes its cache, so they hold finite values)."""
    return attend(q, k_new, v_new, k_cache, v_cache, cache_lens, mode, fp32_math=False,
                  unseen_may_be_garbage=False)


def check_attention(name: str) -> str:
    if name not in ATTENTION_CHOICES:
        raise BitDanceError(f"unknown --attention {name!r}; choose one of "
                            f"{list(ATTENTION_CHOICES)}")
    return name


def attention_fn(name: str):
    """The per-layer attention of a standard or plugin graph (a native graph's layers attend
    through :class:`~bitdance_rt.export.native.NativeKV` instead)."""
    check_attention(name)
    if name == "plugin":
        from ..attention.onnx_node import plugin_kv_attention

        return plugin_kv_attention
    return standard_kv_attention


def attention_translations(name: str) -> dict | None:
    """``custom_translation_table`` the exporter needs for ``--attention name`` (None for
    standard operators; the ``bitdance::kv_attend`` node for the plugin; the
    ``TensorScatter`` node for native)."""
    check_attention(name)
    if name == "plugin":
        from ..attention.onnx_node import onnx_translation_table

        return onnx_translation_table()
    if name == "native":
        from .native import onnx_translation_table

        return onnx_translation_table()
    return None


def attention_opset(name: str, default: int) -> int:
    """The ONNX opset of an export: native graphs need 24 (TensorScatter)."""
    from .native import OPSET

    return OPSET if check_attention(name) == "native" else default


class GraphKV:
    """The cache object :class:`~bitdance_rt.models.qwen3.Qwen3Model` calls during export.

    Reads the caches given (``k_cache``/``v_cache`` ``[L, S, Hkv, S_max, D]`` or per-layer lists,
    or None for an empty cache) and collects each layer's new keys and values instead of writing
    them; :meth:`new_kv` stacks them to ``[L, S, Hkv, T, D]``.
    """

    def __init__(self, attention, k_cache=None, v_cache=None, cache_lens=None):
        self.attention = attention
        self.k_cache, self.v_cache, self.cache_lens = k_cache, v_cache, cache_lens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def positions(self, batch, t, device) -> torch.Tensor:
        """RoPE positions of the new tokens: each row's cache length onwards."""
        new = torch.arange(t, device=device)[None, :]
        if self.cache_lens is None:
            return new.expand(batch, t)
        return self.cache_lens[:, None] + new

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        self.keys.append(k)
        self.values.append(v)
        kc = None if self.k_cache is None else self.k_cache[layer]
        vc = None if self.v_cache is None else self.v_cache[layer]
        return self.attention(q, k, v, kc, vc, self.cache_lens, mode)

    def new_kv(self):
        return torch.stack(self.keys), torch.stack(self.values)
