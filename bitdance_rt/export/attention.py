"""KV-cache attention inside exported LLM graphs, and the cache shim the Qwen3 model talks to.

An exported graph never writes the KV cache: it reads the cache ``[S, Hkv, S_max, D]`` of each
layer plus per-sequence lengths ``cache_lens [S]``, attends over ``[0, cache_lens[s])`` of the
cache and over the T new tokens (causal or block mask among them), and returns the new keys and
values as outputs. The runtime writes those into its own buffer at ``cache_lens[s]`` (in place,
through IO binding on CUDA). Scores against the cache and against the new tokens are computed
separately and joined before the softmax, so the cache is read once per layer and never copied.

Every layer calls :func:`attention_fn` (the ``--attention`` choice), so a custom node (issue 5,
``--attention plugin``) replaces exactly one function.
"""

from __future__ import annotations

import torch

from ..errors import BitDanceError

ATTENTION_CHOICES = ("standard", "plugin")


def standard_kv_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str):
    """Attention of T new tokens over a cache and over themselves, in standard ONNX operators.

    q ``[S, Hq, T, D]``; k_new, v_new ``[S, Hkv, T, D]``; k_cache, v_cache ``[S, Hkv, S_max, D]``
    or None (an empty cache); cache_lens ``[S]`` int64 (ignored without a cache).
    mode ``"block"``: every new token sees all new tokens; ``"causal"``: new token i sees new
    tokens ``<= i``. Cache slot j of sequence s is seen iff ``j < cache_lens[s]``; slots past it
    must hold finite values (the runtime zero-initializes its cache). GQA: query head h uses kv
    head ``h // (Hq // Hkv)``. Softmax in float32; returns ``[S, Hq, T, D]`` in q's dtype.
    """
    s, hq, t, d = q.shape
    hkv = k_new.shape[1]
    g = hq // hkv
    scale = d ** -0.5
    qg = q.reshape(s, hkv, g, t, d)
    neg = torch.tensor(float("-inf"), dtype=torch.float32)

    new_scores = torch.matmul(qg, k_new.unsqueeze(2).transpose(-1, -2)).float() * scale
    if mode == "causal":
        i = torch.arange(t, device=q.device)
        new_scores = torch.where(i[None, :] <= i[:, None], new_scores, neg)
    elif mode != "block":
        raise ValueError(f"attention mode must be 'block' or 'causal', got {mode!r}")
    if k_cache is None:
        probs = torch.softmax(new_scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v_new.unsqueeze(2)).reshape(s, hq, t, d)

    s_max = k_cache.shape[2]
    cache_scores = torch.matmul(qg, k_cache.unsqueeze(2).transpose(-1, -2)).float() * scale
    seen = torch.arange(s_max, device=q.device)[None, :] < cache_lens[:, None]  # [S, S_max]
    cache_scores = torch.where(seen[:, None, None, None, :], cache_scores, neg)
    probs = torch.softmax(torch.cat([cache_scores, new_scores], dim=-1), dim=-1).to(q.dtype)
    out = (torch.matmul(probs[..., :s_max], v_cache.unsqueeze(2))
           + torch.matmul(probs[..., s_max:], v_new.unsqueeze(2)))
    return out.reshape(s, hq, t, d)


def attention_fn(name: str):
    """The per-layer attention for ``--attention name``."""
    if name == "standard":
        return standard_kv_attention
    if name == "plugin":
        from ..plugins.onnx_node import plugin_kv_attention

        return plugin_kv_attention
    raise BitDanceError(f"unknown --attention {name!r}; choose one of {list(ATTENTION_CHOICES)}")


def attention_translations(name: str) -> dict | None:
    """``custom_translation_table`` the exporter needs for ``--attention name`` (None for
    standard operators; the ``bitdance::kv_attention`` node for the plugin)."""
    attention_fn(name)
    if name == "plugin":
        from ..plugins.onnx_node import onnx_translation_table

        return onnx_translation_table()
    return None


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

    def attend(self, layer: int, q, k, v, mode: str) -> torch.Tensor:
        self.keys.append(k)
        self.values.append(v)
        kc = None if self.k_cache is None else self.k_cache[layer]
        vc = None if self.v_cache is None else self.v_cache[layer]
        return self.attention(q, k, v, kc, vc, self.cache_lens, mode)

    def new_kv(self):
        return torch.stack(self.keys), torch.stack(self.values)
