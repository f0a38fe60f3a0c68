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


def valid_slots(lens: torch.Tensor, slots: int) -> torch.Tensor:
    """``[B, slots]`` boolean: slot j of row b holds a token (``j < lens[b]``)."""
    return torch.arange(slots, device=lens.device)[None, :] < lens.long()[:, None]


def visible(cache_lens: torch.Tensor, t: int, slots: int, mode: str | int) -> torch.Tensor:
    """The attention mask of the contract, ``[B, 1, T, slots]`` boolean: new token i of row b
    (at slot ``cache_lens[b] + i``) sees slot j iff ``j < cache_lens[b] + T`` ("block") or
    ``j <= cache_lens[b] + i`` ("causal")."""
    dev = cache_lens.device
    i = torch.arange(t, device=dev)[None, None, :, None]
    j = torch.arange(slots, device=dev)[None, None, None, :]
    causal = mode_to_int(mode) == MODE_CAUSAL
    limit = cache_lens.long()[:, None, None, None] + (i + 1 if causal else t)
    # compared against a [B, 1, T, 1] limit so both sides have T explicitly (ONNX Runtime's
    # Attention wants the mask's query axis to be T, not broadcast)
    return j < limit + torch.zeros_like(i)


def write_at(cache: torch.Tensor, new: torch.Tensor, lens: torch.Tensor, seq_dim: int,
             batch_dim: int = 0) -> torch.Tensor:
    """The cache write, in place: ``cache[.., b, .., lens[b] + i, ..] = new[.., b, .., i, ..]``
    for the T entries of ``new`` along ``seq_dim`` (rows along ``batch_dim`` < ``seq_dim``,
    every other axis matching). Returns ``cache``."""
    b, t = new.shape[batch_dim], new.shape[seq_dim]
    pos = lens.long()[:, None] + torch.arange(t, device=new.device)  # [B, T]
    shape = [1] * new.dim()
    shape[batch_dim], shape[seq_dim] = b, t
    return cache.scatter_(seq_dim, pos.view(shape).expand(new.shape), new.to(cache.dtype))


def write_kv_ref(k_new, v_new, k_cache, v_cache, cache_lens) -> None:
    """In place: ``k_cache[b, :, cache_lens[b] + i] = k_new[b, :, i]`` for i < T (same for v).

    k_new, v_new: [B, Hkv, T, D]; k_cache, v_cache: [B, Hkv, S_max, D]; cache_lens: [B].
    """
    write_at(k_cache, k_new, cache_lens, 2)
    write_at(v_cache, v_new, cache_lens, 2)


def attend(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str | int,
           scale: float | None = None, fp32_math: bool = True, unseen_may_be_garbage: bool = True):
    """Attention of T new tokens over a cache and over themselves, without writing the cache:
    the one plain-PyTorch form of the contract (the CPU fallback of the op, the test oracle,
    the ``--attention standard`` graphs and the ONNX plugin node's PyTorch side).

    q ``[B, Hq, T, D]``; k_new, v_new ``[B, Hkv, T, D]``; k_cache, v_cache ``[B, Hkv, S_max, D]``
    or None (an empty cache); cache_lens ``[B]`` integer (ignored without a cache). Cache slot j
    of row b is seen iff ``j < cache_lens[b]``; "block": every new token sees all new tokens,
    "causal": new token i sees new tokens ``<= i``. GQA: query head h uses kv head
    ``h // (Hq // Hkv)``, by grouping query heads (the cache is never repeated). Scores against
    the cache and against the new tokens are computed separately and joined before the
    softmax (float32), so the cache is read once and never concatenated.

    ``fp32_math``: products in float32 (the oracle); else in the inputs' dtype with a float32
    softmax (what an exported graph does). ``unseen_may_be_garbage``: zero the values of unseen
    slots, so that NaN or inf there cannot leak through a zero probability; a runtime whose
    cache is zero-initialized can skip that pass.
    """
    causal = mode_to_int(mode) == MODE_CAUSAL
    b, hq, t, d = q.shape
    hkv = k_new.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    cast = (lambda x: x.float()) if fp32_math else (lambda x: x)
    qg = cast(q).reshape(b, hkv, g, t, d)
    neg = torch.tensor(float("-inf"), dtype=torch.float32, device=q.device)

    new_scores = torch.matmul(qg, cast(k_new).unsqueeze(2).transpose(-1, -2)).float() * scale
    if causal:  # among the new tokens alone: the causal mask of an empty cache
        among = visible(torch.zeros(1, dtype=torch.long, device=q.device), t, t, MODE_CAUSAL)
        new_scores = torch.where(among[0, 0], new_scores, neg)
    if k_cache is None:
        probs = torch.softmax(new_scores, dim=-1)
        out = torch.matmul(probs.to(qg.dtype), cast(v_new).unsqueeze(2))
        return out.reshape(b, hq, t, d).to(q.dtype)

    s_max = k_cache.shape[2]
    seen = valid_slots(cache_lens, s_max)  # [B, S]
    cache_scores = torch.matmul(qg, cast(k_cache).unsqueeze(2).transpose(-1, -2)).float() * scale
    cache_scores = torch.where(seen[:, None, None, None, :], cache_scores, neg)
    probs = torch.softmax(torch.cat([cache_scores, new_scores], dim=-1), dim=-1).to(qg.dtype)
    values = cast(v_cache)
    if unseen_may_be_garbage:
        values = torch.where(seen[:, None, :, None], values, torch.zeros((), dtype=values.dtype,
                                                                          device=q.device))
    out = (torch.matmul(probs[..., :s_max], values.unsqueeze(2))
           + torch.matmul(probs[..., s_max:], cast(v_new).unsqueeze(2)))
    return out.reshape(b, hq, t, d).to(q.dtype)


def kv_attention_ref(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str | int,
                     scale: float | None = None) -> torch.Tensor:
    """The op's contract in plain PyTorch (fp32 math): attention of the new tokens over
    ``[0, cache_lens[b])`` of the cache and over themselves (:func:`attend`), and the new keys
    and values written into the cache in place at ``[cache_lens[b], cache_lens[b] + T)``.

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
      out: [B, Hq, T, D] in q's dtype.
    """
    check_shapes(q, k_new, v_new, k_cache, v_cache, cache_lens)
    out = attend(q, k_new, v_new, k_cache, v_cache, cache_lens, mode, scale)
    write_kv_ref(k_new, v_new, k_cache, v_cache, cache_lens)
    return out
