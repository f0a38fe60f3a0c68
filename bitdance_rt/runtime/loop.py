"""The AR loop, written once over any :class:`~bitdance_rt.runtime.backend.Backend`.

Random numbers come from a :class:`~bitdance_rt.sampling.NoiseSource` (one generator per
request), never from the global generator: two requests in one process, in any order or in one
batch, each give the image they give alone.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch

from ..request import ImagePlan
from ..sampling import NoiseSource
from .backend import Backend
from .timing import StageTimer

# on_step(blocks done, blocks in all) after every block; it may raise to abandon the run, or
# return the indices (among the plan's images) of images to drop from it
StepCallback = Callable[[int, int], Optional[Iterable[int]]]


def noise_source(rng, device) -> NoiseSource:
    """A seed (int: one request) or ``(seed, images)`` pairs become a fresh NoiseSource on
    ``device``; a NoiseSource is used as given (it is consumed by one run)."""
    if isinstance(rng, NoiseSource):
        return rng
    return NoiseSource.from_seeds(rng, device)


@torch.no_grad()
def generate_tokens(backend: Backend, plan: ImagePlan, rng, timer: StageTimer | None = None,
                    on_step: StepCallback | None = None, noise: NoiseSource | None = None,
                    alive: list | None = None):
    """Prefill and every block; returns tokens ``[B, h*w, 32]`` (patch raster order). Each
    block's noise is drawn up front in the reference order (x_0, then one tensor per step) on
    the backend's device. Images that ``on_step`` drops stop being computed (where the backend
    can drop rows; the others keep their exact results) and keep zero tokens; ``alive``, if
    given, is filled with the indices of the images that ran to the end."""
    timer = timer or StageTimer(backend.device, enabled=False)
    with metered(backend, timer):
        return _generate_tokens(backend, plan, rng, timer, on_step, noise, alive)


def metered(backend: Backend, timer: StageTimer):
    """The backend counting its calls and weight reads into the timer's stages (an enabled
    timer only: the counting hooks cost time)."""
    if not timer.enabled or backend.meter is timer.meter:
        return contextlib.nullcontext()
    return backend.metered(timer.meter)


def _generate_tokens(backend, plan, rng, timer, on_step, noise, alive):
    noise = noise or noise_source(rng, backend.device)
    p, total = backend.parallel_num, plan.images
    num_blocks = plan.tokens // p
    live = list(range(total))  # the images still computed (indices among the plan's)
    rows = None  # live as a device index once images were dropped (no host sync per block)
    gone = set()  # dropped images a backend without drop() keeps computing
    backend.begin(plan)
    with timer.stage("prefill"):
        cond = backend.prefill()
    out = torch.zeros((total, plan.tokens, backend.ch_target), device=backend.device)
    for k in range(num_blocks):
        draws = noise.block(len(live), p, backend.ch_target, plan.steps, backend.device)
        with timer.stage("head"):
            x = backend.sample_head(cond, draws)
        tokens = torch.sign(x)
        if rows is None:
            out[:, k * p:(k + 1) * p] = tokens
        else:
            out[rows, k * p:(k + 1) * p] = tokens
        if k + 1 < num_blocks or backend.final_block_step:
            with timer.stage("block_step"):
                cond = backend.block_step(tokens, k)
        dropped = set(on_step(k + 1, num_blocks) or ()) if on_step else set()
        if dropped & set(live) and k + 1 < num_blocks:
            keep = [i for i, img in enumerate(live) if img not in dropped]
            if not keep:
                live = []
                break
            if backend.can_drop:
                cond = backend.drop(keep, cond)
                live = [live[i] for i in keep]
                rows = torch.tensor(live, device=backend.device)
                noise.keep(live, total)
            else:
                gone |= dropped
    if alive is not None:
        alive[:] = [i for i in live if i not in gone]
    return out


@torch.no_grad()
def generate(backend: Backend, plan: ImagePlan, rng, timer: StageTimer | None = None,
             on_step: StepCallback | None = None) -> torch.Tensor:
    """uint8 images ``[B, 16h, 16w, 3]`` (CPU). ``rng``: a seed, ``(seed, images)`` pairs (one
    per request of the plan, in order) or a NoiseSource. A gan-decoder model's noise is drawn
    after all AR steps (reference order). Images dropped by ``on_step`` are not decoded (they
    stay zero)."""
    timer = timer or StageTimer(backend.device, enabled=False)
    noise = noise_source(rng, backend.device)
    timer.start()
    alive = []
    with metered(backend, timer):
        tokens = generate_tokens(backend, plan, None, timer, on_step, noise=noise, alive=alive)
        images = None
        if alive:
            decoder_noise = None
            if backend.gan_decoder:
                decoder_noise = noise.decoder(len(alive), backend.ch_target, plan.h, plan.w,
                                              backend.device)
            with timer.stage("decode"):
                decoded = backend.decode(tokens[alive], decoder_noise)
            images = decoded
            if len(alive) < plan.images:
                images = torch.zeros((plan.images,) + tuple(decoded.shape[1:]),
                                     dtype=decoded.dtype)
                images[alive] = decoded
    timer.stop()
    if images is None:
        up = plan.h * 16, plan.w * 16
        images = torch.zeros((plan.images, *up, 3), dtype=torch.uint8)
    return images
