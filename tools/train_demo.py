#!/usr/bin/env python
"""Train the built-in demo model: a small BitDance on the procedural shapes dataset, on the CPU.

Exactly the BitDance architecture (Qwen3 LLM, binary autoencoder, projector, diffusion head),
trained with the paper's objectives, written in the released checkpoint layout so that every
loader, exporter and backend of ``bitdance_rt`` runs it unchanged:

- stage ``ae``: the binary autoencoder. ``z = sign(encoder(x))`` with a straight-through
  estimator, L1 + L2 reconstruction in [-1, 1] pixel space and the (bit-wise) LFQ entropy term:
  low per-bit entropy of each token, high entropy of the batch's average bit usage.
- stage ``ar``: the autoencoder frozen, tokens ``sign(encoder(x))``; the LLM, the projector and
  the diffusion head trained jointly with teacher forcing in the inference layout (text,
  ``<|vision_start|>``, ``<|res_h|>``, the ``<|res_w|>`` + query block, then the projected
  image blocks plus their position embeddings; causal over the text, block-causal over the
  image). Head loss: rectified flow with x-prediction and velocity matching
  (``x_t = t x1 + (1 - t) eps``, ``v = (f - x_t) / max(1 - t, 0.05)``, ``t`` logit-normal);
  the caption is replaced by the unconditional text with probability 0.1 (for guidance); text
  cross-entropy with weight 0.01.
- stage ``export``: write the release directory (bf16 by default) from the saved states.

Usage (see tools/README.md)::

    python tools/train_demo.py --out bitdance_rt/demo/weights --stage all --threads 1
    python tools/train_demo.py --out ... --stage ar --resume        # continue after a stop

Training states (model, optimizer, EMA, step) live in ``--work`` and are saved every
``--save-every`` steps; ``--resume`` continues from them bit for bit (data, noise and caption
dropout are drawn from generators seeded by (seed, step)).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bitdance_rt.demo import shapes  # noqa: E402
from bitdance_rt.models.autoencoder import AEConfig, BinaryAutoencoder  # noqa: E402
from bitdance_rt.models.head import DiffusionHead, HeadConfig  # noqa: E402
from bitdance_rt.models.posemb import image_posemb, latent_to_tokens  # noqa: E402
from bitdance_rt.models.projector import Projector  # noqa: E402
from bitdance_rt.models.qwen3 import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from bitdance_rt.tiny import TINY_VOCAB, build_tokenizer  # noqa: E402

from bitdance_rt.request import UNCONDITIONAL_TEXT, conditional_text, sequence_ids  # noqa: E402

MODEL_NAME = "bitdance-demo-shapes"
LATENT_STRIDE = 16


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DemoConfig:
    """Shapes of the model and the training hyper-parameters."""

    size: int = 128                      # image height = width (pixels)
    parallel_num: int = 16               # P: tokens per AR step
    # 64 channels at full resolution: GroupNorm(32) then keeps 2 channels per group; with 32
    # (one per group, an instance norm) flat colours cannot pass the decoder's last norm.
    ae: dict = field(default_factory=lambda: dict(ch=64, ch_mult=(1, 1, 1, 1, 2),
                                                  num_res_blocks=1))
    llm: dict = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64))
    head: dict = field(default_factory=lambda: dict(ch_latent=256, depth_latent=4,
                                                    depth_adanln=1))
    # stage 1
    ae_steps: int = 3000
    ae_batch: int = 8
    ae_lr: float = 1e-3
    ae_entropy_weight: float = 0.02
    ae_fg_weight: float = 2.0            # extra loss weight on the pixels of shapes
    ae_edge_weight: float = 6.0          # ... and near their outlines
    # stage 2
    ar_steps: int = 4500
    ar_batch: int = 16
    ar_lr: float = 5e-4
    ar_warmup: int = 200
    diff_batch_mul: int = 4              # (t, eps) draws per condition token
    cfg_drop: float = 0.1                # caption -> unconditional text
    text_weight: float = 0.01
    ema: float = 0.999
    # bfloat16 autocast for training: "auto" uses it where the CPU computes in bfloat16
    # (AMX or AVX512-BF16: about 3x faster); elsewhere it is about 10x slower than float32
    autocast: str = "auto"
    # training captions: "generated" (shapes.training_caption: the template's or one of the
    # caption generator's wordings) or "template" (the template only, as the first release)
    captions: str = "generated"
    ae_part: str = "all"                 # "decoder": train only the decoder (tokens unchanged)
    # release defaults (measured; see tools/README.md)
    steps: int = 25
    guidance: float = 4.0

    @property
    def latent(self) -> int:
        return self.size // LATENT_STRIDE

    @property
    def patch(self) -> int:
        return int(round(self.parallel_num ** 0.5))

    def ae_config(self) -> AEConfig:
        d = dict(self.ae)
        d["ch_mult"] = tuple(d["ch_mult"])
        return AEConfig(**d)

    def llm_config(self) -> Qwen3Config:
        return Qwen3Config(vocab_size=TINY_VOCAB, max_position_embeddings=4096, **self.llm)

    def head_config(self) -> HeadConfig:
        hs = self.llm["hidden_size"]
        return HeadConfig(ch_target=32, ch_cond=hs, ch_latent=self.head["ch_latent"],
                          depth_latent=self.head["depth_latent"],
                          depth_adanln=self.head["depth_adanln"], use_swiglu=True,
                          parallel_num=self.parallel_num, time_shift=1.0,
                          time_schedule="logit_normal", P_mean=0.0, P_std=1.0,
                          diff_batch_mul=self.diff_batch_mul, grad_checkpointing=False)

    def validate(self) -> None:
        p = self.patch
        if p * p != self.parallel_num:
            raise ValueError(f"parallel_num {self.parallel_num} is not a square")
        if self.size % LATENT_STRIDE or self.latent % p:
            raise ValueError(f"size {self.size}: the latent side {self.latent} must be a "
                             f"multiple of the patch side {p}")
        if self.parallel_num > 64:
            raise ValueError("at most 64 tokens per step (query tokens 1..63)")
        self.ae_config().validate()
        self.head_config().validate()


PRESETS = {
    "demo": DemoConfig(),
    # A few-second configuration for tests: same structure, tiny widths.
    "smoke": DemoConfig(
        size=64, parallel_num=4,
        ae=dict(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1),
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        head=dict(ch_latent=128, depth_latent=2, depth_adanln=1),
        ae_steps=3, ae_batch=2, ar_steps=3, ar_batch=2, ar_warmup=1, diff_batch_mul=2,
        steps=2, guidance=2.0),
}


# ----------------------------------------------------------------------------------------------
# Data


def images_tensor(indices, size: int, with_masks: bool = False):
    """``[B, 3, size, size]`` float32 in [-1, 1] of training samples (and, with
    ``with_masks``, their foreground masks ``[B, 1, size, size]``: pixels of a shape)."""
    samples = [shapes.sample(shapes.train_index(i), size) for i in indices]
    arr = np.stack([s[0] for s in samples])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not with_masks:
        return x
    bg = np.array([shapes.PALETTE[s[2]["background"]] for s in samples])
    fg = (arr != bg[:, None, None, :]).any(-1)
    return x, torch.from_numpy(fg)[:, None].float()


def captions_of(indices, kind: str = "generated") -> list[str]:
    if kind == "template":
        return [shapes.caption_of(shapes.draw_attributes(shapes.train_index(i)))
                for i in indices]
    return [shapes.training_caption(shapes.train_index(i)) for i in indices]


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 2 + (stage == "ar")) % 2**63)


# ----------------------------------------------------------------------------------------------
# Stage 1: the binary autoencoder


def binary_quantize(h: torch.Tensor) -> torch.Tensor:
    """``sign(h)`` (0 -> -1, as ``BinaryAutoencoder.encode``) with a straight-through gradient."""
    q = torch.where(h > 0, torch.ones_like(h), -torch.ones_like(h))
    return h + (q - h).detach()


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def lfq_entropy_loss(h: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """Bit-wise LFQ entropy term: mean per-token bit entropy minus the entropy of the batch's
    mean bit usage (groups of one channel: the group-wise LFQ of the paper at its cheapest)."""
    p = torch.sigmoid(h / temperature)                         # P(bit = +1)
    per_token = binary_entropy(p).mean()
    usage = binary_entropy(p.transpose(0, 1).flatten(1).mean(1)).mean()
    return per_token - usage


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast(cfg: DemoConfig):
    on = cfg.autocast in (True, "on") or (cfg.autocast == "auto" and cpu_has_bf16())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


def pixel_weights(fg: torch.Tensor, fg_weight: float, edge_weight: float,
                  band: int = 3) -> torch.Tensor:
    """``1 + fg_weight`` on the pixels of shapes, plus ``edge_weight`` within ``band`` pixels
    of a shape's outline: the few pixels that decide a shape (most are background)."""
    dilated = F.max_pool2d(fg, 2 * band + 1, stride=1, padding=band)
    eroded = -F.max_pool2d(-fg, 2 * band + 1, stride=1, padding=band)
    return 1.0 + fg_weight * fg + edge_weight * (dilated - eroded)


def ae_loss(ae: BinaryAutoencoder, x: torch.Tensor, entropy_weight: float,
            fg: torch.Tensor | None = None, fg_weight: float = 0.0, edge_weight: float = 0.0):
    """L1 + L2 reconstruction through the binary quantizer (weighted towards the shapes and
    their outlines, see :func:`pixel_weights`) plus the LFQ entropy term."""
    h = ae.encoder(x)
    z = binary_quantize(h)
    y = ae.decoder(z).float()
    err = (y - x).abs() + (y - x) ** 2
    rec = err.mean()
    loss = rec
    if fg is not None and (fg_weight or edge_weight):
        wmap = pixel_weights(fg, fg_weight, edge_weight)
        loss = (err * wmap).sum() / (wmap.sum() * err.shape[1])
    ent = lfq_entropy_loss(h.float())
    return loss + entropy_weight * ent, {"rec": rec.item(), "entropy": ent.item()}


# ----------------------------------------------------------------------------------------------
# Stage 2: LLM + projector + head, teacher forced


class TrainAttention:
    """Stands in for a KV cache in ``Qwen3Model.forward``: full-sequence SDPA with a given
    boolean mask ``[B, 1, T, T]`` (True = may attend)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def attend(self, layer, q, k, v, mode):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask,
                                              enable_gqa=q.shape[1] != k.shape[1])


@dataclass
class Batch:
    ids: torch.Tensor        # [B, L] prefix ids (left padded): text .. res_w, queries
    pad: torch.Tensor        # [B] left padding per row
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor       # [B, 1, T, T]
    text_mask: torch.Tensor  # [B, L - 1]: CE on predicting ids[:, 1:] (conditional text only)
    tokens: torch.Tensor     # [B, h*w, 32] +-1 image tokens, patch raster order


def build_batch(tokenizer, texts: list[str], tokens: torch.Tensor, h: int, w: int, p: int,
                conditional: list[bool]) -> Batch:
    """The teacher-forcing layout of inference (the sequence bitdance_rt/request.py builds;
    tests/test_demo_train.py::test_teacher_forcing_equals_incremental_inference checks it),
    left padded to one length.

    Per row: text ids, ``<|vision_start|>``, ``<|res_h|>`` (causal), then the block
    [``<|res_w|>``, queries] and the image blocks 0 .. n-2 (block-causal: each block sees
    everything before it and all of itself). Positions are consecutive from 0 per row."""
    seqs = [sequence_ids(tokenizer, t, h, w, p) for t in texts]
    n_blocks = h * w // p
    lmax = max(len(s) for s in seqs)
    b = len(seqs)
    t_total = lmax + (n_blocks - 1) * p
    ids = torch.zeros((b, lmax), dtype=torch.long)
    pad = torch.tensor([lmax - len(s) for s in seqs])
    for i, s in enumerate(seqs):
        ids[i, lmax - len(s):] = torch.tensor(s)
    idx = torch.arange(t_total)
    positions = (idx[None] - pad[:, None]).clamp_min(0)
    # group: causal text tokens get their own index, each P-block one shared index
    prefix_text = lmax - p                       # the res_w + query block starts here
    group = torch.where(idx < prefix_text, idx, prefix_text + (idx - prefix_text) // p * p)
    valid = idx[None] >= pad[:, None]            # [B, T]
    mask = (group[None, None, :] <= group[None, :, None]) & valid[:, None, :]
    mask = mask | torch.eye(t_total, dtype=torch.bool)[None]  # pads see themselves (no NaN)
    # text CE: predict ids[j + 1] at position j, both inside the conditional text
    text_len = torch.tensor([len(s) - 3 - (p - 1) for s in seqs])  # text ids (no image tokens)
    j = torch.arange(lmax - 1)
    text_mask = (j[None] >= pad[:, None]) & (j[None] + 1 < pad[:, None] + text_len[:, None])
    text_mask &= torch.tensor(conditional)[:, None]
    return Batch(ids, pad, positions, mask[:, None], text_mask, tokens)


def ar_forward(llm, projector, batch: Batch, posemb: torch.Tensor, p: int):
    """Hidden states conditioning each image block: ``[B, n_blocks, P, H]`` (with the block's
    position embedding added), and the LM logits of the prefix."""
    b = batch.ids.shape[0]
    n_blocks = batch.tokens.shape[1] // p
    emb_text = llm.model.embed_tokens(batch.ids)
    img_in = batch.tokens[:, : (n_blocks - 1) * p]
    emb_img = projector(img_in) + posemb[None, : (n_blocks - 1) * p]
    embeds = torch.cat([emb_text, emb_img], dim=1)
    hidden = llm.model(embeds, batch.positions, TrainAttention(batch.mask), "causal")
    lmax = batch.ids.shape[1]
    cond = hidden[:, lmax - p:].reshape(b, n_blocks, p, -1) + posemb.view(1, n_blocks, p, -1)
    return cond, hidden[:, : lmax - 1]


def sample_time(n: int, gen: torch.Generator, cfg: HeadConfig) -> torch.Tensor:
    """Training times: logit-normal (``P_mean``, ``P_std``), then the time shift."""
    t = torch.sigmoid(torch.randn(n, generator=gen) * cfg.P_std + cfg.P_mean)
    s = cfg.time_shift
    return (1 / s) / ((1 / s) + (1 / t - 1)) if s != 1.0 else t


def head_loss(head: DiffusionHead, cond: torch.Tensor, x1: torch.Tensor, gen: torch.Generator,
              mul: int) -> torch.Tensor:
    """Velocity matching with x-prediction: cond ``[R, P, H]``, x1 ``[R, P, 32]`` (+-1)."""
    cond = cond.repeat(mul, 1, 1)
    x1 = x1.repeat(mul, 1, 1)
    r = x1.shape[0]
    t = sample_time(r, gen, head.config)
    eps = torch.randn(x1.shape, generator=gen)
    tt = t.view(-1, 1, 1)
    xt = tt * x1 + (1 - tt) * eps
    f = head(xt, t, cond).float()
    denom = (1 - tt).clamp_min(0.05)
    v_pred = (f - xt) / denom
    v_true = (x1 - xt) / denom
    return ((v_pred - v_true) ** 2).mean()


def ar_loss(m: dict, tokenizer, cfg: DemoConfig, indices, gen: torch.Generator):
    """One training batch of stage 2: returns (loss, stats)."""
    h = w = cfg.latent
    p = cfg.parallel_num
    x = images_tensor(indices, cfg.size)
    with torch.no_grad():
        tokens = latent_to_tokens(m["ae"].encode(x).float(), cfg.patch)
    caps = captions_of(indices, cfg.captions)
    drop = (torch.rand(len(caps), generator=gen) < cfg.cfg_drop).tolist()
    texts = [UNCONDITIONAL_TEXT if d else conditional_text(c) for c, d in zip(caps, drop)]
    batch = build_batch(tokenizer, texts, tokens, h, w, p, [not d for d in drop])
    cond, text_hidden = ar_forward(m["llm"], m["projector"], batch, m["posemb"], p)
    b, n = cond.shape[:2]
    loss_img = head_loss(m["head"], cond.reshape(b * n, p, -1),
                         tokens.reshape(b * n, p, -1), gen, cfg.diff_batch_mul)
    loss = loss_img
    stats = {"flow": loss_img.item()}
    if cfg.text_weight > 0 and batch.text_mask.any():
        logits = m["llm"].lm_head(text_hidden[batch.text_mask]).float()
        target = batch.ids[:, 1:][batch.text_mask]
        loss_text = F.cross_entropy(logits, target)
        loss = loss + cfg.text_weight * loss_text
        stats["text"] = loss_text.item()
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Models, states, export


def init_weights(module: torch.nn.Module, gen: torch.Generator, zero_out: bool = False):
    """Small normal init for Linear/Embedding (std 0.02), as transformers does."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.02)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()


def build_ar_models(cfg: DemoConfig, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    llm = Qwen3ForCausalLM(cfg.llm_config())
    head = DiffusionHead(cfg.head_config())
    proj = Projector(32, cfg.llm["hidden_size"])
    for mod in (llm, proj, head):
        init_weights(mod, gen)
    with torch.no_grad():  # adaLN-zero: residual branches start closed (DiT practice)
        for blk in head.net.ada_ln_blocks:
            blk.weight.zero_()
            blk.bias.zero_()
        head.net.final_layer.ada_ln_modulation.weight.zero_()
        head.net.final_layer.ada_ln_modulation.bias.zero_()
    return {"llm": llm, "head": head, "projector": proj}


class EMA:
    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {k: {n: p.detach().clone() for n, p in m.state_dict().items()}
                       for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, m in modules.items():
            for n, p in m.state_dict().items():
                if p.dtype.is_floating_point:
                    self.shadow[k][n].mul_(d).add_(p.detach(), alpha=1 - d)
                else:
                    self.shadow[k][n].copy_(p)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def save_state(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class Progress:
    """One line per ``every`` steps: step, losses, seconds per step, ETA."""

    def __init__(self, stage: str, total: int, start: int, every: int):
        self.stage, self.total, self.start, self.every = stage, total, start, every
        self.t0 = time.perf_counter()
        self.acc: dict = {}
        self.n = 0

    def __call__(self, step: int, stats: dict, lr: float):
        for k, v in stats.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.n += 1
        done = step + 1
        if done % self.every and done != self.total:
            return
        el = time.perf_counter() - self.t0
        per = el / max(1, done - self.start)
        eta = per * (self.total - done)
        losses = " ".join(f"{k} {v / self.n:.4f}" for k, v in self.acc.items())
        print(f"[{self.stage}] step {done}/{self.total} {losses} lr {lr:.2e} "
              f"{per:.2f}s/step elapsed {el / 60:.1f}m eta {eta / 60:.1f}m", flush=True)
        self.acc, self.n = {}, 0


def train_ae(cfg: DemoConfig, work: Path, seed: int, resume: bool, log_every: int,
             save_every: int, steps: int | None = None,
             init: Path | None = None) -> BinaryAutoencoder:
    total = steps or cfg.ae_steps
    path = work / "ae_state.pt"
    torch.manual_seed(seed)
    ae = BinaryAutoencoder(cfg.ae_config())
    if init is not None:
        ae.load_state_dict(release_weights(init, "ae"))
    else:
        init_ae(ae)
    if cfg.ae_part == "decoder":
        ae.encoder.requires_grad_(False)
    trained = [q for q in ae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.ae_lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = 0
    if resume and path.is_file():
        st = torch.load(path, weights_only=False)
        ae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"[ae] resumed at step {start}", flush=True)
    prog = Progress("ae", total, start, log_every)
    ae.train()
    for step in range(start, total):
        lr = lr_at(step, total, cfg.ae_lr, min(100, total // 10 + 1))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [step * cfg.ae_batch + j for j in range(cfg.ae_batch)]
        x, fg = images_tensor(idx, cfg.size, with_masks=True)
        with autocast(cfg):
            loss, stats = ae_loss(ae, x, cfg.ae_entropy_weight, fg, cfg.ae_fg_weight,
                                  cfg.ae_edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        prog(step, stats, lr)
        if (step + 1) % save_every == 0 or step + 1 == total:
            save_state(path, {"model": ae.state_dict(), "opt": opt.state_dict(),
                              "step": step + 1, "config": asdict(cfg)})
    if start >= total:
        print(f"[ae] already trained ({start} steps)", flush=True)
    return ae.eval().requires_grad_(False)


def init_ae(ae: BinaryAutoencoder) -> None:
    """Start every residual block as the identity (its last conv zeroed) and every adaptive
    GroupNorm as a plain GroupNorm (scale 1, shift 0): much faster early training."""
    from bitdance_rt.models.autoencoder import AdaptiveGroupNorm, ResBlock

    with torch.no_grad():
        for mod in ae.modules():
            if isinstance(mod, ResBlock):
                mod.conv2.weight.zero_()
            elif isinstance(mod, AdaptiveGroupNorm):
                mod.gamma.weight.zero_()
                mod.gamma.bias.fill_(1.0)
                mod.beta.weight.zero_()
                mod.beta.bias.zero_()


RELEASE_FILES = {"ae": "ae.safetensors", "llm": "model.safetensors",
                 "head": "vision_head.safetensors", "projector": "projector.safetensors"}


def release_weights(directory: Path, part: str) -> dict:
    """One module's float32 state dict from a release directory (``--init``)."""
    from safetensors.torch import load_file

    path = Path(directory) / RELEASE_FILES[part]
    if not path.is_file():
        raise SystemExit(f"error: --init {directory}: no {RELEASE_FILES[part]} there "
                         "(name a directory this script wrote, e.g. bitdance_rt/demo/weights)")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_ae(cfg: DemoConfig, work: Path, init: Path | None = None) -> BinaryAutoencoder:
    """The autoencoder of the ae stage's state in ``work``; without one, ``init``'s."""
    ae = BinaryAutoencoder(cfg.ae_config())
    if (work / "ae_state.pt").is_file() or init is None:
        st = torch.load(work / "ae_state.pt", weights_only=False)
        ae.load_state_dict(st["model"])
    else:
        ae.load_state_dict(release_weights(init, "ae"))
    return ae.eval().requires_grad_(False)


def train_ar(cfg: DemoConfig, work: Path, seed: int, resume: bool, log_every: int,
             save_every: int, steps: int | None = None, stop_at: int | None = None,
             init: Path | None = None):
    from bitdance_rt.checkpoint import load_tokenizer

    total = steps or cfg.ar_steps
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    ae = load_ae(cfg, work, init)
    models = build_ar_models(cfg, seed)
    if init is not None:  # fine-tune a released model (the EMA starts from its weights)
        for k, mod in models.items():
            mod.load_state_dict(release_weights(init, k))
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.ar_lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema = EMA(models, cfg.ema)
    path = work / "ar_state.pt"
    start = 0
    if resume and path.is_file():
        st = torch.load(path, weights_only=False)
        for k, m in models.items():
            m.load_state_dict(st["models"][k])
        ema.shadow = st["ema"]
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"[ar] resumed at step {start}", flush=True)
    h = w = cfg.latent
    posemb = image_posemb(cfg.llm["hidden_size"], h, w, cfg.patch)
    m = {**models, "ae": ae, "posemb": posemb}
    for mod in models.values():
        mod.train()
    prog = Progress("ar", total, start, log_every)
    end = min(total, stop_at) if stop_at else total
    for step in range(start, end):
        lr = lr_at(step, total, cfg.ar_lr, cfg.ar_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = step_generator(seed, "ar", step)
        idx = [step * cfg.ar_batch + j for j in range(cfg.ar_batch)]
        with autocast(cfg):
            loss, stats = ar_loss(m, tokenizer, cfg, idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats["gnorm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        ema.update(models, step)
        prog(step, stats, lr)
        if (step + 1) % save_every == 0 or step + 1 == end:
            save_state(path, {"models": {k: v.state_dict() for k, v in models.items()},
                              "ema": ema.shadow, "opt": opt.state_dict(), "step": step + 1,
                              "config": asdict(cfg)})
    if start >= total:
        print(f"[ar] already trained ({start} steps)", flush=True)


def export(cfg: DemoConfig, work: Path, out: Path, dtype: torch.dtype = torch.bfloat16,
           use_ema: bool = True, steps: int | None = None, guidance: float | None = None,
           init: Path | None = None):
    """Write the release directory (the released layout plus ``bitdance_rt.json``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    ae = load_ae(cfg, work, init)
    st = torch.load(work / "ar_state.pt", weights_only=False)
    models = build_ar_models(cfg, 0)
    src = st["ema"] if use_ema else st["models"]
    for k, mod in models.items():
        mod.load_state_dict(src[k])

    def save(module, name):
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        (out / name).chmod(0o644)

    llm_cfg = cfg.llm_config()
    hf = llm_cfg.to_hf_dict()
    hf["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32",
                         torch.float16: "float16"}[dtype]
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    save(models["llm"], "model.safetensors")
    (out / "ae_config.json").write_text(json.dumps(cfg.ae_config().to_json_dict(), indent=2))
    save(ae, "ae.safetensors")
    (out / "vision_head_config.json").write_text(json.dumps(cfg.head_config().to_dict(),
                                                            indent=2))
    save(models["head"], "vision_head.safetensors")
    save(models["projector"], "projector.safetensors")
    build_tokenizer(out)
    meta = {
        "name": MODEL_NAME,
        "sizes": [[cfg.size, cfg.size]],
        "defaults": {"height": cfg.size, "width": cfg.size,
                     "steps": steps or cfg.steps, "guidance": guidance or cfg.guidance},
        "vocabulary": shapes.vocabulary(),
        "description": (
            "The built-in demo model: a small BitDance (Qwen3 LLM, binary autoencoder, "
            "diffusion head; P = %d tokens per step) trained on the CPU with tools/train_demo.py "
            "on procedural images of one or two solid shapes (circle, square, triangle) in eight "
            "colours on a plain background, with captions such as 'a red circle on the left, on "
            "a white background'." % cfg.parallel_num),
        "caption_grammar": ("a COLOUR SHAPE [POSITION] [and a COLOUR SHAPE POSITION], "
                            "on a COLOUR background" + (
                                " (and the wordings of bitdance_rt.demo.shapes.phrase)"
                                if cfg.captions == "generated" else "")),
        "training": training_record(cfg, work, st, use_ema, init),
    }
    (out / "bitdance_rt.json").write_text(json.dumps(meta, indent=2))
    return out


def training_record(cfg: DemoConfig, work: Path, ar_state: dict, use_ema: bool,
                    init: Path | None) -> dict:
    """What trained the weights written: this run's steps per stage (the ae stage's from its
    state in ``work``; none when the autoencoder came from ``init`` unchanged), the captions,
    and, for a fine-tune, the starting directory and its own record (the lineage)."""
    ae_path = work / "ae_state.pt"
    ae = torch.load(ae_path, weights_only=False) if ae_path.is_file() else None
    record = {"ae_steps": ae["step"] if ae else None,
              "ae_part": ae.get("config", {}).get("ae_part", "all") if ae else None,
              "ar_steps": ar_state["step"], "captions": cfg.captions, "ema": use_ema,
              "init": None}
    if init is not None:
        try:
            parent = json.loads((Path(init) / "bitdance_rt.json").read_text()).get("training")
        except (OSError, ValueError):
            parent = None
        record["init"] = {"path": str(init), "training": parent}
    return record


# ----------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The module's description as written, and every option's default (unless None)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="release checkpoint directory written at the end (stages all, ar, "
                    "export; required there: the shipped weights are bitdance_rt/demo/weights "
                    "and are replaced only when named)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bitdance-demo-work"),
                    help="training states (resumable) and the tokenizer used in training")
    ap.add_argument("--stage", choices=("ae", "ar", "all", "export"), default="all",
                    help="ae: the autoencoder; ar: the LLM and head (then export); all: both")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                    help="demo: the shipped model's sizes; smoke: tiny widths, a run of a few "
                    "seconds to try the stages")
    ap.add_argument("--override", type=json.loads, default=None,
                    help='JSON object of DemoConfig fields to change, e.g. \'{"ae_lr": 5e-4}\'')
    ap.add_argument("--ae-steps", type=int, default=None, help="steps of the ae stage (not given: the preset's)")
    ap.add_argument("--ar-steps", type=int, default=None,
                    help="length of the AR schedule (not given: the preset's)")
    ap.add_argument("--ar-batch", type=int, default=None, help="captions per AR step "
                    "(not given: the preset's)")
    ap.add_argument("--resume", action="store_true", help="continue from the states in --work")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from the weights of a release directory (fine-tuning; e.g. "
                    "bitdance_rt/demo/weights) instead of a fresh initialization; the ar and "
                    "export stages take its autoencoder when --work has none")
    ap.add_argument("--captions", choices=("generated", "template"), default=None,
                    help="training captions: the caption generator's wordings mixed with the "
                    "template (generated, the default) or the template only")
    ap.add_argument("--ae-part", choices=("all", "decoder"), default=None,
                    help="ae stage: train the whole autoencoder (all) or only its decoder "
                    "(decoder: the tokens, and so a trained AR model, stay valid)")
    ap.add_argument("--autocast", choices=("auto", "on", "off"), default=None,
                    help="bfloat16 autocast in training (auto: where the CPU has AMX or "
                    "AVX512-BF16)")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate of the stage(s) run (not given: the preset's)")
    ap.add_argument("--warmup", type=int, default=None, help="AR warm-up steps")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end the AR stage after this step (the schedule still spans "
                    "--ar-steps); --resume continues from there")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="data, noise and initialization")
    ap.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    ap.add_argument("--save-every", type=int, default=100,
                    help="steps between resumable states in --work")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="weights on disk in the release directory")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    ap.add_argument("--steps", type=int, default=None, help="default sampler steps to declare")
    ap.add_argument("--guidance", type=float, default=None, help="default guidance to declare")
    args = ap.parse_args(argv)
    if args.stage in ("all", "ar", "export") and args.out is None:
        ap.error(f"--stage {args.stage} writes a checkpoint directory: name it with --out DIR "
                 "(e.g. --out my-demo; --out bitdance_rt/demo/weights replaces the shipped model)")

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> None:
    cfg = replace(PRESETS[args.preset], **(args.override or {}))
    if args.ae_steps is not None:
        cfg.ae_steps = args.ae_steps
    if args.ar_steps is not None:
        cfg.ar_steps = args.ar_steps
    if args.ar_batch is not None:
        cfg.ar_batch = args.ar_batch
    for name, field_name in (("captions", "captions"), ("ae_part", "ae_part"),
                             ("autocast", "autocast"), ("warmup", "ar_warmup")):
        if getattr(args, name) is not None:
            setattr(cfg, field_name, getattr(args, name))
    if args.lr is not None:
        cfg.ae_lr = cfg.ar_lr = args.lr
    cfg.validate()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"config: {json.dumps(asdict(cfg))}", flush=True)
    if args.stage in ("ae", "all"):
        train_ae(cfg, args.work, args.seed, args.resume, args.log_every, args.save_every,
                 init=args.init)
    if args.stage in ("ar", "all"):
        train_ar(cfg, args.work, args.seed, args.resume, args.log_every, args.save_every,
                 stop_at=args.stop_at, init=args.init)
    if args.stage in ("all", "export", "ar"):
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        out = export(cfg, args.work, args.out, dtype, not args.no_ema, args.steps, args.guidance,
                     init=args.init)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote {out} ({size / 1e6:.1f} MB)", flush=True)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min "
          f"({args.threads} thread{'s' if args.threads > 1 else ''})", flush=True)


if __name__ == "__main__":
    main()
