"""The head sampler: Euler-Maruyama steps with a final Euler step (SPEC section 2).

Arithmetic is written in the reference's order of operations (float32 throughout) so that a CPU
float32 run reproduces the reference bit for bit; every backend uses these helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAST_STEP = 0.05
T_FINAL = 1 - LAST_STEP


def time_grid(num_steps: int, time_shift: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Times ``t_k`` (as accumulated by the sampler) and steps ``dt_k``, float32 0-d tensors."""
    if num_steps < 1:
        raise ValueError(f"the head needs at least 1 sampling step, got {num_steps}")
    grid = torch.linspace(0, T_FINAL, num_steps + 1, dtype=torch.float32)
    grid = (1 / time_shift) / ((1 / time_shift) + (1 / grid - 1) ** 1.0)
    dts = list(grid[1:] - grid[:-1])
    t = torch.tensor(0.0, dtype=torch.float32)
    ts = []
    for dt in dts:
        ts.append(t.clone())
        t += dt
    return ts, dts


def draw_block_noise(batch: int, tokens: int, channels: int, num_steps: int,
                     device, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The random tensors of one image block, in the reference order: x_0, then one per step."""
    shape = (batch, tokens, channels)
    return [torch.randn(shape, device=device, generator=generator) for _ in range(num_steps + 1)]


def velocity(out: torch.Tensor, x_in: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
    """``(f - x_t) / max(1 - t, 0.05)``, t per row ``[R]``."""
    return (out - x_in) / (1 - t_rows.view(-1, 1, 1)).clamp_min(LAST_STEP)


def guide(v: torch.Tensor, guidance: float, cfg_mult: int) -> torch.Tensor:
    if cfg_mult == 2:
        cond, uncond = torch.chunk(v, 2, dim=0)
        return uncond + guidance * (cond - uncond)
    return v


def em_update(x, v, t, dt, noise):
    """One Euler-Maruyama update given the guided velocity (reference operation order)."""
    var = (1 - t) ** 2 - (t / 1 * -1) * (1 - t)
    score = (t / 1 * v - x) / var
    drift = v + (1 - t) * score
    return x + drift * dt + (2.0 * (1.0 - t) * dt) ** 0.5 * noise


def sample_block(net, cond: torch.Tensor, noise: list[torch.Tensor], guidance: float,
                 ts, dts) -> torch.Tensor:
    """The reference sampler for one block: ``net(x_t, t_rows, cond)`` per step.

    ``cond`` ``[R, P, H]`` with R = B or 2B (CFG); returns x ``[B, P, 32]`` (float32, before
    ``sign``).
    """
    return run_sampler(lambda x_in, k, t_rows: net(x_in, t_rows, cond), cond.shape[0],
                       cond.device, noise, guidance, ts, dts)


def run_sampler(f, rows: int, device, noise, guidance, ts, dts) -> torch.Tensor:
    """The sampler loop over ``f(x_in [R, P, 32], step k, t_rows [R]) -> x_0 prediction``:
    N Euler-Maruyama steps, then the final Euler step (step index N)."""
    cfg_mult = 2 if guidance > 1.0 else 1
    x = noise[0]
    t_rows = torch.zeros(rows, device=device)
    for i in range(len(dts)):
        t_rows[:] = ts[i]
        x_in = torch.cat([x] * cfg_mult, dim=0)
        v = velocity(f(x_in, i, t_rows).float(), x_in, t_rows)
        x = em_update(x, guide(v, guidance, cfg_mult), ts[i].to(x.device), dts[i].to(x.device),
                      noise[i + 1])
    t_rows.fill_(T_FINAL)
    x_in = torch.cat([x] * cfg_mult, dim=0)
    v = velocity(f(x_in, len(dts), t_rows).float(), x_in, t_rows)
    return x + guide(v, guidance, cfg_mult) * LAST_STEP


def step_times(ts) -> list:
    """The time of every head evaluation of a block: the N sampler times, then the final one,
    on the device of ``ts`` (a host tensor here would mean a host-to-device copy inside the
    head loop's CUDA graph, which capture refuses)."""
    return list(ts) + [torch.full((), T_FINAL, dtype=torch.float32, device=ts[0].device)]


def head_modulations(net, cond: torch.Tensor, times, dtype=torch.float32):
    """The x-independent outputs of a :class:`~bitdance_rt.models.head.HeadNet` for each time
    in ``times`` (0-d tensors): ``(ada, final)``, ``ada`` a list with one
    ``[len(times), R, P, 6C]`` tensor per shared adaLN block, ``final`` ``[len(times), R, P,
    2C]``. Each time is embedded on its own ``[R]`` rows, as the per-step network does."""
    rows, device = cond.shape[0], cond.device
    c_emb = net.cond_embed(cond.to(dtype))
    ys = []
    for t in times:
        t_rows = torch.full((rows,), 0.0, device=device)
        t_rows[:] = t.to(device)
        ys.append(F.silu(net.time_embed(t_rows).unsqueeze(1) + c_emb))
    return net.modulation(torch.stack(ys))


def sample_block_premodulated(net, cond: torch.Tensor, noise, guidance: float, ts, dts,
                              dtype=torch.float32, denoise=None) -> torch.Tensor:
    """Same result as :func:`sample_block`, cheaper: everything of the head that does not
    depend on x (condition embedding, adaLN and final-layer modulation, for all N + 1 step
    times) is computed once per block in one batch, so the per-step work is only the
    x-dependent part. ``net`` is a :class:`~bitdance_rt.models.head.HeadNet`.

    Each modulation row is computed exactly as in the per-step network (same row-wise
    arithmetic); only the batching of rows differs. ``denoise`` replaces ``net.denoise``
    (e.g. a compiled version).
    """
    denoise = denoise or net.denoise
    rows, device = cond.shape[0], cond.device
    ada, final = head_modulations(net, cond, step_times(ts), dtype)  # leading dim: step
    per_step = [([a[k] for a in ada], final[k]) for k in range(final.shape[0])]
    return run_sampler(lambda x_in, k, _t: denoise(x_in.to(dtype), per_step[k]), rows, device,
                       noise, guidance, ts, dts)
