"""Every dtype name the toolkit accepts, and every other library's code for the same dtype.

One table, so that ``--dtype``, manifests, ONNX Runtime bindings, ONNX element types and Triton
signatures all agree. Short names (``fp32``, ``fp16``, ``bf16``) are canonical; the long torch
names are accepted everywhere too.
"""

from __future__ import annotations

import torch

from .errors import BitDanceError

# name -> torch dtype (short and long spellings)
TORCH = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
# torch dtype -> canonical short name (manifests, Triton)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# torch dtype -> the long name (``--dtype`` help, PNG metadata)
LONG = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# torch dtype -> ONNX TensorProto element type (numbers as in onnx.TensorProto)
ONNX = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7,
        torch.bool: 9, torch.float16: 10, torch.bfloat16: 16, torch.float8_e4m3fn: 17}
ONNX_TO_TORCH = {v: k for k, v in ONNX.items()}


def parse(name: str, what: str = "--dtype") -> torch.dtype:
    """The torch dtype of a name; a one-line error listing the choices otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return TORCH[str(name).lower()]
    except KeyError:
        raise BitDanceError(f"{what} must be one of fp32, fp16, bf16 (or float32, float16, "
                            f"bfloat16); got {name!r}") from None


def short_name(dtype: torch.dtype) -> str:
    if dtype not in SHORT:
        raise BitDanceError(f"dtype {dtype} is not supported; use fp32, fp16 or bf16")
    return SHORT[dtype]


def ort_element_type(dtype: torch.dtype):
    """What ONNX Runtime's ``IOBinding.bind_*`` takes for a torch dtype: a numpy type, or the
    ONNX element type number where numpy has none (bfloat16)."""
    import numpy as np

    numpy_types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                   torch.int32: np.int32, torch.uint8: np.uint8, torch.int8: np.int8,
                   torch.bool: np.bool_}
    return numpy_types.get(dtype, ONNX.get(dtype))
