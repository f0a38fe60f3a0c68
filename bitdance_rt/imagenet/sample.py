"""Class-conditional sampling, seed for seed the authors' ``model.sample``.

For labels ``[B]``, seed S, N head steps and guidance G, :func:`generate` gives the images of
``torch.manual_seed(S); model.sample(labels, sample_steps=N, cfg_scale=G)`` turned into uint8
as the authors' sampling script does (exactly, on the CPU in float32). What that takes:

- with guidance (G > 1) every sequence runs twice in one batch, ``[labels; null class]``;
- the guidance of AR step k is ``1 + (G - 1) k / K`` (K steps per image), so the first step
  has none: there the conditional and unconditional rows are sampled separately (2B rows of
  noise), and from the second step on the head samples B rows whose tokens both halves take;
- the random numbers come from one generator seeded with S (the global one's stream, drawn
  from a generator of our own), per AR step: the initial x, then one draw per Euler-Maruyama
  step (:mod:`bitdance_rt.sampling` runs the head sampler);
- the whole batch is decoded at once (the CPU's convolutions round differently for other
  batch sizes), with the autoencoder in channels_last as theirs is. On the CPU the
  GroupNorm of channels_last activations sums in an order that depends on the number of
  threads, so the decoded pixels (not the tokens) are theirs for the same
  ``torch.get_num_threads()`` (with another count, a few values differ by one).

Two ways to run the head, bit-identical on the CPU in float32: ``reference`` evaluates the whole
head network at every sampler step, as the authors do; ``torch`` computes the x-independent part
of the head (time and condition embeddings, every adaLN modulation) once per AR step for all
sampler steps and runs only the x-dependent part per step. Both use the transformer's static KV
cache for all sequences.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.posemb import tokens_to_latent
from ..models.steps import tile_rows, to_uint8
from ..sampling import sample_block, sample_block_premodulated, step_schedule
from .checkpoint import ImageNetModel

BACKENDS = ("torch", "reference")


def guidance_at(guidance: float, k: int, num_blocks: int) -> float:
    """The guidance of AR step ``k`` of ``num_blocks`` (the authors' linear schedule)."""
    if guidance <= 1.0:
        return 1.0
    return 1.0 + (guidance - 1.0) * k / num_blocks


@torch.no_grad()
def generate_tokens(model: ImageNetModel, labels, steps: int, guidance: float, seed: int,
                    backend: str = "torch",
                    on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The +-1 tokens ``[B, h*w, latent]`` (token order) of ``labels`` (see the module
    docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    spec, net = model.spec, model.transformer
    device, dtype = model.device, model.dtype
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    batch = labels.shape[0]
    if guidance > 1.0:
        labels = torch.cat([labels, torch.full_like(labels, spec.num_classes)])
    rows = labels.shape[0]
    net.setup_cache(rows)
    gen = torch.Generator(device).manual_seed(int(seed))
    times, coeffs = (t.to(device) for t in step_schedule(steps, spec.time_shift))
    head = net.head.net

    def full_head(x, t, c):
        return head(x.to(dtype), t, c)

    out, tokens = [], None
    for k in range(spec.num_blocks):
        hidden = net.first_step(labels) if k == 0 else net.next_step(tokens, k)
        cond = net.head_condition(hidden, k)
        g = guidance_at(guidance, k, spec.num_blocks)
        sampled = rows // 2 if g > 1.0 else rows
        noise = [torch.randn((sampled, spec.parallel_num, spec.latent_dim), generator=gen,
                             device=device) for _ in range(steps + 1)]
        if backend == "reference":
            x = sample_block(full_head, cond, noise, g, times, coeffs)
        else:
            x = sample_block_premodulated(head, cond, noise, g, times, coeffs, dtype)
        tokens = torch.sign(tile_rows(x, rows))
        out.append(tokens[:batch])
        if on_step:
            on_step(k + 1, spec.num_blocks)
    net.clear_cache()  # its memory is not kept between runs
    return torch.cat(out, dim=1)


@torch.no_grad()
def decode(model: ImageNetModel, tokens: torch.Tensor) -> torch.Tensor:
    """+-1 tokens ``[B, h*w, latent]`` -> uint8 images ``[B, H, W, 3]`` (the batch at once)."""
    side = model.spec.latent_side
    latent = tokens_to_latent(tokens.float(), side, side, model.spec.patch)
    return to_uint8(model.ae.decode(latent.to(model.dtype)))


def generate(model: ImageNetModel, labels, steps: int, guidance: float, seed: int,
             backend: str = "torch", on_step=None) -> torch.Tensor:
    """uint8 images ``[B, H, W, 3]`` of ``labels`` (see the module docstring)."""
    tokens = generate_tokens(model, labels, steps, guidance, seed, backend, on_step)
    return decode(model, tokens)
