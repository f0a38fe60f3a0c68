"""Plain PyTorch KV-cache attention for one BitDance AR step (CPU path and test oracle).

One AR step appends T new tokens per sequence to a preallocated KV cache at a
per-sequence offset ``cache_lens[b]`` and lets the T queries attend to the cache.

Masks ("mode"):
  * ``"block"``  - query i sees every key j < cache_lens[b] + T (BitDance decodes a
    whole block of P tokens at once, bidirectional inside the block).
  * ``"causal"`` - query i sees keys j <= cache_lens[b] + i (text prompt prefill).

The code is written to be traceable by ``torch.onnx.export`` / ``torch.export``:
no Python loop over the batch, no ``.item()``, masks built from ``torch.arange``
and tensor lengths, the cache write is a ``scatter_``.
"""

from __future__ import annotations

import torch

MODE_BLOCK = 0
MODE_CAUSAL = 1
_MODES = {"block": MODE_BLOCK, "causal": MODE_CAUSAL}


def mode_to_int(mode: str | int) -> int:
    """Map ``"block"``/``"causal"`` (or 0/1) to the integer code used by the custom op."""
    if isinstance(mode, str):
        try:
            return _MODES[mode]
        except KeyError:
            raise ValueError(f"unknown attention mode {mode!r}, expected one of {sorted(_MODES)}") from None
    if mode in (MODE_BLOCK, MODE_CAUSAL):
        return int(mode)
    raise ValueError(f"unknown attention mode {mode!r}, expected 0 (block) or 1 (causal)")


def check_shapes(q, k_new, v_new, k_cache, v_cache, cache_lens) -> None:
    """Validate the shared contract of all implementations (cheap, shape-only)."""
    if q.dim() != 4 or k_new.dim() != 4 or k_cache.dim() != 4:
        raise ValueError("q, k_new, v_new, k_cache, v_cache must be 4-D [B, H, L, D]")
    B, Hq, T, D = q.shape
    if k_new.shape != v_new.shape or k_cache.shape != v_cache.shape:
        raise ValueError("k_new/v_new and k_cache/v_cache must have matching shapes")
    Bk, Hkv, Tk, Dk = k_new.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(f"k_new shape {tuple(k_new.shape)} does not match q shape {tuple(q.shape)}")
    if k_cache.shape[0] != B or k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match [B={B}, Hkv={Hkv}, S_max, D={D}]")
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if cache_lens.dim() != 1 or cache_lens.shape[0] != B:
        raise ValueError(f"cache_lens must have shape [B={B}], got {tuple(cache_lens.shape)}")
    if cache_lens.dtype.is_floating_point or cache_lens.dtype == torch.bool:
        raise ValueError("cache_lens must be an integer tensor")


def write_kv_ref(k_new, v_new, k_cache, v_cache, cache_lens) -> None:
    """In place: ``k_cache[b, :, cache_lens[b] + i] = k_new[b, :, i]`` for i < T (same for v).

    k_new, v_new: [B, Hkv, T, D]; k_cache, v_cache: [B, Hkv, S_max, D]; cache_lens: [B].
    """
    B, Hkv, T, D = k_new.shape
    pos = cache_lens.to(torch.long).unsqueeze(1) + torch.arange(T, device=k_new.device)  # [B, T]
    index = pos[:, None, :, None].expand(B, Hkv, T, D)
    k_cache.scatter_(2, index, k_new.to(k_cache.dtype))
    v_cache.scatter_(2, index, v_new.to(v_cache.dtype))


def kv_attention_ref(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str | int,
                     scale: float | None = None) -> torch.Tensor:
    """Write the new K/V into the cache in place, then attend (fp32 math).

    Args:
      q:          [B, Hq, T, D]
      k_new:      [B, Hkv, T, D]   (v_new same)
      k_cache:    [B, Hkv, S_max, D] (v_cache same), mutated in place at
                  positions [cache_lens[b], cache_lens[b] + T) only.
      cache_lens: [B] integer, tokens already in the cache per sequence;
                  caller guarantees cache_lens[b] + T <= S_max.
      mode:       "block" | "causal" (or 0 | 1), see module docstring.
      scale:      softmax scale, default D ** -0.5.
    Returns:
      out: [B, Hq, T, D] in q's dtype. GQA: query head h uses kv head h // (Hq // Hkv).
    """
    check_shapes(q, k_new, v_new, k_cache, v_cache, cache_lens)
    causal = mode_to_int(mode) == MODE_CAUSAL
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    if scale is None:
        scale = D ** -0.5

    write_kv_ref(k_new, v_new, k_cache, v_cache, cache_lens)

    lens = cache_lens.to(torch.long)
    j = torch.arange(S, device=q.device)  # key positions [S]
    if causal:
        limit = lens[:, None] + torch.arange(1, T + 1, device=q.device)  # [B, T], exclusive
    else:
        limit = (lens + T)[:, None].expand(B, T)
    allowed = j[None, None, :] < limit[:, :, None]  # [B, T, S]
    # Slots past cache_lens[b] + T may hold garbage (torch.empty, NaN): zero V there so
    # 0-probability * NaN cannot leak into the output; K garbage is removed by the mask.
    valid_kv = (j[None, :] < (lens + T)[:, None])[:, None, :, None]  # [B, 1, S, 1]
    k = k_cache.float()
    v = torch.where(valid_kv, v_cache.float(), torch.zeros((), device=q.device))

    # Group query heads by kv head instead of repeating the cache G times:
    # q head h = kvh * G + g, i.e. the repeat_interleave convention. 5-D tensors (no
    # flattening of G with the symbolic T) keep torch.export free of shape guards on T.
    qg = q.float().reshape(B, Hkv, G, T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)[:, :, None]) * scale  # [B, Hkv, G, T, S]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v[:, :, None])  # [B, Hkv, G, T, D]
    return out.reshape(B, Hq, T, D).to(q.dtype)
