"""Ahead-of-time compilation of the KV-attention Triton kernel for Hopper (sm_90a), no GPU needed.

Used to check register/shared-memory budgets now and, later, to embed the cubin in a
TensorRT plugin. ``triton.compile`` with an explicit ``GPUTarget`` runs the whole
pipeline (ttir -> ttgir -> llir -> ptx -> cubin) on the host; the register and spill
counts normally come from the CUDA driver at load time, so we re-run the wheel's
``ptxas -v`` on the PTX to read them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

_TL_DTYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
              "bf16": "bf16", "bfloat16": "bf16"}

# Argument types of _kv_attn_kernel in order, with "{dt}" for the activation dtype.
_PTR_ARGS = ("Q", "KN", "VN", "KC", "VC")
_STRIDE_ARGS = ("sq_b", "sq_h", "sq_t", "skn_b", "skn_h", "skn_t", "svn_b", "svn_h", "svn_t",
                "skc_b", "skc_h", "skc_s", "svc_b", "svc_h", "svc_s", "so_b", "so_h", "so_t")


def _jit_function():
    """The kernel as a JITFunction, even when TRITON_INTERPRET=1 wrapped it for the CPU."""
    from triton.runtime.jit import JITFunction

    from .triton_attention import _kv_attn_kernel
    return _kv_attn_kernel if isinstance(_kv_attn_kernel, JITFunction) else JITFunction(_kv_attn_kernel.fn)


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Run ptxas -v on ``ptx`` and parse registers / spills / stack (empty dict if ptxas is missing)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception:  # pragma: no cover - depends on the triton build
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Same flags triton uses for sm_90 so the numbers match the cubin it produced.
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    out = {"ptxas_log": log, "ptxas_ok": res.returncode == 0}
    if m := re.search(r"Used (\d+) registers", log):
        out["n_regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
        out["n_spills"] = out["spill_stores"] + out["spill_loads"]
    if m := re.search(r"(\d+) bytes stack frame", log):
        out["stack_bytes"] = int(m.group(1))
    return out


def compile_for_hopper(dtype: str = "bf16", head_dim: int = 128, group: int = 5, causal: bool = False,
                       block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                       num_stages: int | None = None, m_total: int = 320, lens_dtype: str = "i32",
                       arch: int = 90) -> dict:
    """AOT-compile ``_kv_attn_kernel`` for sm_``arch`` and return its metadata.

    Block sizes default to ``pick_config(m_total, head_dim, dtype)``, i.e. what the launcher
    uses for a packed query length ``m_total = G * T`` (320 = one 14B step, G=5, T=64).
    Returns a dict with ``name``, ``ptx`` (str), ``cubin`` (bytes), ``shared`` (bytes of
    shared memory Triton allocates), ``num_warps``, ``num_stages``, ``block_m``, ``block_n``
    and, when the wheel's ptxas is usable, ``n_regs``, ``n_spills`` (spill store+load
    bytes), ``stack_bytes``. Raises if this triton build has no CUDA backend.

    Under ``TRITON_INTERPRET=1`` triton's frontend is patched for the CPU interpreter and
    cannot emit GPU IR, so the compile then runs in a child process without that variable.
    """
    kwargs = dict(dtype=dtype, head_dim=head_dim, group=group, causal=causal, block_m=block_m,
                  block_n=block_n, num_warps=num_warps, num_stages=num_stages, m_total=m_total,
                  lens_dtype=lens_dtype, arch=arch)
    from triton import knobs
    if knobs.runtime.interpret:
        return _run_in_subprocess("compile_for_hopper", kwargs)
    return _compile(**kwargs)


def _compile(dtype, head_dim, group, causal, block_m, block_n, num_warps, num_stages, m_total,
             lens_dtype, arch) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from .triton_attention import pick_config

    dt = _TL_DTYPES[dtype]
    torch_dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    cfg = pick_config(m_total, head_dim, torch_dt)
    block_m = block_m or cfg["BLOCK_M"]
    block_n = block_n or cfg["BLOCK_N"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]

    sig = {name: f"*{dt}" for name in _PTR_ARGS}
    sig["LENS"] = f"*{lens_dtype}"
    sig["OUT"] = f"*{dt}"
    sig.update({name: "i32" for name in _STRIDE_ARGS})
    sig.update(T="i32", N_KV_HEADS="i32", qk_scale="fp32")
    constexprs = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                      BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, WRITE_KV=True,
                      DOT_PRECISION="ieee" if dt == "fp32" else "tf32", DOT_UPCAST=False)
    sig.update({name: "constexpr" for name in constexprs})
    fn = _jit_function()
    # What the JIT launcher would infer for real tensors: 16-byte aligned pointers and
    # strides divisible by 16 (true for contiguous [B, H, L, D] with D in {32, 64, 128}).
    # Without these hints loads are not vectorised and the kernel spills heavily.
    aligned = _PTR_ARGS + ("LENS", "OUT") + _STRIDE_ARGS
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature={k: sig[k] for k in fn.arg_names}, constexprs=constexprs,
                                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    info = dict(name=compiled.name, ptx=ptx, cubin=compiled.asm.get("cubin"), shared=md.shared,
                num_warps=md.num_warps, num_stages=md.num_stages, block_m=block_m, block_n=block_n,
                arch=arch)
    ptx_target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    info.update(_ptxas_usage(ptx, ptx_target.group(1) if ptx_target else f"sm_{arch}a"))
    return info


# --------------------------------------------------------------------------- TensorRT entry

def _trt_jit_function():
    from triton.runtime.jit import JITFunction

    from .triton_attention import _kv_attn_kernel_trt
    fn = _kv_attn_kernel_trt
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


# What TensorRT's AOT plugin launch passes the kernel, in order: the 6 input pointers, the
# extra int32 arguments (T, S_max), the output pointer. Nothing else.
TRT_PARAMS = 9
# Dynamic shared memory a kernel gets without opting in (cuFuncSetAttribute): TensorRT's
# launch of an AOT plugin kernel is not documented to opt in, so the entry stays within it.
TRT_SHARED_LIMIT = 48 * 1024


def compile_trt_entry(dtype: str = "bf16", head_dim: int = 128, n_q_heads: int = 40,
                      n_kv_heads: int = 8, scale: float | None = None, causal: bool = False,
                      t_hint: int = 64, arch: int = 90) -> dict:
    """Compile the TensorRT-convention entry (``_kv_attn_kernel_trt``) to PTX for sm_``arch``.

    Head counts, head dim, scale and mask are compile-time constants (a TensorRT AOT plugin
    bakes them into the kernel it embeds); T and S_MAX stay runtime ``int32`` arguments.
    ``t_hint`` picks the preferred block sizes (the tokens per step the engine mostly runs);
    the first configuration from there whose shared memory fits ``TRT_SHARED_LIMIT`` (without
    register spills, in half precision) is used. Triton appends two scratch pointers to every
    kernel's parameters, which TensorRT does not pass: they are removed from the PTX entry
    (after checking that the body never reads them), so the entry takes exactly what TensorRT
    passes. Returns name, ptx, shared (bytes), num_warps, block_m, block_n, n_params and the
    ptxas figures.
    """
    kwargs = dict(dtype=dtype, head_dim=head_dim, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                  scale=scale, causal=causal, t_hint=t_hint, arch=arch)
    from triton import knobs
    if knobs.runtime.interpret:
        return _run_in_subprocess("compile_trt_entry", kwargs)
    import torch

    from .triton_attention import pick_config

    dt = _TL_DTYPES[dtype]
    torch_dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    group = n_q_heads // n_kv_heads
    best = pick_config(group * t_hint, head_dim, torch_dt)
    candidates = [(best["BLOCK_M"], best["BLOCK_N"], best["num_warps"], stages)
                  for stages in (best["num_stages"], 2, 1)]
    candidates += [(best["BLOCK_M"], 32, 4, 2), (best["BLOCK_M"], 32, 4, 1), (32, 32, 4, 1),
                   (16, 32, 4, 1)]
    info = None
    for block_m, block_n, warps, stages in candidates:
        info = _compile_trt(dt, head_dim, n_q_heads, n_kv_heads, scale, causal, group, block_m,
                            block_n, warps, stages, arch)
        spills_ok = dt == "fp32" or not info.get("n_spills")
        if info["shared"] <= TRT_SHARED_LIMIT and spills_ok:
            break
    if info["shared"] > TRT_SHARED_LIMIT:
        raise RuntimeError(f"no launch configuration of the TensorRT kernel fits "
                           f"{TRT_SHARED_LIMIT} bytes of shared memory ({info['shared']})")
    info["ptx"] = strip_unused_params(info["ptx"], info["name"], TRT_PARAMS)
    info["n_params"] = len(entry_params(info["ptx"]))
    target = re.search(r"^\.target\s+(\S+)", info["ptx"], re.MULTILINE)
    info.update(_ptxas_usage(info["ptx"], target.group(1) if target else f"sm_{arch}a"))
    return info


def entry_params(ptx: str) -> list[str]:
    """The parameter declarations of the PTX's ``.entry``."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    return [p.strip() for p in entry.group(1).split(",") if p.strip()] if entry else []


def strip_unused_params(ptx: str, name: str, keep: int) -> str:
    """Drop the entry's parameters after the first ``keep`` (Triton's scratch pointers);
    refuse if the kernel body reads one of them."""
    params = entry_params(ptx)
    if len(params) <= keep:
        return ptx
    extra = [re.search(r"(\w+_param_\d+)", p).group(1) for p in params[keep:]]
    body = ptx[ptx.index(")", ptx.index(".entry")):]
    used = [p for p in extra if re.search(rf"\b{p}\b", body)]
    if used:
        raise RuntimeError(f"the kernel {name} reads {used}, parameters TensorRT does not pass")
    entry = re.search(r"(\.entry\s+\w+\s*\()(.*?)(\))", ptx, re.S)
    kept = ",".join(entry.group(2).split(",")[:keep]).rstrip() + "\n"
    return ptx[:entry.start(2)] + kept + ptx[entry.end(2):]


def _compile_trt(dt, head_dim, n_q_heads, n_kv_heads, scale, causal, group, block_m, block_n,
                 num_warps, num_stages, arch) -> dict:
    import math

    import triton
    from triton.backends.compiler import GPUTarget

    scale = head_dim ** -0.5 if scale is None else scale
    sig = {n: f"*{dt}" for n in ("Q", "KN", "VN", "KC", "VC", "OUT")}
    sig.update(LENS="*i32", T="i32", S_MAX="i32")
    constexprs = dict(N_Q_HEADS=n_q_heads, N_KV_HEADS=n_kv_heads,
                      QK_SCALE=float(scale) / math.log(2.0), GROUP=group, HEAD_DIM=head_dim,
                      BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
                      BLOCK_N=block_n, CAUSAL=causal,
                      DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
    sig.update({n: "constexpr" for n in constexprs})
    fn = _trt_jit_function()
    aligned = ("Q", "KN", "VN", "KC", "VC", "LENS", "OUT")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature={k: sig[k] for k in fn.arg_names},
                                    constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    info = dict(name=compiled.name, ptx=ptx, shared=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps, num_stages=num_stages, block_m=block_m,
                block_n=block_n, group=group, arch=arch)
    ptx_target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    info.update(_ptxas_usage(ptx, ptx_target.group(1) if ptx_target else f"sm_{arch}a"))
    return info


def _run_in_subprocess(func: str, kwargs: dict) -> dict:
    import pickle
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    code = (f"import pickle, sys; from bitdance_rt.attention.aot import {func}; "
            f"kw = pickle.load(sys.stdin.buffer); sys.stdout.buffer.write(pickle.dumps({func}(**kw)))")
    res = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(kwargs), env=env,
                         capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{res.stderr.decode(errors='replace')[-4000:]}")
    return pickle.loads(res.stdout)
