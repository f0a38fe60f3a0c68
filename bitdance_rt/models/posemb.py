"""2-D sin-cos position embedding of image tokens, in patch raster order."""

from __future__ import annotations

import torch

MAX_LATENT_SIDE = 256  # 4096 pixels / 16


def sincos_table(dim: int, length: int = MAX_LATENT_SIDE) -> torch.Tensor:
    """``[length, dim]``: ``[sin(pos * omega), cos(pos * omega)]``, ``omega_i = 1e4^(-2i/dim)``."""
    omega = torch.arange(dim // 2, dtype=torch.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    pos = torch.arange(length, dtype=torch.float32)
    out = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def image_posemb(hidden: int, h: int, w: int, patch: int) -> torch.Tensor:
    """``[h * w, hidden]`` embedding of latent positions in patch raster order.

    Position (r, c) gets ``concat(E[c], E[r])`` (column part first); tokens are ordered by
    patch (row-major over patches of ``patch x patch``), then row-major inside the patch.
    """
    table = sincos_table(hidden // 2)
    grid = torch.cat(
        [table[:w][None, :, :].expand(h, w, -1), table[:h][:, None, :].expand(h, w, -1)], dim=-1
    )
    return to_patch_raster(grid, patch)


def to_patch_raster(grid: torch.Tensor, patch: int) -> torch.Tensor:
    """``[h, w, C]`` -> ``[h * w, C]`` in patch raster order."""
    h, w, c = grid.shape
    g = grid.reshape(h // patch, patch, w // patch, patch, c).permute(0, 2, 1, 3, 4)
    return g.reshape(h * w, c)


def latent_to_tokens(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """Latent ``[B, C, h, w]`` -> ``[B, h * w, C]`` tokens in patch raster order (the inverse
    of :func:`tokens_to_latent`; training reads the autoencoder's tokens this way)."""
    b, c, h, w = latent.shape
    x = latent.permute(0, 2, 3, 1).reshape(b, h // patch, patch, w // patch, patch, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)


def tokens_to_latent(tokens: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """``[B, h * w, C]`` tokens in patch raster order -> latent ``[B, C, h, w]``."""
    b, _, c = tokens.shape
    x = tokens.reshape(b, h // patch, w // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
