"""The AR loop, written once over any :class:`~bitdance_rt.runtime.backend.Backend`."""

from __future__ import annotations

import torch

from ..pipeline import GenerationRequest, StepCallback
from ..sampling import draw_block_noise
from .backend import Backend, ImagePlan
from .timing import StageTimer


@torch.no_grad()
def generate_tokens(backend: Backend, plan: ImagePlan, seed: int, timer: StageTimer | None = None,
                    on_step: StepCallback | None = None) -> torch.Tensor:
    """Seeds the global generator, runs prefill and every block; returns tokens
    ``[B, h*w, 32]`` (patch raster order). Noise is drawn up front per block in the reference
    order (x_0, then one tensor per step) on the backend's device."""
    timer = timer or StageTimer(backend.device, enabled=False)
    p, b = backend.parallel_num, plan.images
    wb = backend.weight_bytes(plan)
    num_blocks = plan.h * plan.w // p
    torch.manual_seed(seed)
    backend.begin(plan)
    with timer.stage("prefill", calls=wb.get("prefill_calls", 1), weight_bytes=wb.get("prefill", 0)):
        cond = backend.prefill()
    out = torch.empty((b, plan.h * plan.w, backend.ch_target), device=backend.device)
    for k in range(num_blocks):
        noise = draw_block_noise(b, p, backend.ch_target, plan.steps, backend.device)
        with timer.stage("head", calls=wb.get("head_calls", plan.steps + 1),
                         weight_bytes=wb.get("head", 0)):
            x = backend.sample_head(cond, noise)
        tokens = torch.sign(x)
        out[:, k * p:(k + 1) * p] = tokens
        if k + 1 < num_blocks:
            with timer.stage("block_step", calls=1, weight_bytes=wb.get("block_step", 0)):
                cond = backend.block_step(tokens, k)
        if on_step:
            on_step(k + 1, num_blocks)
    return out


@torch.no_grad()
def generate(backend: Backend, plan: ImagePlan, seed: int, timer: StageTimer | None = None,
             on_step: StepCallback | None = None) -> torch.Tensor:
    """uint8 images ``[B, 16h, 16w, 3]``. A gan-decoder model's noise is drawn after all AR
    steps (reference order)."""
    timer = timer or StageTimer(backend.device, enabled=False)
    timer.start()
    tokens = generate_tokens(backend, plan, seed, timer, on_step)
    noise = None
    if backend.gan_decoder:
        noise = torch.randn((plan.images, backend.ch_target, plan.h, plan.w), device=backend.device)
    with timer.stage("decode", calls=1, weight_bytes=backend.weight_bytes(plan).get("decode", 0)):
        images = backend.decode(tokens, noise)
    timer.stop()
    return images


def plan_for(model, req: GenerationRequest) -> ImagePlan:
    """The plan of a request on a checkpoint with a tokenizer."""
    from ..pipeline import prompt_sequences

    h, w = req.validate()
    seqs = tuple(tuple(s) for s in prompt_sequences(model, req, h, w))
    return ImagePlan(h=h, w=w, images=req.num_images, seq_ids=seqs, steps=req.steps,
                     guidance=req.guidance)
