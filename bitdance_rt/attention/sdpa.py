"""KV-cache attention with PyTorch's SDPA, called exactly as the reference pipeline calls it.

The authors' pipeline (through transformers) calls SDPA per sequence group over the exact
cache length: ``is_causal=True`` (GQA inside SDPA) for a prompt, and an all-true boolean mask
with repeated kv heads for a block. Calling SDPA the same way, per group of rows that share a
cache length, makes a float32 CPU run reproduce the reference bit for bit, which a single
masked call over a longer, ragged cache does not (different kernel blocking and reductions).
This is the CPU implementation of ``bitdance::kv_attention``; the Triton kernel is the CUDA one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plain import MODE_CAUSAL, mode_to_int, visible, write_kv_ref


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * n_rep, S, D]`` (each kv head repeated n_rep times)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def attend_like_reference(q, keys, values, causal: bool, past: int, scale=None,
                          native_gqa: bool = False) -> torch.Tensor:
    """q ``[B, Hq, T, D]`` over keys/values ``[B, Hkv, past + T, D]`` (exact length).

    ``native_gqa`` lets SDPA share kv heads instead of receiving repeated copies (faster on the
    CPU, same result there: the tests check it against the repeated form)."""
    n_rep = q.shape[1] // keys.shape[1]
    t = q.shape[2]
    if causal and past == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, scale=scale,
                                              enable_gqa=n_rep > 1)
    if native_gqa and not causal:  # an all-true mask is no mask
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=n_rep > 1)
    if causal:
        lens = torch.full((q.shape[0],), past, dtype=torch.long, device=q.device)
        mask = visible(lens, t, past + t, MODE_CAUSAL)
    else:
        mask = torch.ones((q.shape[0], 1, t, past + t), dtype=torch.bool, device=q.device)
    if native_gqa:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep),
                                          attn_mask=mask, scale=scale)


def kv_attention_grouped(q, k_new, v_new, k_cache, v_cache, cache_lens, mode, scale=None):
    """The ``bitdance::kv_attention`` contract (in-place write at ``cache_lens``, attention over
    ``[0, cache_lens[b] + T)`` with the mode's mask), one SDPA call per run of consecutive rows
    with equal cache length. Reads ``cache_lens`` on the host: meant for the CPU."""
    write_kv_ref(k_new, v_new, k_cache, v_cache, cache_lens)
    causal = mode_to_int(mode) == MODE_CAUSAL
    t = q.shape[2]
    lens = cache_lens.tolist()
    out = torch.empty_like(q)
    start = 0
    while start < len(lens):
        end = start
        while end < len(lens) and lens[end] == lens[start]:
            end += 1
        past = lens[start]
        keys = k_cache[start:end, :, :past + t].to(q.dtype)
        values = v_cache[start:end, :, :past + t].to(q.dtype)
        out[start:end] = attend_like_reference(q[start:end], keys, values, causal, past, scale,
                                               native_gqa=True)
        start = end
    return out
