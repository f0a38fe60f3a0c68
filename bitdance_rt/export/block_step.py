"""The ``block_step`` graph: one image block of every sequence through the projector and the LLM.

Inputs
  tokens      ``[B, P, 32]`` float32  the +-1 tokens of block k (tiled to the S sequences inside:
                                      row s uses image ``s % B``; cond rows first, then uncond)
  pe          ``[P, H]`` float32      2-D position embedding of block k
  pe_next     ``[P, H]`` float32      position embedding of block k + 1 (zeros after the last)
  k_cache     ``[L, S, Hkv, S_max, D]`` model dtype (v_cache the same)
  cache_lens  ``[S]`` int64           tokens already in each sequence's cache
Outputs
  cond        ``[S, P, H]`` float32   head condition of block k + 1 (hidden + pe_next)
  new_keys    ``[L, S, Hkv, P, D]``   keys of the P new tokens (new_values the same); the
                                      runtime writes them at ``cache_lens[s]`` and adds P.

A native graph (``--attention native``) takes the per-layer caches ``k_cache_i``/``v_cache_i``
``[S, Hkv, S_max, D]`` instead of the stacked ones and, instead of new_keys/new_values, returns
them with the block written at ``cache_lens[s]`` (``k_cache_out_i``/``v_cache_out_i``, bound by
the runtime to the input's memory: in place); the runtime then adds P to the lengths.

RoPE positions are ``cache_lens[s] + i``: conditional and unconditional sequences keep their own
positions. Attention is block mode (every new token sees the cache and the whole block).
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import cache_inputs, cache_outputs
from ..models.kv_cache import StaticKVCache
from ..models.steps import block_step, tile_rows
from .attention import GraphKV, attention_fn
from .common import GraphDef, dim, native_cache_feeds, write_slots
from .native import NativeKV

NAME = "block_step"


class BlockStep(nn.Module):
    def __init__(self, model, attention):
        super().__init__()
        self.model = model
        self.attention = attention
        self.llm, self.projector = model.llm.model, model.projector  # the exported weights

    def forward(self, tokens, pe, pe_next, k_cache, v_cache, cache_lens):
        kv = GraphKV(self.attention, k_cache, v_cache, cache_lens)
        cond = block_step(self.model, tile_rows(tokens, cache_lens.shape[0]), pe, pe_next, kv)
        new_keys, new_values = kv.new_kv()
        return cond, new_keys, new_values


class NativeBlockStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.llm, self.projector = model.llm.model, model.projector

    def forward(self, tokens, pe, pe_next, cache_lens, *caches):
        n = len(caches) // 2
        kv = NativeKV(caches[:n], caches[n:], cache_lens)
        cond = block_step(self.model, tile_rows(tokens, cache_lens.shape[0]), pe, pe_next, kv)
        return (cond, *kv.caches())


@torch.no_grad()
def pytorch_outputs(model, feeds: dict) -> dict:
    """The PyTorch backend's block step: tiled tokens through the projector, the LLM over a
    :class:`StaticKVCache` (written in place), new keys read back from the cache."""
    cfg = model.spec.llm
    tokens, lens = feeds["tokens"], feeds["cache_lens"]
    rows, p = lens.shape[0], tokens.shape[1]
    if "k_cache_0" in feeds:  # native: the same step, then its keys written into the caches
        layers = cfg.num_hidden_layers
        stacked = {kind: torch.stack([feeds[f"{kind}_cache_{i}"] for i in range(layers)])
                   for kind in ("k", "v")}
        out = pytorch_outputs(model, {**{k: v for k, v in feeds.items() if "_cache_" not in k},
                                      "k_cache": stacked["k"], "v_cache": stacked["v"]})
        caches = {f"{kind}_cache_out_{i}": write_slots(feeds[f"{kind}_cache_{i}"],
                                                       out[new][i], lens)
                  for kind, new in (("k", "new_keys"), ("v", "new_values"))
                  for i in range(layers)}
        return {"cond": out["cond"], **caches}
    k_in, v_in = feeds["k_cache"], feeds["v_cache"]
    slots = k_in.shape[3]
    cache = StaticKVCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, slots + p,
                          cfg.head_dim, model.dtype, "cpu")
    cache.k[:, :, :, :slots] = k_in
    cache.v[:, :, :, :slots] = v_in
    cache.set_lens(lens.tolist())
    cond = block_step(model, tile_rows(tokens, rows), feeds["pe"], feeds["pe_next"], cache)
    pos = lens[:, None] + torch.arange(p)[None]
    index = pos[None, :, None, :, None].expand(cfg.num_hidden_layers, rows,
                                               cfg.num_key_value_heads, p, cfg.head_dim)
    return {"cond": cond, "new_keys": cache.k.gather(3, index),
            "new_values": cache.v.gather(3, index)}


def random_inputs(model, gen: torch.Generator, batch: int, lens: list[int], slots: int,
                  native: bool = False) -> dict:
    """Tokens of ``batch`` images for ``len(lens)`` rows (a multiple of batch), a random cache
    of ``slots`` slots holding ``lens[s]`` tokens per row (finite values everywhere): stacked
    ``[L, S, Hkv, slots, D]``, or per layer for a native graph (in its input order)."""
    spec, dt = model.spec, model.dtype
    cfg = spec.llm
    p, hid = spec.parallel_num, cfg.hidden_size
    feeds = {
        "tokens": torch.randint(0, 2, (batch, p, spec.head.ch_target), generator=gen) * 2.0 - 1,
        "pe": torch.randn(p, hid, generator=gen),
        "pe_next": torch.randn(p, hid, generator=gen),
    }
    if native:
        feeds["cache_lens"] = torch.tensor(lens)
        feeds.update(native_cache_feeds(model, gen, len(lens), slots))
        return feeds
    cache = (cfg.num_hidden_layers, len(lens), cfg.num_key_value_heads, slots, cfg.head_dim)
    feeds["k_cache"] = torch.randn(cache, generator=gen).to(dt)
    feeds["v_cache"] = torch.randn(cache, generator=gen).to(dt)
    feeds["cache_lens"] = torch.tensor(lens)
    return feeds


def graph_def(model, attention: str, slots: int | None = None) -> GraphDef:
    """The graph for ``--attention attention``; a native graph's caches have ``slots`` slots
    (static)."""
    B, S = dim("batch"), dim("rows")
    if attention == "native":
        example = random_inputs(model, torch.Generator().manual_seed(0), 2, [8, 5, 8, 5],
                                slots, native=True)
        layers = model.spec.llm.num_hidden_layers
        dynamic = {"tokens": {0: B}, "pe": None, "pe_next": None, "cache_lens": {0: S},
                   **{name: {0: S} for name in cache_inputs(layers)}}
        return GraphDef(NAME, NativeBlockStep(model), example, dynamic,
                        ["cond"] + cache_outputs(layers))
    example = random_inputs(model, torch.Generator().manual_seed(0), 2, [8, 5, 8, 5], 11)
    SMAX = dim("cache_slots")
    dynamic = {"tokens": {0: B}, "pe": None, "pe_next": None,
               "k_cache": {1: S, 3: SMAX}, "v_cache": {1: S, 3: SMAX}, "cache_lens": {0: S}}
    return GraphDef(NAME, BlockStep(model, attention_fn(attention)), example, dynamic,
                    ["cond", "new_keys", "new_values"])
