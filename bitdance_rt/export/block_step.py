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

RoPE positions are ``cache_lens[s] + i``: conditional and unconditional sequences keep their own
positions. Attention is block mode (every new token sees the cache and the whole block).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import GraphKV
from .common import GraphDef, dim, tile_rows

NAME = "block_step"


class BlockStep(nn.Module):
    def __init__(self, model, attention):
        super().__init__()
        self.llm = model.llm.model
        self.projector = model.projector
        self.attention = attention
        self.dtype = model.dtype

    def forward(self, tokens, pe, pe_next, k_cache, v_cache, cache_lens):
        p = tokens.shape[1]
        embeds = self.projector(tokens.to(self.dtype)) + pe  # [B, P, H], float32 (as the torch backend)
        embeds = tile_rows(embeds, cache_lens.shape[0])
        positions = cache_lens[:, None] + torch.arange(p, device=tokens.device)[None, :]
        kv = GraphKV(self.attention, k_cache, v_cache, cache_lens)
        hidden = self.llm(embeds.to(self.dtype), positions, kv, "block")
        new_keys, new_values = kv.new_kv()
        return hidden.float() + pe_next, new_keys, new_values


def graph_def(model, attention, batch: int = 1, rows: int = 2, cache_len: int = 8) -> GraphDef:
    spec, dt = model.spec, model.dtype
    cfg = spec.llm
    p, hid = spec.parallel_num, cfg.hidden_size
    cache = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, cache_len + 3, cfg.head_dim)
    gen = torch.Generator().manual_seed(0)
    example = {
        "tokens": torch.randint(0, 2, (batch, p, spec.head.ch_target), generator=gen).float() * 2 - 1,
        "pe": torch.randn(p, hid, generator=gen),
        "pe_next": torch.randn(p, hid, generator=gen),
        "k_cache": torch.randn(cache, generator=gen).to(dt),
        "v_cache": torch.randn(cache, generator=gen).to(dt),
        "cache_lens": torch.tensor([cache_len - (i % 2) for i in range(rows)]),
    }
    B, S, SMAX = dim("batch"), dim("rows"), dim("cache_slots")
    dynamic = {"tokens": {0: B}, "pe": None, "pe_next": None,
               "k_cache": {1: S, 3: SMAX}, "v_cache": {1: S, 3: SMAX}, "cache_lens": {0: S}}
    return GraphDef(NAME, BlockStep(model, attention), example, dynamic,
                    ["cond", "new_keys", "new_values"])
