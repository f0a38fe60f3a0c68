"""The custom ONNX node for the block-causal KV attention (``--attention plugin`` exports).

Node ``kv_attend`` in domain ``bitdance`` (opset version 1), the node TensorRT maps to the
``bitdance::kv_attend`` plugin (``tensorrt_plugin.py``; TensorRT's ONNX parser looks plugins
up by op type, ``plugin_namespace`` and ``plugin_version``):

    inputs      q [S, Hq, T, D], k_new [S, Hkv, T, D], v_new [S, Hkv, T, D],
                k_cache [S, Hkv, S_max, D], v_cache [S, Hkv, S_max, D], cache_lens [S] int32
    attributes  mask_mode: int   0 = block (every new token sees the whole block),
                                 1 = causal (new token i sees new tokens <= i)
                scale: float     softmax scale (D ** -0.5 for Qwen3)
                plugin_namespace: "bitdance", plugin_version: "1"
    output      out [S, Hq, T, D]: attention over cache slots j < cache_lens[s] and the T new
                tokens (GQA: query head h uses kv head h // (Hq // Hkv)); the cache is only read.

In PyTorch the node is the op ``torch.ops.bitdance.kv_attend_node`` (same contract, plain
PyTorch math); :func:`onnx_translation_table` tells ``torch.onnx.export(dynamo=True)`` to emit
the node for it. ONNX Runtime has no kernel for it: ORT exports use ``--attention standard``.
"""

from __future__ import annotations

import torch

from .plain import attend, mode_to_int

DOMAIN = "bitdance"
OP_TYPE = "kv_attend"
OPSET_VERSION = 1


@torch.library.custom_op("bitdance::kv_attend_node", mutates_args=())
def kv_attend_node(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                      mask_mode: int, scale: float) -> torch.Tensor:
    return attend(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale)


@kv_attend_node.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode, scale):
    return torch.empty_like(q)


def plugin_kv_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, mode):
    """The per-layer attention of a ``--attention plugin`` export (same signature as the
    exporter's standard attention; an empty cache becomes a zero-slot cache)."""
    s, hkv, _, d = k_new.shape
    if k_cache is None:
        k_cache = k_new.new_zeros((s, hkv, 0, d))
        v_cache = v_new.new_zeros((s, hkv, 0, d))
        cache_lens = torch.zeros((s,), dtype=torch.int32, device=q.device)
    return torch.ops.bitdance.kv_attend_node(
        q, k_new, v_new, k_cache, v_cache, cache_lens.to(torch.int32), mode_to_int(mode),
        float(d) ** -0.5)


def register_onnx_schema() -> None:
    """Register the node's schema with ``onnx.defs`` (idempotent), so that onnx.checker and
    onnxscript know its inputs, outputs and attributes."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema(OP_TYPE, OPSET_VERSION, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    schema = OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="Block-causal KV-cache attention of T new tokens (see bitdance_rt/attention/onnx_node.py).",
        inputs=[param("q", "T"), param("k_new", "T"), param("v_new", "T"),
                param("k_cache", "T"), param("v_cache", "T"), param("cache_lens", "I")],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "activations"), ("I", ["tensor(int32)"], "cache lengths")],
        attributes=[
            attr("mask_mode", OpSchema.AttrType.INT, "0 block, 1 causal"),
            attr("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
            attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
            attr("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
        ])
    onnx.defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: emits the node."""
    import onnxscript

    register_onnx_schema()
    bitdance = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)

    def translate(q, k_new, v_new, k_cache, v_cache, cache_lens, mask_mode: int, scale: float):
        return bitdance.kv_attend(q, k_new, v_new, k_cache, v_cache, cache_lens,
                                     mask_mode=mask_mode, scale=scale,
                                     plugin_namespace=DOMAIN, plugin_version="1")

    return {torch.ops.bitdance.kv_attend_node.default: translate}
