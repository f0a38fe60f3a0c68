"""The diffusion heads of the ImageNet family, with the released keys (``head.net.*``).

``net(x_t [R, p, 32], t [R], c [R, p, dim]) -> x_0 [R, p, 32]`` (x-prediction, no output
squashing). ``y = silu(time_embed(t) + cond_embed(c))`` per token modulates every block
through shared adaLN layers (one per ``depth // adaln`` consecutive blocks) and the final
layer. One token per step (``parallel_num`` 1): MLP blocks, adaLN ``(scale, shift, gate)``.
Several: transformer blocks with full attention across the step's tokens (heads of 64
channels, biases), adaLN ``(scale1, shift1, gate1, scale2, shift2, gate2)``.

The network splits as the sampler uses it (the interface of
:class:`bitdance_rt.models.head.HeadNet`): :meth:`conditioning` and :meth:`modulation` do not
depend on x (a sampler computes them for all steps of an AR step at once), :meth:`denoise` does.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..models.head import TimestepEmbedder
from ..models.linear import Linear
from .spec import ATTENTION_HEAD_DIM, ImageNetSpec


def modulate(x, norm, scale, shift):
    return norm(x) * (1 + scale) + shift


def swiglu(block, h):
    a, b = block.w1(h).chunk(2, dim=-1)
    return block.w2(F.silu(a) * b)


class MLPBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.w1 = Linear(c, 2 * int(c * 1.5))
        self.w2 = Linear(int(c * 1.5), c)

    def forward(self, x, mod):
        scale, shift, gate = mod
        return x + swiglu(self, modulate(x, self.norm, scale, shift)) * gate


class StepAttention(nn.Module):
    """Full attention over the tokens of one step, fused q|k|v, heads of 64, with biases."""

    def __init__(self, c: int):
        super().__init__()
        self.n_head = c // ATTENTION_HEAD_DIM
        self.wqkv = Linear(c, 3 * c)
        self.wo = Linear(c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, ATTENTION_HEAD_DIM).transpose(1, 2)
                   for z in self.wqkv(x).chunk(3, dim=-1))
        scores = (q * ATTENTION_HEAD_DIM ** -0.5) @ k.transpose(-1, -2)
        out = F.softmax(scores, dim=-1) @ v
        return self.wo(out.transpose(1, 2).contiguous().view(b, t, c))


class AttentionBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.attn = StepAttention(c)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.w1 = Linear(c, 2 * int(c * 1.5))
        self.w2 = Linear(int(c * 1.5), c)

    def forward(self, x, mod):
        scale1, shift1, gate1, scale2, shift2, gate2 = mod
        x = x + self.attn(modulate(x, self.norm1, scale1, shift1)) * gate1
        return x + swiglu(self, modulate(x, self.norm2, scale2, shift2)) * gate2


class FinalLayer(nn.Module):
    def __init__(self, c: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = Linear(c, 2 * c)
        self.linear = Linear(c, out)


class HeadNet(nn.Module):
    def __init__(self, spec: ImageNetSpec):
        super().__init__()
        c, parallel = spec.head_dim, spec.parallel_num > 1
        self.time_embed = TimestepEmbedder(c)
        self.cond_embed = Linear(spec.dim, c)
        self.input_proj = Linear(spec.latent_dim, c)
        block = AttentionBlock if parallel else MLPBlock
        self.res_blocks = nn.ModuleList(block(c) for _ in range(spec.head_layers))
        self.chunks = 6 if parallel else 3
        self.ada_ln_blocks = nn.ModuleList(Linear(c, self.chunks * c)
                                           for _ in range(spec.head_adaln))
        self.switch_every = spec.head_layers // spec.head_adaln
        self.final_layer = FinalLayer(c, spec.latent_dim)

    def forward(self, x, t, c):
        return self.denoise(x, self.modulation(self.conditioning(t, c)))

    def conditioning(self, t, c):
        """``y [..., R, p, C]`` for times ``[..., R]`` and conditions ``c [R, p, dim]``."""
        return F.silu(self.time_embed(t).unsqueeze(-2) + self.cond_embed(c))

    def modulation(self, y):
        """The adaLN outputs of every shared layer and of the final layer (x-independent)."""
        return [blk(y) for blk in self.ada_ln_blocks], self.final_layer.ada_ln_modulation(y)

    def denoise(self, x, modulation):
        ada, final = modulation
        x = self.input_proj(x)
        for i, block in enumerate(self.res_blocks):
            if i % self.switch_every == 0:
                mod = ada[i // self.switch_every].chunk(self.chunks, dim=-1)
            x = block(x, mod)
        scale, shift = final.chunk(2, dim=-1)
        layer = self.final_layer
        return layer.linear(modulate(x, layer.norm_final, scale, shift))


class DiffusionHead(nn.Module):
    """Wrapper whose state dict has the released ``net.*`` keys."""

    def __init__(self, spec: ImageNetSpec):
        super().__init__()
        self.net = HeadNet(spec)

    def forward(self, x, t, c):
        return self.net(x, t, c)
