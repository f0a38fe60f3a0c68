"""The ``prefill`` graph: every prompt sequence through the LLM, in one call.

Inputs
  input_ids    ``[S, T]`` int64    each sequence's tokens before its image-start block (text,
                                   ``<|vision_start|>``, ``<|res_h|>``), right-padded to T
                                   (RoPE positions ``0 .. T-1``)
  input_lens   ``[S]`` int64       valid tokens per row (cond and uncond prompts differ)
  block_ids    ``[S, P]`` int64    the image-start block (``<|res_w|>``, ``<|query_1..P-1|>``)
  pe           ``[P, H]`` float32  2-D position embedding of image block 0
Outputs
  cond         ``[S, P, H]`` float32       head condition of block 0 (hidden + pe)
  prompt_keys  ``[L, S, Hkv, T, D]``       keys of the prompt tokens, zero past ``input_lens``
                                           (prompt_values the same): cache slots ``[0, T)``
  block_keys   ``[L, S, Hkv, P, D]``       keys of the image-start block (block_values the
                                           same): cache slots ``[input_lens[s], +P)``

A native graph (``--attention native``) takes the per-layer caches ``k_cache_i``/``v_cache_i``
``[S, Hkv, S_max, D]`` as inputs instead and returns them written (``k_cache_out_i``/
``v_cache_out_i``, bound by the runtime to the input's memory) with the same contents in slots
``[0, T + P)``: the prompt keys at ``[0, input_lens[s])``, the image-start block at
``[input_lens[s], +P)``, zeros after; every later slot keeps its input value.

Two passes, as the reference makes two calls: the prompt with the causal mask (padding sits at
the end of a row, where the causal mask keeps it out of the real tokens), then the image-start
block in block mode over the first pass's keys and values (``cache_lens = input_lens``) at
positions ``input_lens[s] + i``. The runtime writes both into its cache; the sequence lengths
are then ``input_lens + P``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import cache_inputs, cache_outputs
from ..models.kv_cache import StaticKVCache
from ..models.steps import image_start, prompt_pass
from ..attention.plain import valid_slots
from .attention import GraphKV, attention_fn
from .common import GraphDef, dim, native_cache_feeds, write_slots
from .native import NativeKV, PromptKV

NAME = "prefill"


class Prefill(nn.Module):
    def __init__(self, model, attention):
        super().__init__()
        self.model = model
        self.attention = attention
        self.llm = model.llm.model  # registers the weights with the exporter

    def forward(self, input_ids, input_lens, block_ids, pe):
        t = input_ids.shape[1]
        prompt = GraphKV(self.attention)
        prompt_pass(self.model, input_ids, prompt)
        keys, values = prompt.new_kv()  # [L, S, Hkv, T, D]
        valid = valid_slots(input_lens, t)[None, :, None, :, None]
        zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
        keys, values = torch.where(valid, keys, zero), torch.where(valid, values, zero)
        block = GraphKV(self.attention, keys, values, input_lens)
        cond = image_start(self.model, block_ids, block, pe)
        block_keys, block_values = block.new_kv()
        return cond, keys, values, block_keys, block_values


class NativePrefill(nn.Module):
    """The native form: both passes write the caches given (in, out), nothing else changes."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.llm = model.llm.model

    def forward(self, input_ids, input_lens, block_ids, pe, *caches):
        n = len(caches) // 2
        prompt = PromptKV(input_lens)  # the cache is empty: causal over the prompt itself
        prompt_pass(self.model, input_ids, prompt)
        block = NativeKV(caches[:n], caches[n:], input_lens, prefix=prompt)
        cond = image_start(self.model, block_ids, block, pe)
        return (cond, *block.caches())


@torch.no_grad()
def pytorch_outputs(model, feeds: dict) -> dict:
    """Row by row with the runtime's static cache (the PyTorch backend's code path)."""
    cfg = model.spec.llm
    ids, lens, block_ids = feeds["input_ids"], feeds["input_lens"], feeds["block_ids"]
    rows, t = ids.shape
    p = block_ids.shape[1]
    shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, t, cfg.head_dim)
    out = {"cond": torch.empty(rows, p, cfg.hidden_size),
           "prompt_keys": torch.zeros(shape, dtype=model.dtype),
           "prompt_values": torch.zeros(shape, dtype=model.dtype),
           "block_keys": torch.empty(shape[:3] + (p, cfg.head_dim), dtype=model.dtype),
           "block_values": torch.empty(shape[:3] + (p, cfg.head_dim), dtype=model.dtype)}
    for s in range(rows):
        n = int(lens[s])
        cache = StaticKVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, n + p,
                              cfg.head_dim, model.dtype, "cpu")
        prompt_pass(model, ids[s:s + 1, :n], cache)
        cache.advance(n)
        out["cond"][s] = image_start(model, block_ids[s:s + 1], cache, feeds["pe"])[0]
        out["prompt_keys"][:, s, :, :n] = cache.k[:, 0, :, :n]
        out["prompt_values"][:, s, :, :n] = cache.v[:, 0, :, :n]
        out["block_keys"][:, s] = cache.k[:, 0, :, n:]
        out["block_values"][:, s] = cache.v[:, 0, :, n:]
    if "k_cache_0" not in feeds:
        return out
    # native: the same keys and values, written into the caches given
    layers = cfg.num_hidden_layers
    caches = {}
    for kind, (prompt, block) in {"k": ("prompt_keys", "block_keys"),
                                  "v": ("prompt_values", "block_values")}.items():
        for i in range(layers):
            padded = torch.cat([out[prompt][i], torch.zeros_like(out[block][i])], dim=2)
            c = write_slots(feeds[f"{kind}_cache_{i}"], padded, torch.zeros_like(lens))
            caches[f"{kind}_cache_out_{i}"] = write_slots(c, out[block][i], lens)
    return {"cond": out["cond"], **caches}


def random_inputs(model, gen: torch.Generator, lens: list[int], slots: int | None = None) -> dict:
    """Prompts of ``lens`` tokens; with ``slots`` (a native graph) random per-layer caches of
    that many slots as well."""
    spec = model.spec
    p, vocab = spec.parallel_num, spec.llm.vocab_size
    rows, t = len(lens), max(lens)
    feeds = {"input_ids": torch.randint(0, vocab, (rows, t), generator=gen),
             "input_lens": torch.tensor(lens),
             "block_ids": torch.randint(0, vocab, (rows, p), generator=gen),
             "pe": torch.randn(p, spec.llm.hidden_size, generator=gen)}
    if slots is not None:
        feeds.update(native_cache_feeds(model, gen, rows, slots))
    return feeds


def graph_def(model, attention: str, slots: int | None = None) -> GraphDef:
    """The graph for ``--attention attention``; a native graph's caches have ``slots`` slots
    (static: TensorRT's in-place cache update needs a fixed length)."""
    native = attention == "native"
    example = random_inputs(model, torch.Generator().manual_seed(0), [7, 5],
                            slots if native else None)
    S, T = dim("rows"), dim("prompt_len")
    dynamic = {"input_ids": {0: S, 1: T}, "input_lens": {0: S},
               "block_ids": {0: S}, "pe": None}
    if native:
        layers = model.spec.llm.num_hidden_layers
        dynamic.update({name: {0: S} for name in cache_inputs(layers)})
        return GraphDef(NAME, NativePrefill(model), example, dynamic,
                        ["cond"] + cache_outputs(layers))
    return GraphDef(NAME, Prefill(model, attention_fn(attention)), example, dynamic,
                    ["cond", "prompt_keys", "prompt_values", "block_keys", "block_values"])
