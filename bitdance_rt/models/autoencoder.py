"""The binary autoencoder (tokenizer): encoder, decoder and the gan-decoder variant.

Keys match ``ae.safetensors`` (``encoder.*``, ``decoder.*``). Images are ``[B, 3, H, W]`` in
[-1, 1]; latents are ``[B, z, H/16, W/16]`` with values +-1 (``z = 32`` binary channels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .linear import Linear


@dataclass(frozen=True)
class AEConfig:
    """``ae_config.json``: ``{"ddconfig": {...}, "gan_decoder": bool}``."""

    ch: int = 256
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    gan_decoder: bool = False
    extra: dict = field(default_factory=dict)  # other ddconfig keys, kept for round trips

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_json_dict(cls, d: dict) -> "AEConfig":
        dd = dict(d["ddconfig"])
        known = {k: dd.pop(k) for k in list(dd) if k in cls.__dataclass_fields__}
        known["ch_mult"] = tuple(known.get("ch_mult", cls.ch_mult))
        return cls(**known, gan_decoder=bool(d.get("gan_decoder", False)), extra=dd)

    def to_json_dict(self) -> dict:
        dd = asdict(self)
        gan = dd.pop("gan_decoder")
        extra = dd.pop("extra")
        dd["ch_mult"] = list(dd["ch_mult"])
        return {"ddconfig": {**dd, **extra}, "gan_decoder": gan}

    def validate(self) -> None:
        for m in self.ch_mult:
            if (self.ch * m) % 32:
                raise ValueError(f"channel count {self.ch * m} is not a multiple of 32")


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def depth_to_space(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """DCR order: input channel ``(dy * block + dx) * C' + c`` lands at ``(c, 2y+dy, 2x+dx)``."""
    b, c, h, w = x.shape
    x = x.view(b, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c // block**2, h * block, w * block)


class Upsampler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, 4 * dim, 3, padding=1)

    def forward(self, x):
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """Non-affine GroupNorm of x scaled and shifted by statistics of the latent z."""

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gn = group_norm(channels, affine=False)
        self.gamma = Linear(z_channels, channels)
        self.beta = Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x, z):
        b, c = x.shape[:2]
        flat = z.flatten(2)
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt()).view(b, c, 1, 1)  # unbiased
        bias = self.beta(flat.mean(dim=-1)).view(b, c, 1, 1)
        return scale * self.gn(x) + bias


class Level(nn.Module):
    """One resolution level: ``block`` ResBlocks and an optional down/upsampler."""

    def __init__(self, blocks):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Encoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            cout = ch * m
            level = Level([ResBlock(cin if j == 0 else cout, cout) for j in range(nrb)])
            if i < len(mult) - 1:
                level.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1)
            self.down.append(level)
            cin = cout
        self.mid_block = nn.ModuleList(ResBlock(cin, cin) for _ in range(nrb))
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                x = blk(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for blk in self.mid_block:
            x = blk(x)
        return self.conv_out(swish(self.norm_out(x)))


class Decoder(nn.Module):
    """``[B, z, h, w]`` latent -> ``[B, 3, 16h, 16w]`` image. With ``gan_decoder`` the input is
    the latent concatenated with standard normal noise (drawn in :meth:`forward` unless given)."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.gan = cfg.gan_decoder
        cin = ch * mult[-1]
        zin = cfg.z_channels * (2 if self.gan else 1)
        self.conv_in = nn.Conv2d(zin, cin, 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(cin, cin) for _ in range(nrb))
        adaptive, up = [], []
        for i in reversed(range(len(mult))):
            cout = ch * mult[i]
            adaptive.insert(0, AdaptiveGroupNorm(cfg.z_channels, cin))
            level = Level([ResBlock(cin if j == 0 else cout, cout) for j in range(nrb)])
            if i > 0:
                level.upsample = Upsampler(cout)
            up.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(up)
        self.adaptive = nn.ModuleList(adaptive)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z, noise: torch.Tensor | None = None):
        style = z
        if self.gan:
            if noise is None:
                noise = torch.randn_like(z)
            z = torch.cat([z, noise], dim=1)
        x = self.conv_in(z)
        for blk in self.mid_block:
            x = blk(x)
        for i in reversed(range(len(self.up))):
            x = self.adaptive[i](x, style)
            for blk in self.up[i].block:
                x = blk(x)
            if hasattr(self.up[i], "upsample"):
                x = self.up[i].upsample(x)
        return self.conv_out(swish(self.norm_out(x)))


class BinaryAutoencoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> +-1 latents ``[B, z, H/16, W/16]``."""
        h = self.encoder(images)
        one = torch.ones((), dtype=h.dtype, device=h.device)
        return torch.where(h > 0, one, -one)

    def decode(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(latents, noise)
