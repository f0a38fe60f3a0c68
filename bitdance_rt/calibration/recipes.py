"""The quantization recipes and the one table of which layers they quantize.

Every recipe quantizes the same layers (:data:`LAYER_RULES`); they differ in the weight format
and in what happens to activations:

=============  ========  ======================================  ===========================
recipe         weights   activations                             needs ``calibrate``
=============  ========  ======================================  ===========================
fp8-weight     E4M3      model dtype (on FP8 GPUs: E4M3 per      no
                         token, computed on the fly)
fp8            E4M3      E4M3, one static scale per tensor       yes (absolute maxima)
int8-weight    INT8      model dtype                             no
int8-sq        INT8      INT8, static per tensor, after a        yes (channel maxima)
                         SmoothQuant per-channel scale (alpha)
=============  ========  ======================================  ===========================

Weights have one scale per output channel (symmetric, ``amax / 448`` or ``amax / 127``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import BitDanceError

LLM, HEAD, PROJECTOR, DECODER = "language model", "diffusion head", "projector", "decoder"
TRANSFORMER = "class-conditional transformer"  # the ImageNet family's AR model (its head: HEAD)
COMPONENTS = (LLM, HEAD, PROJECTOR, DECODER, TRANSFORMER)
# Submodules that are a component of their own: the ImageNet transformer holds its head as
# ``head`` (rules of HEAD, names relative to it).
OWN_COMPONENT = {TRANSFORMER: ("head.", HEAD)}


@dataclass(frozen=True)
class Recipe:
    name: str
    fmt: str                  # stored weight format: "fp8" (E4M3) or "int8"
    activation: str | None    # None (weight-only) or "static" (calibrated per-tensor scale)
    smooth: bool = False      # SmoothQuant per-input-channel scale
    alpha: float = 0.5        # SmoothQuant migration strength
    summary: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.activation is not None or self.smooth


RECIPES = {
    "fp8-weight": Recipe("fp8-weight", "fp8", None,
                         summary="E4M3 weights, per-output-channel scales; activations stay in "
                         "the model dtype (FP8 GPUs quantize them per token on the fly)"),
    "fp8": Recipe("fp8", "fp8", "static",
                  summary="E4M3 weights (per-output-channel scales) and E4M3 activations "
                  "with a calibrated static per-tensor scale"),
    "int8-weight": Recipe("int8-weight", "int8", None,
                          summary="INT8 weights, per-output-channel scales; activations stay "
                          "in the model dtype"),
    "int8-sq": Recipe("int8-sq", "int8", "static", smooth=True,
                      summary="SmoothQuant W8A8: INT8 weights and INT8 static per-tensor "
                      "activations after a per-channel smoothing scale (alpha 0.5), for GPUs "
                      "without FP8"),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise BitDanceError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


# (component, pattern over the module name, quantized?, why). The first match decides; every
# Linear layer of the model must match one (tests check that the table covers the model).
LAYER_RULES = (
    (LLM, r"model\.layers\.\d+\.self_attn\.[qkvo]_proj", True,
     "attention projections: 19% of the LLM layers' bytes, read every block step"),
    (LLM, r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", True,
     "MLP: 81% of the LLM layers' bytes, read every block step"),
    (LLM, r"lm_head", False, "text output only; never loaded for images"),
    (HEAD, r"net\.res_blocks\.\d+\.(attn\.wqkv|attn\.wo|w1|w2|mlp\.[02])", True,
     "the head's blocks: 76% of its bytes, read at every one of the N + 1 steps"),
    (HEAD, r"net\.ada_ln_blocks\.\d+", True,
     "shared adaLN: 18% of the head's bytes, once per block (all steps batched)"),
    (HEAD, r"net\.cond_embed", True, "condition embedding: 1.5% of the head, once per block"),
    (HEAD, r"net\.final_layer\.ada_ln_modulation", True,
     "final adaLN: 3% of the head, once per block"),
    (HEAD, r"net\.time_embed\.mlp\.[02]", False,
     "time embedding: sinusoid features of 1000 t, 1.6% of the head, once per block"),
    (HEAD, r"net\.input_proj", False, "input projection of the 32 noisy bits (K = 32: tiny)"),
    (HEAD, r"net\.final_layer\.linear", False,
     "output layer: its 32 outputs are the x_0 prediction itself (C x 32: tiny)"),
    (PROJECTOR, r"fc[12]", False, "0.2% of the LLM's bytes; its input is +-1 tokens"),
    (TRANSFORMER, r"layers\.\d+\.attention\.(wqkv|wo)", True,
     "ImageNet family: attention projections, read every AR step"),
    (TRANSFORMER, r"layers\.\d+\.feed_forward\.(w1|w2|w3)", True,
     "ImageNet family: MLP, most of the transformer's bytes, read every AR step"),
    (TRANSFORMER, r"proj_in\.(w1|w2)", False,
     "ImageNet family: token input projection, its input is +-1 tokens (K = 32: tiny)"),
)
# Never quantized: embeddings (a lookup), every norm, the autoencoder's decoder (convolutions,
# 0.5 GB read once per image) and everything that is not a Linear layer.


@dataclass(frozen=True)
class LayerChoice:
    component: str
    name: str
    quantized: bool
    reason: str


def choose(component: str, name: str) -> LayerChoice:
    for comp, pattern, quantized, reason in LAYER_RULES:
        if comp == component and re.fullmatch(pattern, name):
            return LayerChoice(component, name, quantized, reason)
    raise BitDanceError(f"no quantization rule covers the Linear layer {name!r} of the "
                        f"{component}; add one to LAYER_RULES")


def linear_choices(component: str, module: nn.Module) -> list[LayerChoice]:
    """The decision for every Linear layer of ``module`` (one component; a submodule that is a
    component of its own, :data:`OWN_COMPONENT`, is left to its rules)."""
    skip = OWN_COMPONENT.get(component, (None,))[0]
    return [choose(component, name) for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not (skip and name.startswith(skip))]


def quantized_names(component: str, module: nn.Module) -> list[str]:
    return [c.name for c in linear_choices(component, module) if c.quantized]


def rules_table() -> str:
    """The layer table as Markdown (docs)."""
    rows = ["| component | layers | quantized | why |", "|---|---|---|---|"]
    for comp, pattern, quantized, reason in LAYER_RULES:
        rows.append(f"| {comp} | `{pattern}` | {'yes' if quantized else 'no'} | {reason} |")
    return "\n".join(rows)
