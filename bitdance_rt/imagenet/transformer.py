"""The class-conditional transformer, with the released state-dict keys.

A sequence is ``cls_token_num`` class tokens (one embedding row per class, cut into tokens;
row ``num_classes`` is the null class of guidance), then ``parallel_num - 1`` learned query
tokens (models with several tokens per step), then the image tokens of every step but the
last, each the projection of a step's +-1 tokens. The output at a step's last
``parallel_num`` positions conditions the head for the next step.

Attention is causal, except that the positions of one step (the last class token and the
queries; then the tokens of each step) see each other. Positions carry a 2-D RoPE: class and
query tokens sit at (0, 0) (no rotation), the token of latent cell (r, c) at ``(c + 1.5, r +
1.5)``, the x coordinate on the first half of each head's channels.

The KV cache is preallocated for every sequence of a run (``[B, H, max_len, 64]`` per layer)
and written in place; attention reads the filled prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.linear import Linear
from .head import DiffusionHead
from .spec import ATTENTION_HEAD_DIM, NORM_EPS, ROPE_BASE, ImageNetSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, NORM_EPS)


class SwiGLU(nn.Module):
    """``w2(silu(a) * b)`` with ``a, b = w1(x).chunk(2)``."""

    def __init__(self, dim: int, hidden: int, out: int, bias: bool):
        super().__init__()
        self.w1 = Linear(dim, 2 * hidden, bias=bias)
        self.w2 = Linear(hidden, out, bias=bias)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def rope_table(spec: ImageNetSpec) -> torch.Tensor:
    """``[max_len, 32, 2]`` (cos, sin) per sequence position; see the module docstring."""
    half = ATTENTION_HEAD_DIM // 2
    freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    side = spec.latent_side
    centers = (torch.arange(side, dtype=torch.float32) + 0.5) * 1.0  # cell centres, cell 1
    rows, cols = torch.meshgrid(centers, centers, indexing="ij")
    xy = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1) + 1.0
    lead = spec.cls_token_num + spec.parallel_num - 1
    xy = torch.cat([torch.zeros(lead, 2), xy])
    angles = torch.outer(xy.flatten(), freqs).view(xy.shape[0], -1)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    image = table[lead:]
    p = spec.patch
    if p > 1:  # the image positions in token (patch raster) order
        flat = image.reshape(side // p, p, side // p, p, -1).permute(0, 2, 1, 3, 4)
        image = flat.reshape(image.shape)
    return torch.cat([table[:lead], image])[: spec.max_len - 1]


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, 64]`` rotated in channel pairs by ``table [T, 32, 2]`` (float32)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """One layer's keys and values for every sequence of a run, ``[B, H, S_max, 64]``."""

    def __init__(self, batch: int, heads: int, max_len: int, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, ATTENTION_HEAD_DIM)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [B, H, T, 64]`` at ``start``; the filled prefix ``[:, :, :start + T]``."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.wqkv = Linear(dim, 3 * dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, rope, start: int, mask: torch.Tensor | None):
        b, t, dim = x.shape
        q, k, v = (z.view(b, t, self.n_head, ATTENTION_HEAD_DIM)
                   for z in self.wqkv(x).chunk(3, dim=-1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        keys, values = self.cache.update(start, k, v)
        scores = (q * ATTENTION_HEAD_DIM ** -0.5) @ keys.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        out = torch.softmax(scores, dim=-1) @ values
        return self.wo(out.transpose(1, 2).contiguous().view(b, t, dim))


class Block(nn.Module):
    def __init__(self, spec: ImageNetSpec):
        super().__init__()
        self.attention = Attention(spec.dim, spec.n_head)
        self.feed_forward = SwiGLU(spec.dim, spec.ffn_hidden, spec.dim, bias=False)
        self.attention_norm = RMSNorm(spec.dim)
        self.ffn_norm = RMSNorm(spec.dim)

    def forward(self, x, rope, start, mask):
        h = x + self.attention(self.attention_norm(x), rope, start, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def step_mask(spec: ImageNetSpec, start: int, t: int, device=None) -> torch.Tensor | None:
    """Additive mask ``[1, 1, t, start + t]`` of ``t`` new positions from ``start``: causal,
    except that the positions of one step see each other. None for one position."""
    if t == 1:
        return None
    first = spec.cls_token_num - 1  # the first step: the last class token and the queries
    q = torch.arange(start, start + t)[:, None]
    k = torch.arange(start + t)[None, :]
    same_step = ((q >= first) & (k >= first)
                 & ((q - first) // spec.parallel_num == (k - first) // spec.parallel_num))
    mask = torch.zeros(t, start + t).masked_fill(~((k <= q) | same_step), float("-inf"))
    return mask[None, None].to(device)


class ClassConditionalTransformer(nn.Module):
    """Keys: ``cls_embedding``, ``proj_in``, ``emb_norm``, ``layers.*``, ``norm``,
    ``pos_for_diff``, ``query_token`` (several tokens per step) and the head, ``head.net.*``."""

    def __init__(self, spec: ImageNetSpec):
        super().__init__()
        self.spec = spec
        self.cls_embedding = nn.Embedding(spec.num_classes + 1, spec.dim * spec.cls_token_num)
        self.proj_in = SwiGLU(spec.latent_dim, int(spec.dim * 1.5), spec.dim, bias=True)
        self.emb_norm = RMSNorm(spec.dim)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.norm = RMSNorm(spec.dim)
        self.pos_for_diff = nn.Embedding(spec.num_tokens, spec.dim)
        if spec.parallel_num > 1:
            self.query_token = nn.Parameter(torch.zeros(1, spec.parallel_num - 1, spec.dim))
        self.head = DiffusionHead(spec)
        self.register_buffer("rope", rope_table(spec), persistent=False)

    def setup_cache(self, batch: int) -> None:
        """A fresh KV cache for ``batch`` sequences (the model's dtype and device)."""
        w = self.norm.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, self.spec.n_head, self.spec.max_len,
                                            w.dtype, w.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def first_step(self, labels: torch.Tensor) -> torch.Tensor:
        """The class tokens (and queries) of ``labels [R]``; returns the hidden states of the
        first step's ``parallel_num`` positions ``[R, p, dim]``."""
        rows, spec = labels.shape[0], self.spec
        x = self.cls_embedding(labels).view(rows, spec.cls_token_num, -1)
        if spec.parallel_num > 1:
            x = torch.cat([x, self.query_token.repeat(rows, 1, 1)], dim=1)
        return self.run(x, 0)[:, -spec.parallel_num:]

    def next_step(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """The +-1 tokens ``[R, p, latent]`` of step ``k - 1`` in; the hidden states
        conditioning step ``k`` out ``[R, p, dim]``."""
        p = self.spec.parallel_num
        start = self.spec.cls_token_num + p - 1 + p * (k - 1)
        return self.run(self.proj_in(tokens.to(self.norm.weight.dtype)), start)

    def run(self, x: torch.Tensor, start: int) -> torch.Tensor:
        t = x.shape[1]
        rope = self.rope[start:start + t]
        mask = step_mask(self.spec, start, t, x.device)
        if mask is not None:
            mask = mask.to(x.dtype)
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, rope, start, mask)
        return self.norm(x)

    def head_condition(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """The head's condition of step ``k``: hidden states plus the step's position rows."""
        p = self.spec.parallel_num
        return hidden + self.pos_for_diff.weight[k * p:(k + 1) * p]
