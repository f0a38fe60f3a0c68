"""``torch.ops.bitdance.kv_attention``: KV-cache write + attention as one custom op.

Schema (``int mask_mode``, not str, so the op maps 1:1 onto an int attribute of a TensorRT/ONNX
plugin later):

    bitdance::kv_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache,
                           Tensor(b!) v_cache, Tensor cache_lens, int mask_mode, float? scale) -> Tensor

  mask_mode (not "mode": that name clashes with the ``mode`` kwarg of torch's
  auto_functionalized higher-order op used for mutating ops): 0 = "block" (query i sees j < cache_lens[b] + T), 1 = "causal" (j <= cache_lens[b] + i).
  k_cache / v_cache [B, Hkv, S_max, D] are mutated in place; returns out [B, Hq, T, D].

Dispatch: CPU (and any device without Triton) -> ``kv_attention_grouped`` (SDPA, see sdpa.py); CUDA -> the Triton
kernel when triton imports, else the reference. The fake kernel only allocates the output so
torch.compile / torch.export can trace through the op.
"""

from __future__ import annotations

import torch

from .plain import kv_attention_ref, mode_to_int
from .sdpa import kv_attention_grouped


@torch.library.custom_op("bitdance::kv_attention", mutates_args=("k_cache", "v_cache"))
def _kv_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_lens: torch.Tensor, mask_mode: int,
                     scale: float | None = None) -> torch.Tensor:
    # Default (CPU and any other device): SDPA per group of equal cache lengths, called as the
    # reference pipeline calls it (bit-exact with it on the CPU in float32).
    return kv_attention_grouped(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale)


@_kv_attention_op.register_kernel("cuda")
def _kv_attention_cuda(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale=None):
    try:
        from .triton_attention import kv_attention_triton
    except ImportError:  # no triton in this environment: stay correct, just slower
        return kv_attention_ref(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale)
    return kv_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale)


@_kv_attention_op.register_fake
def _kv_attention_fake(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def kv_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str | int = "block",
                 scale: float | None = None) -> torch.Tensor:
    """Write k_new/v_new [B, Hkv, T, D] into k_cache/v_cache [B, Hkv, S_max, D] at
    ``cache_lens[b]`` (in place) and return attention out [B, Hq, T, D] for q [B, Hq, T, D].

    ``mode`` may be "block"/"causal" or 0/1; see ``kv_attention_ref`` for the exact contract.
    """
    return torch.ops.bitdance.kv_attention(q, k_new, v_new, k_cache, v_cache, cache_lens,
                                           mode_to_int(mode), None if scale is None else float(scale))
