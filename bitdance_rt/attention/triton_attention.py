"""Triton KV-cache attention for one BitDance AR step (cache write + flash attention, one launch).

Same contract as :func:`bitdance_rt.attention.plain.kv_attention_ref`.

Kernel layout
-------------
* Grid ``(cdiv(G * T, BLOCK_M), B * Hkv)`` with ``G = Hq // Hkv``. The G query heads that
  share a kv head are packed into the M dimension of one tile (row r -> head g = r // T,
  token i = r % T), so each K/V block is loaded once per group instead of G times and
  small-T steps (T = 1..16) still fill a tensor-core tile.
* Keys are visited in two phases: the old cache ``[0, cache_lens[b])`` is read from
  ``k_cache/v_cache``; the T new keys are read straight from ``k_new/v_new``.
  Because no program ever reads cache slots ``>= cache_lens[b]``, the programs with
  ``pid_m == 0`` can write the new K/V into the cache in the same launch without a race
  (the write and the reads touch disjoint addresses).
* Online softmax in base 2 with fp32 statistics and an fp32 accumulator. Masked loads use
  ``other=0`` so NaN/garbage in unused cache slots never reaches the math.

sm_90a AOT figures (``aot.compile_for_hopper()``; triton 3.9.0, the wheel's ptxas, no GPU):
  bf16, D=128, GROUP=5, pick_config defaults (BLOCK_M=64, BLOCK_N=64, 8 warps, 3 stages):
      block mode 174 regs, causal 177 regs, 112 KiB shared memory, 0 bytes spilled, wgmma.
  bf16, D=128, decode (G*T <= 16 -> BLOCK_M=16, 4 warps): 108 regs, 70 KiB smem, 0 spills.
  bf16, D=64 / D=32 (BLOCK_M=64, 4 warps): 138 / 121 regs, 56 / 28 KiB smem, 0 spills.
  BLOCK_M=64 with 4 warps at D=128 hits 255 regs (no spills); BLOCK_N=128 spills.
  The numbers need the JIT's 16-divisibility hints on pointers/strides: without them loads
  are not vectorised and the same config spills ~2 KB per thread.
  fp32 inputs use IEEE FMA dots on GPU and spill; they are a test dtype, not a deploy dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .plain import MODE_CAUSAL, check_shapes, mode_to_int


@triton.jit
def _kv_attn_kernel_trt(
    Q, KN, VN, KC, VC, LENS,  # inputs (TensorRT AOT order: inputs, int32 scalars, outputs)
    T, S_MAX,                 # the dynamic dims
    OUT,                      # output
    N_Q_HEADS: tl.constexpr,
    N_KV_HEADS: tl.constexpr,
    QK_SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Entry point for the TensorRT plugin: contiguous tensors, strides derived from dims, and
    no cache write (an exported graph returns the new keys/values; the runtime stores them)."""
    _kv_attn_kernel(Q, KN, VN, KC, VC, LENS, OUT,
                    N_Q_HEADS * T * HEAD_DIM, T * HEAD_DIM, HEAD_DIM,
                    N_KV_HEADS * T * HEAD_DIM, T * HEAD_DIM, HEAD_DIM,
                    N_KV_HEADS * T * HEAD_DIM, T * HEAD_DIM, HEAD_DIM,
                    N_KV_HEADS * S_MAX * HEAD_DIM, S_MAX * HEAD_DIM, HEAD_DIM,
                    N_KV_HEADS * S_MAX * HEAD_DIM, S_MAX * HEAD_DIM, HEAD_DIM,
                    N_Q_HEADS * T * HEAD_DIM, T * HEAD_DIM, HEAD_DIM,
                    T, N_KV_HEADS, QK_SCALE, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL,
                    False, DOT_PRECISION, False)


@triton.jit
def _kv_attn_kernel(
    Q, KN, VN, KC, VC, LENS, OUT,
    sq_b, sq_h, sq_t,
    skn_b, skn_h, skn_t,
    svn_b, svn_h, svn_t,
    skc_b, skc_h, skc_s,
    svc_b, svc_h, svc_s,
    so_b, so_h, so_t,
    T, N_KV_HEADS, qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WRITE_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // N_KV_HEADS).to(tl.int64)  # int64: cache offsets can exceed 2**31 elements
    kvh = (pid_bh % N_KV_HEADS).to(tl.int64)
    L = tl.load(LENS + b).to(tl.int32)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    kn_base = KN + b * skn_b + kvh * skn_h
    vn_base = VN + b * svn_b + kvh * svn_h
    kc_base = KC + b * skc_b + kvh * skc_h
    vc_base = VC + b * svc_b + kvh * svc_h

    # ---- in-place cache write of the new tokens (one program per (b, kv head)) ----
    if WRITE_KV:
        if pid_m == 0:
            for t0 in range(0, T, BLOCK_N):
                t = t0 + offs_n
                m2 = (t < T)[:, None] & d_mask[None, :]
                kt = tl.load(kn_base + t[:, None] * skn_t + offs_d[None, :], mask=m2)
                tl.store(kc_base + (L + t)[:, None] * skc_s + offs_d[None, :], kt.to(KC.dtype.element_ty), mask=m2)
                vt = tl.load(vn_base + t[:, None] * svn_t + offs_d[None, :], mask=m2)
                tl.store(vc_base + (L + t)[:, None] * svc_s + offs_d[None, :], vt.to(VC.dtype.element_ty), mask=m2)

    # ---- packed query tile: row r -> (head g, token i) ----
    M_TOTAL = GROUP * T
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_r < M_TOTAL
    g = offs_r // T
    i = offs_r % T
    qh = kvh * GROUP + g
    q_ptrs = Q + b * sq_b + qh[:, None] * sq_h + i[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    if DOT_UPCAST:
        # Triton's CPU interpreter multiplies bf16 dot operands as raw uint16 (3.9 bug);
        # the launcher sets this only there: all dots then run in fp32 (q.dtype below).
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- phase 1: keys already in the cache, j in [0, L); visible to every row ----
    for start in range(0, L, BLOCK_N):
        j = start + offs_n
        kv_mask = j < L
        k = tl.load(kc_base + j[None, :] * skc_s + offs_d[:, None],
                    mask=kv_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(kv_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: avoid inf - inf
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_base + j[:, None] * svc_s + offs_d[None, :],
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        # p is rounded to the I/O dtype for the tensor-core PV product (fp32 accumulator).
        p = p.to(OUT.dtype.element_ty).to(q.dtype)
        acc = tl.dot(p, v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # ---- phase 2: the T new keys, read from k_new / v_new (never from the cache) ----
    if CAUSAL:
        # Only rows' own prefix t <= i is visible: stop after the largest i in this tile.
        r_lo = pid_m * BLOCK_M
        r_hi = tl.minimum(r_lo + BLOCK_M, M_TOTAL) - 1
        hi = tl.where(r_lo // T == r_hi // T, r_hi % T + 1, T)
    else:
        hi = T
    for start in range(0, hi, BLOCK_N):
        t = start + offs_n
        kv_mask = t < T
        k = tl.load(kn_base + t[None, :] * skn_t + offs_d[:, None],
                    mask=kv_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        vis = kv_mask[None, :]
        if CAUSAL:
            vis = vis & (t[None, :] <= i[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vn_base + t[:, None] * svn_t + offs_d[None, :],
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        # p is rounded to the I/O dtype for the tensor-core PV product (fp32 accumulator).
        p = p.to(OUT.dtype.element_ty).to(q.dtype)
        acc = tl.dot(p, v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows (never stored) have l == 0
    out = acc / l_safe[:, None]
    o_ptrs = OUT + b * so_b + qh[:, None] * so_h + i[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


_LOG2E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    """True when the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at jit time)."""
    return type(_kv_attn_kernel).__name__ == "InterpretedFunction"


def pick_config(m_total: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes / warps for a packed query length ``m_total = G * T``.

    BLOCK_M stays small for decode-like steps (tl.dot needs >= 16 rows) and is capped at 64
    so one 14B step (B=2, Hkv=8, G*T=320) still launches 80 CTAs on 132 SMs. 8 warps for
    64-row tiles keeps bf16 D=128 at 174 regs, 0 spills on sm_90 (4 warps: 255 regs).
    fp32 is a test dtype on GPU (IEEE FMA dot): smaller key blocks to limit spills.
    """
    block_m = 16 if m_total <= 16 else 32 if m_total <= 32 else 64
    block_n = 32 if (dtype == torch.float32 or head_dim > 128) else 64
    num_warps = 8 if (block_m == 64 and head_dim >= 128 and dtype != torch.float32) else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=3)


def kv_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_lens, mode: str | int,
                        scale: float | None = None, *, config: dict | None = None) -> torch.Tensor:
    """Triton launcher, same contract as ``kv_attention_ref``.

    q: [B, Hq, T, D]; k_new, v_new: [B, Hkv, T, D]; k_cache, v_cache: [B, Hkv, S_max, D]
    (mutated in place, must have a contiguous last dim); cache_lens: [B] int32/int64 on the
    same device. Returns out: [B, Hq, T, D] in q's dtype.
    """
    check_shapes(q, k_new, v_new, k_cache, v_cache, cache_lens)
    causal = mode_to_int(mode) == MODE_CAUSAL
    B, Hq, T, D = q.shape
    Hkv = k_new.shape[1]
    G = Hq // Hkv
    if scale is None:
        scale = D ** -0.5
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous last dim (they are written in place)")
    # The kernel assumes unit stride along D for vectorised loads; other strides are free.
    q, k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_new, v_new))
    k_new = k_new.to(q.dtype)
    v_new = v_new.to(q.dtype)
    if cache_lens.dtype not in (torch.int32, torch.int64):
        cache_lens = cache_lens.to(torch.int32)
    cache_lens = cache_lens.to(q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if B == 0 or Hq == 0 or T == 0:
        return out

    cfg = dict(pick_config(G * T, D, q.dtype), **(config or {}))
    grid = (triton.cdiv(G * T, cfg["BLOCK_M"]), B * Hkv)
    _kv_attn_kernel[grid](
        q, k_new, v_new, k_cache, v_cache, cache_lens, out,
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        T, Hkv, float(scale) * _LOG2E,
        GROUP=G,
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=causal,
        WRITE_KV=True,
        # fp32 inputs: plain IEEE fp32 dot (TF32 would cost ~1e-3 relative error).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and _interpreting(),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
