"""QuantizeLinear / DequantizeLinear nodes for the quantized layers of an exported graph.

A quantized checkpoint's :class:`~bitdance_rt.models.quant.QuantLinear` layers compute with
two custom ops; an export writes each as the ONNX pattern TensorRT fuses into an FP8 or INT8
GEMM (and ONNX Runtime runs on the CPU)::

    bitdance::dequantize(codes, scale)     ->  DequantizeLinear(codes, scale, axis=0)
    bitdance::fake_quantize(x, scale, k)   ->  QuantizeLinear(x, scale, zero) ->
                                               DequantizeLinear(., scale, zero)

The weight codes (E4M3 or int8) are initializers, so a weight DequantizeLinear feeds the MatMul
(through a Transpose) directly: TensorRT's "Q/DQ on weights" pattern. The nodes are opset 19's
(E4M3 needs it): :func:`required_opset`.
"""

from __future__ import annotations

import torch

from ..models.quant import KIND, QuantLinear

QDQ_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 types and `saturate`


def quantized_formats(model) -> set[str]:
    """What the quantized layers of a model quantize: "fp8" / "int8" for weights, and
    "fp8-activations" / "int8-activations" where activations are quantized too (empty: a
    float model). Recorded in the manifest (ONNX Runtime needs basic optimizations for E4M3
    activations, and ``check`` one quantization step of tolerance for any)."""
    parts = [p for p in (getattr(model, "llm", None), getattr(model, "head", None),
                         getattr(model, "transformer", None)) if p is not None]
    out = set()
    for p in parts:
        for m in p.modules():
            if isinstance(m, QuantLinear):
                out.add(m.fmt)
                if m.activation:
                    out.add(f"{m.fmt}-activations")
    return out


def required_opset(model, opset: int) -> int:
    """The opset an export of ``model`` needs, at least ``opset``: 19 for quantized layers
    (the nodes are written with opset 19's signature, which E4M3 needs)."""
    return max(opset, QDQ_OPSET) if quantized_formats(model) else opset


def onnx_translation_table() -> dict:
    """``custom_translation_table`` entries of the two quantization ops."""
    import numpy as np
    from onnx import TensorProto, helper
    from onnxscript import opset19 as op

    def zero(kind: int):
        if kind == KIND["int8"]:
            return op.Constant(value=helper.make_tensor("zero", TensorProto.INT8, [], [0]))
        return op.Constant(value=helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [],
                                                    np.zeros(1, np.float32), raw=False))

    def dequantize(q, scale):
        return op.DequantizeLinear(q, scale, axis=0)

    def fake_quantize(x, scale, kind: int):
        z = zero(kind)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, z), scale, z)

    return {torch.ops.bitdance.dequantize.default: dequantize,
            torch.ops.bitdance.fake_quantize.default: fake_quantize}
