"""The BitDance diffusion head: ``net(x_t, t, c)`` predicts the clean binary tokens of a patch.

Keys match ``vision_head.safetensors`` (``net.time_embed.mlp.0.weight``, ``net.res_blocks.0...``).
The head sees ``[B, P, 32]`` noisy tokens, one time per row ``[B]`` and one condition per token
``[B, P, ch_cond]``; attention is full (non-causal) over the P tokens of the patch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

# Sequences up to this length use the explicit softmax(q k^T) v form of the reference (which
# scales q before the product); longer ones use fused attention, as the reference does.
EXPLICIT_ATTENTION_MAX_LEN = 32


@dataclass(frozen=True)
class HeadConfig:
    """``vision_head_config.json``: exactly these keys, in the released file's order."""

    ch_target: int
    ch_cond: int
    ch_latent: int
    depth_latent: int
    depth_adanln: int
    use_swiglu: bool
    parallel_num: int
    time_shift: float = 1.0
    time_schedule: str = "logit_normal"
    P_mean: float = 0.0
    P_std: float = 1.0
    diff_batch_mul: int = 1
    grad_checkpointing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.ch_latent < 128 or self.ch_latent % 128:
            raise ValueError(f"ch_latent {self.ch_latent} must be a multiple of 128")
        if self.depth_adanln < 1 or self.depth_latent < 1 or self.depth_latent % self.depth_adanln:
            raise ValueError(f"depth_latent {self.depth_latent} must be a positive multiple of "
                             f"depth_adanln {self.depth_adanln}")


@functools.lru_cache(maxsize=None)
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """``exp(-ln(max_period) i / half)``, computed once by PyTorch on the CPU (a real tensor
    even when first asked for while an exporter traces). A graph export then carries them as
    constants: left as operators, another runtime's exp() may differ by an ulp, which at
    ``1000 t ~ 950`` moves cos/sin by about 1e-5."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.inference_mode(False), torch.no_grad():
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32)
                          / half)
        return freqs.to(device)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Times ``[...]`` in [0, 1] -> ``[..., dim]``: cos then sin of ``1000 t * freqs``."""
    freqs = _frequencies(dim // 2, max_period, t.device)
    args = (1000.0 * t.float())[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            Linear(freq_dim, channels), nn.SiLU(), Linear(channels, channels)
        )

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class PatchAttention(nn.Module):
    """Full self-attention over the P tokens of a patch, fused qkv (q|k|v), heads of 128."""

    def __init__(self, dim: int):
        super().__init__()
        self.n_head = dim // 128
        self.head_dim = 128
        self.wqkv = Linear(dim, 3 * dim)
        self.wo = Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
            for z in self.wqkv(x).chunk(3, dim=-1)
        )
        if t <= EXPLICIT_ATTENTION_MAX_LEN:
            q = q * self.head_dim ** -0.5
            out = F.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, c))


class HeadBlock(nn.Module):
    def __init__(self, channels: int, use_swiglu: bool):
        super().__init__()
        hidden = int(channels * 1.5)
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.attn = PatchAttention(channels)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.use_swiglu = use_swiglu
        if use_swiglu:
            self.w1 = Linear(channels, 2 * hidden)
            self.w2 = Linear(hidden, channels)
        else:
            self.mlp = nn.Sequential(
                Linear(channels, hidden), nn.SiLU(), Linear(hidden, channels)
            )

    def forward(self, x, mod):
        scale1, shift1, gate1, scale2, shift2, gate2 = mod
        x = x + self.attn(self.norm1(x) * (1 + scale1) + shift1) * gate1
        h = self.norm2(x) * (1 + scale2) + shift2
        if self.use_swiglu:
            a, b = self.w1(h).chunk(2, dim=-1)
            h = self.w2(F.silu(a) * b)
        else:
            h = self.mlp(h)
        return x + h * gate2


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = Linear(channels, 2 * channels)
        self.linear = Linear(channels, out_channels)

    def forward(self, x, y):
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1.0 + scale) + shift)


class HeadNet(nn.Module):
    """``f(x_t [B,P,32], t [B], c [B,P,ch_cond]) -> x_0 [B,P,32]`` in [-1, 1]."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        c = cfg.ch_latent
        self.time_embed = TimestepEmbedder(c)
        self.cond_embed = Linear(cfg.ch_cond, c)
        self.input_proj = Linear(cfg.ch_target, c)
        self.res_blocks = nn.ModuleList(
            HeadBlock(c, cfg.use_swiglu) for _ in range(cfg.depth_latent)
        )
        self.ada_ln_blocks = nn.ModuleList(Linear(c, 6 * c) for _ in range(cfg.depth_adanln))
        self.switch_every = max(1, cfg.depth_latent // cfg.depth_adanln)
        self.final_layer = FinalLayer(c, cfg.ch_target)

    def forward(self, x, t, c):
        return self.denoise(x, self.modulation(self.conditioning(t, c)))

    def conditioning(self, t, c):
        """``y = silu(time_embed(t) + cond_embed(c))``: ``[..., R, P, C]`` for times
        ``[..., R]`` (one per row; leading dims, e.g. one per sampler step, batch several
        evaluations) and conditions ``[R, P, Cc]``."""
        return F.silu(self.time_embed(t).unsqueeze(-2) + self.cond_embed(c))

    def modulation(self, y):
        """Everything of the network that does not depend on x: the adaLN outputs of each
        shared block and of the final layer. ``y`` may carry extra leading dims (e.g. one per
        sampling step), which lets a sampler compute all steps' modulations in one batch."""
        return [blk(y) for blk in self.ada_ln_blocks], self.final_layer.ada_ln_modulation(y)

    def denoise(self, x, modulation):
        """The x-dependent part, given ``modulation()`` of the matching y."""
        ada, final = modulation
        x = self.input_proj(x)
        mod = None
        for i, block in enumerate(self.res_blocks):
            if i % self.switch_every == 0:
                mod = ada[i // self.switch_every].chunk(6, dim=-1)
            x = block(x, mod)
        scale, shift = final.chunk(2, dim=-1)
        out = self.final_layer.linear(self.final_layer.norm_final(x) * (1.0 + scale) + shift)
        return 2 * torch.sigmoid(out) - 1


class DiffusionHead(nn.Module):
    """Wrapper whose state dict has the released ``net.*`` keys."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.net = HeadNet(cfg)

    def forward(self, x, t, c):
        return self.net(x, t, c)
