"""Qwen3 decoder (the BitDance language model), written for static KV caches.

State-dict keys are the Hugging Face ones (``model.layers.{i}.self_attn.q_proj.weight``, ...), so
the released ``model*.safetensors`` load unchanged into :class:`Qwen3ForCausalLM`.

The forward takes input embeddings ``[B, T, H]``, per-sequence RoPE positions ``[B, T]``, a KV
cache object (see :mod:`bitdance_rt.models.kv_cache`) and an attention mode:

- ``"causal"``: a prompt; token i sees the cache and new tokens ``<= i``.
- ``"block"``: a block of image tokens; every token sees the whole cache and the whole block.

Arithmetic follows the reference implementation (transformers' Qwen3) op for op, so that a
float32 run on the CPU reproduces it bit for bit where the attention kernel allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Qwen3Config":
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(d.get("rope_theta", 1_000_000.0)),
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    def to_hf_dict(self) -> dict:
        """A ``config.json`` that transformers reads as ``Qwen3ForCausalLM``."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "initializer_range": 0.02,
            "bos_token_id": None,
            "eos_token_id": None,
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        var = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(var + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``[D/2]`` inverse frequencies, computed exactly as the reference does (float32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin ``[B, T, D]`` for integer positions ``[B, T]`` (rotate-half layout)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, Hx, T, D]``; cos/sin ``[B, T, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    return (x * cos) + (rotate_half(x) * sin)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * d, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * d, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * d, bias=False)
        self.o_proj = Linear(self.n_heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, mode: str) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = cache.attend(self.layer_idx, q, k, v, mode)  # [B, Hq, T, D]
        out = out.transpose(1, 2).reshape(b, t, -1).contiguous()
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, mode):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mode)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False
        )

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache, mode: str = "causal"):
        """embeds ``[B, T, H]``, positions ``[B, T]`` -> final hidden states ``[B, T, H]``.

        ``cache`` must already know where each sequence's new tokens go (its per-sequence
        lengths); it is advanced by the caller (``cache.advance``) once all layers ran.
        """
        if mode not in ("causal", "block"):
            raise ValueError(f"attention mode must be 'causal' or 'block', got {mode!r}")
        cos, sin = rope_cos_sin(positions, self.inv_freq, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mode)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Holds ``model.*`` and ``lm_head``; images only use ``self.model``."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds, positions, cache, mode="causal"):
        return self.model(embeds, positions, cache, mode)
