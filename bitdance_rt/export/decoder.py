"""The ``decoder`` graph: binary latents to a uint8 image, the conversion to uint8
(:func:`bitdance_rt.models.steps.to_uint8`) fused in.

Inputs
  latent  ``[B, 32, h, w]`` float32  +-1 tokens arranged as a latent (dynamic h and w)
  noise   ``[B, 32, h, w]`` float32  gan-decoder checkpoints only: the decoder's noise
Output
  image   ``[B, 16h, 16w, 3]`` uint8  ``trunc(clamp(127.5 img + 128, 0, 255))``, channels last

GroupNorm is exported as explicit arithmetic (:class:`PreciseGroupNorm`) instead of the
exporter's InstanceNormalization: ONNX Runtime's kernel loses precision when a group's mean is
large against its spread, which happens in this decoder (a tiny checkpoint's image came out
with only 96% of its pixels equal to PyTorch's; 99.9% with this version, whose statistics stay
within about 1e-6 of float64 where PyTorch's own float32 GroupNorm errs more).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ..models.steps import to_uint8
from .common import GraphDef, dim

NAME = "decoder"


class PreciseGroupNorm(nn.Module):
    """``nn.GroupNorm`` (same weights, same result) with statistics that survive a large mean:
    subtract the mean, then subtract the mean of the residual (which corrects the first mean's
    rounding), then take the variance of what is left. Float32 inside."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = gn.num_groups, gn.eps
        self.weight, self.bias = gn.weight, gn.bias

    @staticmethod
    def _mean(t):
        # the mean over (channels of the group, rows, columns) as a mean of means: each
        # reduction is short, so float32 sums stay accurate on large images (one reduction over
        # a whole 256x896 group already errs 10x more than PyTorch's)
        return t.mean(-1, keepdim=True).mean(-2, keepdim=True).mean(-3, keepdim=True)

    def forward(self, x):
        b, c, h, w = x.shape
        xg = x.float().reshape(b, self.num_groups, c // self.num_groups, h, w)
        d = xg - self._mean(xg)
        d = d - self._mean(d)
        var = self._mean(d * d)
        y = (d * torch.rsqrt(var + self.eps)).reshape(x.shape).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


def with_precise_group_norm(decoder: nn.Module) -> nn.Module:
    """A structural copy of ``decoder`` sharing its weights, GroupNorms replaced."""
    shared = {id(t): t for t in itertools.chain(decoder.parameters(), decoder.buffers())}
    clone = copy.deepcopy(decoder, shared)
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, PreciseGroupNorm(child))
    return clone


class DecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder = with_precise_group_norm(model.ae.decoder)
        self.dtype = model.dtype

    def forward(self, latent, noise=None):
        if noise is not None:
            noise = noise.to(self.dtype)
        return to_uint8(self.decoder(latent.to(self.dtype), noise), device=None)


@torch.no_grad()
def pytorch_outputs(model, feeds: dict) -> dict:
    """``model.ae.decode`` and the pipeline's uint8 conversion (PyTorch)."""
    noise = feeds.get("noise")
    img = model.ae.decode(feeds["latent"].to(model.dtype),
                          None if noise is None else noise.to(model.dtype))
    return {"image": to_uint8(img), "decoded": img.float()}


def random_inputs(model, gen: torch.Generator, batch: int, h: int, w: int) -> dict:
    z = model.spec.ae.z_channels
    feeds = {"latent": torch.randint(0, 2, (batch, z, h, w), generator=gen).float() * 2 - 1}
    if model.spec.ae.gan_decoder:
        feeds["noise"] = torch.randn(batch, z, h, w, generator=gen)
    return feeds


def graph_def(model) -> GraphDef:
    example = random_inputs(model, torch.Generator().manual_seed(0), 2, 3, 5)
    B, Hh, Ww = dim("batch"), dim("latent_h"), dim("latent_w")
    dynamic = {"latent": {0: B, 2: Hh, 3: Ww}}
    if "noise" in example:
        dynamic["noise"] = {0: B, 2: Hh, 3: Ww}
    return GraphDef(NAME, DecoderGraph(model), example, dynamic, ["image"])
