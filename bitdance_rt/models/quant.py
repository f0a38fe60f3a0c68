"""Quantized linear layers: E4M3 or INT8 weights with per-output-channel scales, optionally
static per-tensor activation quantization and a SmoothQuant input scale.

A :class:`QuantLinear` replaces an ``nn.Linear`` of the same shape. Its state dict keeps the
Linear's keys and adds the scales beside the weight (the names vLLM and ModelOpt use)::

    <name>.weight            [N, K]  float8_e4m3fn or int8 (the stored codes)
    <name>.weight_scale      [N]     per output channel: W ~= weight * weight_scale[:, None]
    <name>.bias              [N]     when the Linear has one (model dtype)
    <name>.input_scale       []      static activations only: x ~= q(x / input_scale) * input_scale
    <name>.pre_quant_scale   [K]     SmoothQuant only: the input is multiplied by it first

The two quantization steps are custom ops (``bitdance::dequantize``,
``bitdance::fake_quantize``) so that an exporter can write each as one ONNX
DequantizeLinear / QuantizeLinear+DequantizeLinear pair (:mod:`bitdance_rt.export.qdq`), which
TensorRT fuses into FP8 / INT8 GEMMs. In PyTorch a layer computes in the model dtype with the
dequantized weight (CPU, and CUDA without FP8), or on CUDA GPUs with FP8 row-wise scaled matmuls
(Hopper and newer) through ``torch._scaled_mm``: the activation is quantized to E4M3 with the
static scale (recipe ``fp8``) or, for weight-only E4M3 (``fp8-weight``), per token on the fly,
since no kernel multiplies bf16 activations by E4M3 weights.

A quantized checkpoint names its quantized modules in ``quantization.json`` (:func:`read_layout`);
:func:`swap_modules` puts QuantLinear layers in their place before strict loading.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .linear import linear

LAYOUT_FILE = "quantization.json"
LAYOUT_FORMAT = 1
# stored weight formats: name -> (torch dtype, largest code magnitude)
FORMATS = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}
FORMAT_OF = {dt: name for name, (dt, _) in FORMATS.items()}
# kind numbers of the fake_quantize op (an int attribute, as ONNX/TensorRT want)
KIND = {"fp8": 0, "int8": 1}


# ----------------------------------------------------------------------------------------------
# The two quantization ops


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale[:, None]


@torch.library.custom_op("bitdance::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (E4M3 or int8) times per-row scales ``[N]`` -> ``[N, K]`` in the scales'
    dtype (ONNX DequantizeLinear, axis 0)."""
    return _dequantize(q, scale)


@dequantize.register_fake
def _dequantize_fake(q, scale):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """``x / scale`` rounded to the codes of ``kind`` as ONNX QuantizeLinear does: int8 rounds
    half to even and saturates at [-128, 127]; E4M3 rounds to nearest even and saturates at
    +-448. Computed in float32."""
    y = x.float() / scale.float()
    if kind == "int8":
        return torch.clamp(torch.round(y), -128, 127).to(torch.int8)
    return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, kind: int) -> torch.Tensor:
    codes = quantize_codes(x, scale, "fp8" if kind == KIND["fp8"] else "int8")
    return (codes.float() * scale.float()).to(x.dtype)


@torch.library.custom_op("bitdance::fake_quantize", mutates_args=())
def fake_quantize(x: torch.Tensor, scale: torch.Tensor, kind: int) -> torch.Tensor:
    """Per-tensor quantize then dequantize (an ONNX QuantizeLinear/DequantizeLinear pair):
    ``kind`` 0 = E4M3, 1 = int8; ``scale`` a 0-d tensor."""
    return _fake_quantize(x, scale, kind)


@fake_quantize.register_fake
def _fake_quantize_fake(x, scale, kind):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------
# CUDA FP8 GEMMs


@functools.lru_cache(maxsize=None)
def scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs on ``device`` (a tiny probe, once
    per device: the kernel needs FP8 tensor cores and this build's support for row-wise
    scaling)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        a = torch.zeros(16, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.zeros(16, 32, device=device).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _fp8_matmul(x2: torch.Tensor, mod: "QuantLinear") -> torch.Tensor:
    """``x2 [M, K]`` (model dtype) times the E4M3 weight on FP8 tensor cores, row-wise scales:
    the static input scale when the layer has one, else each row's own (dynamic)."""
    if mod.input_scale is not None:
        scale_a = mod.input_scale.float().expand(x2.shape[0], 1).contiguous()
    else:
        scale_a = (x2.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp_min(1e-12)
    xq = (x2.float() / scale_a).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, mod.weight.t(), scale_a=scale_a,
                            scale_b=mod.weight_scale.float().view(1, -1), out_dtype=x2.dtype)


def fake_quantize_rows_fp8(x: torch.Tensor) -> torch.Tensor:
    """What :func:`_fp8_matmul` does to weight-only layers' activations (per-row E4M3), in the
    model dtype: a CPU emulation of the FP8 GPU path for accuracy measurements."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 448.0).clamp_min(1e-12)
    return ((x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
            * scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The module


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W stored as E4M3 or int8 codes and per-output-channel scales (see
    the module docstring). ``fmt`` "fp8" or "int8"; ``activation`` None (weight-only) or
    "static" (a calibrated per-tensor scale); ``smooth`` adds a per-input-channel
    ``pre_quant_scale`` (SmoothQuant)."""

    # Emulate, on any device, the per-token E4M3 activations that FP8 GPUs use for weight-only
    # E4M3 layers (accuracy measurements of the GPU path on a CPU); off by default.
    emulate_fp8_gemm = False
    # Which path the forward calls of E4M3 layers took, counted in Python: "scaled_mm" (FP8
    # tensor cores through ``torch._scaled_mm``) or "dequantize" (the weight dequantized to the
    # model dtype). A CUDA graph's replays run no Python, so a captured layer counts its warm-up
    # and capture calls only; traced calls (torch.compile, export) are not counted.
    fp8_paths = {"scaled_mm": 0, "dequantize": 0}

    @classmethod
    def reset_fp8_paths(cls) -> None:
        cls.fp8_paths = {"scaled_mm": 0, "dequantize": 0}

    @classmethod
    def fp8_path_record(cls) -> dict:
        """The counts and, in one word, which path ran: "scaled_mm", "dequantize", "both" or
        "none" (no E4M3 layer was called)."""
        n = dict(cls.fp8_paths)
        ran = [k for k in ("scaled_mm", "dequantize") if n[k]]
        return {**n, "path": ran[0] if len(ran) == 1 else ("both" if ran else "none")}

    @classmethod
    def _count(cls, path: str) -> None:
        if not torch.compiler.is_compiling():
            cls.fp8_paths[path] += 1

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str,
                 activation: str | None = None, smooth: bool = False, dtype=None, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; one of {sorted(FORMATS)}")
        if activation not in (None, "static"):
            raise ValueError(f"activation must be None or 'static', got {activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.activation, self.smooth = fmt, activation, smooth
        kw = {"device": device}
        fdt = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features,
                                               dtype=FORMATS[fmt][0], **kw), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=fdt, **kw), requires_grad=False)
                     if bias else None)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=fdt, **kw))
        self.register_buffer("input_scale", torch.empty((), dtype=fdt, **kw)
                             if activation == "static" else None)
        self.register_buffer("pre_quant_scale", torch.empty(in_features, dtype=fdt, **kw)
                             if smooth else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.fmt}, activation={self.activation}, smooth={self.smooth}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if (self.fmt == "fp8" and x.is_cuda and x.dtype == torch.bfloat16
                and scaled_mm_available(x.device)):  # row-wise scaling gives bf16 only
            QuantLinear._count("scaled_mm")
            y = _fp8_matmul(x.reshape(-1, self.in_features), self)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.fmt == "fp8":
            QuantLinear._count("dequantize")
        if self.input_scale is not None:
            x = fake_quantize(x, self.input_scale, KIND[self.fmt])
        elif self.fmt == "fp8" and QuantLinear.emulate_fp8_gemm:
            x = fake_quantize_rows_fp8(x)
        return linear(x, dequantize(self.weight, self.weight_scale), self.bias)


# ----------------------------------------------------------------------------------------------
# Quantized checkpoints: which modules, and swapping them in before loading


def read_layout(ckpt_dir) -> dict | None:
    """The quantization layout of a checkpoint directory (``quantization.json``), or None for a
    float checkpoint. ``layout["modules"][component][name] = {"format", "activation",
    "smooth"}``, components "language model" and "diffusion head" (the names
    :func:`~bitdance_rt.checkpoint.load_checkpoint` uses)."""
    from ..files import PLAIN_NAME, MapOf, Nullable, Opt, check_schema, read_json

    path = Path(ckpt_dir) / LAYOUT_FILE
    if not path.is_file():
        return None
    fix = "re-run `bitdance-export quantize`"
    layout = read_json(path, "quantization layout", error=CheckpointError, fix=fix)
    if layout.get("format") != LAYOUT_FORMAT or not isinstance(layout.get("modules"), dict):
        raise CheckpointError(f"{path} is not a format-{LAYOUT_FORMAT} quantization layout; "
                              "re-run `bitdance-export quantize` with this version")
    entry = {"format": str, "activation": Opt(Nullable(str)), "smooth": Opt(bool)}
    check_schema(layout, {"modules": MapOf(MapOf(entry)), "recipe": Opt(str),
                          "files": Opt([PLAIN_NAME]),
                          "calibration": Opt(Nullable(MapOf(object)))},
                 f"quantization layout {path}", error=CheckpointError, fix=fix)
    return layout


def swap_modules(module: nn.Module, layout: dict | None, component: str) -> nn.Module:
    """Replace the Linear layers that ``layout`` quantizes in ``component`` by QuantLinear
    layers of the same shape (on the Linear's device: the meta device before loading)."""
    if layout is None:
        return module
    for name, how in layout["modules"].get(component, {}).items():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = module.get_submodule(parent_name) if parent_name else module
            old = getattr(parent, leaf)
        except AttributeError:
            if _beyond_layers(module, name):  # a truncated load (--num-layers)
                continue
            old = None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{LAYOUT_FILE} quantizes {name!r} of the {component}, which "
                                  "is not a Linear layer of this model; re-run `bitdance-export "
                                  "quantize` from the float checkpoint")
        try:
            new = QuantLinear(old.in_features, old.out_features, old.bias is not None,
                              how["format"], how.get("activation"), bool(how.get("smooth")),
                              dtype=old.weight.dtype, device=old.weight.device)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{LAYOUT_FILE}: module {name!r} has a bad entry ({e})") from None
        setattr(parent, leaf, new)
    return module


def _beyond_layers(module: nn.Module, name: str) -> bool:
    """``name`` lies in an LLM layer that this (truncated) model does not have."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    layers = getattr(getattr(module, "model", None), "layers", None)
    return bool(m) and layers is not None and int(m.group(1)) >= len(layers)


def stored_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    """State-dict keys whose dtype is fixed by the format (the codes of every QuantLinear):
    a loader keeps them as stored instead of converting them to the model dtype."""
    return {f"{name}.weight" if name else "weight": m.weight.dtype
            for name, m in module.named_modules() if isinstance(m, QuantLinear)}
