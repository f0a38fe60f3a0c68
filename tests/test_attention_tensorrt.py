"""The TensorRT plugin: its AOT kernel entry compiles for Hopper here; the plugin itself is
registered and built into an engine only where TensorRT is importable."""

import os
import re
import sys

import pytest
import torch

if not torch.cuda.is_available():  # run Triton kernels on the CPU interpreter (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitdance_rt.attention import tensorrt_plugin  # noqa: E402
from bitdance_rt.attention.tensorrt_plugin import (PLUGIN_ID, register_plugin,  # noqa: E402
                                                 tensorrt_status)

TRT_OK, TRT_REASON = tensorrt_status()


def _no_cuda_backend_reason():
    """Why this triton cannot compile for NVIDIA GPUs at all (None when it can): the only
    reason to skip the ahead-of-time compile. Any failure of the compile itself fails."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton is not importable: {e!r}"
    if "nvidia" not in backends:
        return f"this triton build has no NVIDIA backend (backends: {sorted(backends)})"
    return None


def test_trt_entry_compiles_for_hopper_without_spills():
    """The entry TensorRT embeds, compiled ahead of time for sm_90 on this machine (no GPU
    needed: triton.compile with an explicit target, the wheel's ptxas)."""
    if (why := _no_cuda_backend_reason()) is not None:
        pytest.skip(why)
    from bitdance_rt.attention.aot import TRT_PARAMS, TRT_SHARED_LIMIT, compile_trt_entry

    info = compile_trt_entry("bf16", head_dim=128, n_q_heads=40, n_kv_heads=8, t_hint=64)
    assert info["name"] == "_kv_attn_kernel_trt"
    assert re.search(r"^\.target\s+sm_90a?\b", info["ptx"], re.M), info["ptx"][:400]
    # TensorRT passes inputs (6), extra int32 args (T, S_max), outputs (1), in that order, and
    # nothing else: the entry declares exactly those (Triton's trailing scratch pointers are
    # removed) and still assembles.
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", info["ptx"], re.S).group(1)
    kinds = re.findall(r"\.param\s+\.(u64|u32)", entry)
    assert kinds == ["u64"] * 6 + ["u32"] * 2 + ["u64"]
    assert info["n_params"] == TRT_PARAMS == 9
    # triton.compile has just run this wheel's ptxas to make the cubin, so the ptxas -v run on
    # the stripped PTX must have happened too: its figures are required, not optional.
    assert info.get("ptxas_ok") is True, info.get("ptxas_log", "no ptxas run")[-2000:]
    assert info["n_spills"] == 0 and info["stack_bytes"] == 0, info["ptxas_log"][-2000:]
    assert 0 < info["n_regs"] <= 255
    # within the dynamic shared memory a kernel gets without opting in
    assert 0 < info["shared"] <= TRT_SHARED_LIMIT == 48 * 1024


def test_scratch_parameters_are_only_stripped_when_unused():
    from bitdance_rt.attention.aot import strip_unused_params

    ptx = (".visible .entry k(\n .param .u64 k_param_0,\n .param .u32 k_param_1,\n"
           " .param .u64 k_param_2\n)\n{\n ld.param.u64 %rd1, [k_param_0];\n ret;\n}\n")
    out = strip_unused_params(ptx, "k", 1)
    assert "k_param_1" not in out and "k_param_2" not in out and "[k_param_0]" in out
    used = ptx.replace("ret;", "ld.param.u64 %rd2, [k_param_2];\n ret;")
    with pytest.raises(RuntimeError, match="k_param_2"):
        strip_unused_params(used, "k", 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_trt_entry_matches_reference(seed):
    """Run the TensorRT-convention entry (contiguous tensors, strides from dims) against the
    PyTorch reference: under the CPU interpreter without CUDA (conftest.py sets
    TRITON_INTERPRET=1 before anything imports the kernels), on the GPU with it."""
    pytest.importorskip("triton")
    from bitdance_rt.attention import triton_attention as ta
    from bitdance_rt.attention.plain import kv_attention_ref

    if ta._interpreting():
        dev = "cpu"
    else:
        assert torch.cuda.is_available(), (
            "the Triton kernels were jitted for a GPU but this machine has no CUDA device: "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} when they were imported")
        dev = "cuda"
    import triton

    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, D, S = 2, 4, 2, 4, 32, 24
    q = torch.randn(B, Hq, T, D, generator=gen)
    kn, vn = torch.randn(B, Hkv, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    kc, vc = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    lens = torch.randint(0, S - T + 1, (B,), generator=gen, dtype=torch.int32)
    lens[0] = 0  # an empty cache among them
    # Slots past cache_lens are poisoned: the kernel must not read them, nor write the cache.
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    q, kn, vn, kc, vc, lens = (t.to(dev) for t in (q, kn, vn, kc, vc, lens))
    kc_before, vc_before = kc.clone(), vc.clone()
    for causal in (False, True):
        out = torch.full_like(q, float("nan"))
        kc2, vc2 = kc.clone(), vc.clone()
        ta._kv_attn_kernel_trt[(triton.cdiv(2 * T, 16), B * Hkv)](
            q, kn, vn, kc, vc, lens, T, S, out,
            N_Q_HEADS=Hq, N_KV_HEADS=Hkv, QK_SCALE=D ** -0.5 / 0.6931471805599453, GROUP=2,
            HEAD_DIM=D, BLOCK_D=32, BLOCK_M=16, BLOCK_N=16, CAUSAL=causal, DOT_PRECISION="ieee")
        ref = kv_attention_ref(q, kn, vn, kc2, vc2, lens, "causal" if causal else "block")
        why = f"seed {seed}, lens {lens.tolist()}, causal={causal}, on {dev}"
        assert torch.isfinite(out).all(), f"{why}: read a poisoned slot or left output unwritten"
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{why}: {m}")
        torch.testing.assert_close(kc, kc_before, equal_nan=True, rtol=0, atol=0,
                                   msg=lambda m: f"{why}: the kernel wrote the cache: {m}")
        torch.testing.assert_close(vc, vc_before, equal_nan=True, rtol=0, atol=0,
                                   msg=lambda m: f"{why}: the kernel wrote the cache: {m}")


def test_plugin_annotations_are_classes():
    """tensorrt.plugin checks the decorated functions' annotations with issubclass: the module
    must not postpone them (``from __future__ import annotations`` makes them strings)."""
    from bitdance_rt.attention import tensorrt_plugin

    assert "annotations" not in vars(tensorrt_plugin)


@pytest.mark.trt
@pytest.mark.skipif(not TRT_OK, reason=TRT_REASON or "tensorrt available")
def test_plugin_registers():
    assert register_plugin() == PLUGIN_ID
    assert register_plugin() == PLUGIN_ID  # idempotent


def test_register_without_tensorrt_says_how_to_install(monkeypatch):
    """Where tensorrt is not importable (made so here, where it is: ``None`` in sys.modules
    makes ``import tensorrt`` raise ImportError), registering says what to install and what
    to use instead, and registers nothing."""
    for name in ("tensorrt", "tensorrt.plugin"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(tensorrt_plugin._state, "registered", False)
    ok, reason = tensorrt_status()
    assert not ok and "tensorrt is not importable" in reason
    with pytest.raises(ImportError, match=r"pip install tensorrt.*--attention native"):
        register_plugin()
    assert tensorrt_plugin._state["registered"] is False
