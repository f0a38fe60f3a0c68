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

Two passes, as the reference makes two calls: the prompt with the causal mask (padding sits at
the end of a row, where the causal mask keeps it out of the real tokens), then the image-start
block in block mode over the first pass's keys and values (``cache_lens = input_lens``) at
positions ``input_lens[s] + i``. The runtime writes both into its cache; the sequence lengths
are then ``input_lens + P``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.kv_cache import StaticKVCache
from ..models.steps import image_start, prompt_pass
from .attention import GraphKV
from .common import GraphDef, dim

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
        valid = torch.arange(t, device=input_ids.device)[None, :] < input_lens[:, None]
        valid = valid[None, :, None, :, None]
        zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
        keys, values = torch.where(valid, keys, zero), torch.where(valid, values, zero)
        block = GraphKV(self.attention, keys, values, input_lens)
        cond = image_start(self.model, block_ids, block, pe)
        block_keys, block_values = block.new_kv()
        return cond, keys, values, block_keys, block_values


@torch.no_grad()
def reference(model, feeds: dict) -> dict:
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
    return out


def random_inputs(model, gen: torch.Generator, lens: list[int]) -> dict:
    spec = model.spec
    p, vocab = spec.parallel_num, spec.llm.vocab_size
    rows, t = len(lens), max(lens)
    return {"input_ids": torch.randint(0, vocab, (rows, t), generator=gen),
            "input_lens": torch.tensor(lens),
            "block_ids": torch.randint(0, vocab, (rows, p), generator=gen),
            "pe": torch.randn(p, spec.llm.hidden_size, generator=gen)}


def graph_def(model, attention) -> GraphDef:
    example = random_inputs(model, torch.Generator().manual_seed(0), [7, 5])
    S, T = dim("rows"), dim("prompt_len")
    dynamic = {"input_ids": {0: S, 1: T}, "input_lens": {0: S},
               "block_ids": {0: S}, "pe": None}
    return GraphDef(NAME, Prefill(model, attention), example, dynamic,
                    ["cond", "prompt_keys", "prompt_values", "block_keys", "block_values"])
