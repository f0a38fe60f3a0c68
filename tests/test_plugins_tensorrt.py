"""The TensorRT plugin: its AOT kernel entry compiles for Hopper here; the plugin itself is
registered and built into an engine only where TensorRT is importable."""

import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # run Triton kernels on the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitdance_rt.plugins.tensorrt_plugin import PLUGIN_ID, register_plugin, tensorrt_status

TRT_OK, TRT_REASON = tensorrt_status()


def test_trt_entry_compiles_for_hopper_without_spills():
    pytest.importorskip("triton")
    from bitdance_rt.plugins.aot import compile_trt_entry

    try:
        info = compile_trt_entry("bf16", head_dim=128, n_q_heads=40, n_kv_heads=8, t_hint=64)
    except Exception as e:  # this triton build may lack the CUDA backend
        pytest.skip(f"triton cannot compile for sm_90 here: {e}")
    assert info["name"] == "_kv_attn_kernel_trt"
    # TensorRT passes inputs (6), extra int32 args (T, S_max), outputs (1), in that order, and
    # nothing else: the entry declares exactly those (Triton's trailing scratch pointers are
    # removed) and still assembles.
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", info["ptx"], re.S).group(1)
    kinds = re.findall(r"\.param\s+\.(u64|u32)", entry)
    assert kinds == ["u64"] * 6 + ["u32"] * 2 + ["u64"]
    if "ptxas_ok" in info:
        assert info["ptxas_ok"], info["ptxas_log"][-2000:]
        assert info["n_spills"] == 0
    # within the dynamic shared memory a kernel gets without opting in
    assert info["shared"] <= 48 * 1024


def test_scratch_parameters_are_only_stripped_when_unused():
    from bitdance_rt.plugins.aot import strip_unused_params

    ptx = (".visible .entry k(\n .param .u64 k_param_0,\n .param .u32 k_param_1,\n"
           " .param .u64 k_param_2\n)\n{\n ld.param.u64 %rd1, [k_param_0];\n ret;\n}\n")
    out = strip_unused_params(ptx, "k", 1)
    assert "k_param_1" not in out and "k_param_2" not in out and "[k_param_0]" in out
    used = ptx.replace("ret;", "ld.param.u64 %rd2, [k_param_2];\n ret;")
    with pytest.raises(RuntimeError, match="k_param_2"):
        strip_unused_params(used, "k", 1)


def test_trt_entry_matches_reference_in_interpreter():
    """Run the TensorRT-convention entry (contiguous tensors, strides from dims) under the CPU
    interpreter against the PyTorch reference."""
    pytest.importorskip("triton")
    from bitdance_rt.plugins import triton_attention as ta
    from bitdance_rt.plugins.reference import kv_attention_ref

    if not ta._interpreting():
        pytest.skip("triton kernels were compiled for a GPU in this process")
    import triton

    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, S = 2, 4, 2, 4, 32, 24
    q = torch.randn(B, Hq, T, D, generator=gen)
    kn, vn = torch.randn(B, Hkv, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    kc, vc = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    lens = torch.tensor([5, 11], dtype=torch.int32)
    # Slots past cache_lens are poisoned: the kernel must not read them, nor write the cache.
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    kc_before = kc.clone()
    for causal in (False, True):
        out = torch.full_like(q, float("nan"))
        kc2, vc2 = kc.clone(), vc.clone()
        ta._kv_attn_kernel_trt[(triton.cdiv(2 * T, 16), B * Hkv)](
            q, kn, vn, kc, vc, lens, T, S, out,
            N_Q_HEADS=Hq, N_KV_HEADS=Hkv, QK_SCALE=D ** -0.5 / 0.6931471805599453, GROUP=2,
            HEAD_DIM=D, BLOCK_D=32, BLOCK_M=16, BLOCK_N=16, CAUSAL=causal, DOT_PRECISION="ieee")
        ref = kv_attention_ref(q, kn, vn, kc2, vc2, lens, "causal" if causal else "block")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc, kc_before, equal_nan=True)


def test_plugin_annotations_are_classes():
    """tensorrt.plugin checks the decorated functions' annotations with issubclass: the module
    must not postpone them (``from __future__ import annotations`` makes them strings)."""
    from bitdance_rt.plugins import tensorrt_plugin

    assert "annotations" not in vars(tensorrt_plugin)


@pytest.mark.trt
@pytest.mark.skipif(not TRT_OK, reason=TRT_REASON or "tensorrt available")
def test_plugin_registers():
    assert register_plugin() == PLUGIN_ID
    assert register_plugin() == PLUGIN_ID  # idempotent


def test_register_without_tensorrt_says_how_to_install():
    if TRT_OK:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(ImportError, match=r"pip install tensorrt.*--attention native"):
        register_plugin()
