"""The head sampler (the authors', as bitdance_rt/runtime/backends/reference.py runs it):
Euler-Maruyama steps with a final Euler step, and the random numbers it draws.

Every backend and every exported graph computes a step with these functions: the schedule
(:func:`time_grid`, :func:`step_schedule`), the velocity and guidance (:func:`head_step`,
:func:`guide`), the update (:func:`sampler_update`, both step kinds) and the x-independent part
of the head (:func:`head_modulations`). Arithmetic is written in the reference's order of
operations (float32 throughout), so a CPU float32 run reproduces the reference bit for bit.

Random numbers never come from the global generator: a :class:`NoiseSource` holds one
``torch.Generator`` per request and draws each request's tensors in the reference order, so a
request gives the same image alone, after another one, or batched with others.
"""

from __future__ import annotations

import torch

from .models.steps import tile_rows

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


# Columns of a step's coefficients (see step_schedule)
T, DENOM, VAR, DRIFT_W, DT, NOISE = range(6)


def step_schedule(num_steps: int, time_shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head evaluation of a block, as data: times ``[N + 1]`` (the N sampler times, then
    0.95) and coefficients ``[N + 1, 6]``, per step ``(t, max(1 - t, 0.05), var, w (1 - t),
    dt, noise_scale)`` with ``var = (1 - t)^2 + t (1 - t)``. An Euler-Maruyama step has
    ``w = 1`` and ``noise_scale = sqrt(2 (1 - t) dt)``; the final Euler step ``t = 0.95``,
    ``dt = 0.05``, ``w = noise_scale = 0``. Each value is computed once, with the reference's
    expressions on the same float32 scalars, so a step computed from them equals the
    reference's step bit for bit. Float32, on the CPU."""
    ts, dts = time_grid(num_steps, time_shift)
    rows = [step_coeffs(t, dt) for t, dt in zip(ts, dts)]
    rows.append(step_coeffs(torch.tensor(T_FINAL), torch.tensor(LAST_STEP), final=True))
    coeffs = torch.stack(rows).float()
    return coeffs[:, T].clone(), coeffs


def step_coeffs(t: torch.Tensor, dt: torch.Tensor, final: bool = False) -> torch.Tensor:
    """``[6]``: one step's coefficients (see :func:`step_schedule`), in t's dtype."""
    var = (1 - t) ** 2 - (t / 1 * -1) * (1 - t)
    w = 0.0 if final else 1.0
    scale = torch.zeros_like(t) if final else (2.0 * (1.0 - t) * dt) ** 0.5
    return torch.stack([t, (1 - t).clamp_min(LAST_STEP), var, w * (1 - t), dt, scale])


def guide(v: torch.Tensor, guidance, batch) -> torch.Tensor:
    """``v_u + g (v_c - v_u)`` over rows ``[cond (B); uncond (B)]``; with B rows only (no
    guidance) it is v itself (as ``v + g * 0`` in a traced graph, whose rows are symbolic).
    ``guidance`` a float or a ``[1]`` tensor."""
    rows = v.shape[0]
    if isinstance(rows, int) and isinstance(batch, int) and rows == batch:
        return v
    v_c, v_u = v.narrow(0, 0, batch), v.narrow(0, rows - batch, batch)
    return v_u + guidance * (v_c - v_u)


def sampler_update(x, v, coeffs, noise):
    """One sampler step given the guided velocity, with a step's ``coeffs`` (see
    :func:`step_schedule`), in the reference's order of operations::

        score = (t v - x) / var;  drift = v + w (1 - t) score
        x_next = x + drift dt + noise_scale noise

    (Euler-Maruyama: drift ``v + (1 - t) score``; the final Euler step: exactly ``x + dt v``.)"""
    score = (coeffs[T] * v - x) / coeffs[VAR]
    drift = v + coeffs[DRIFT_W] * score
    return x + drift * coeffs[DT] + coeffs[NOISE] * noise


def em_update(x, v, t, dt, noise):
    """One Euler-Maruyama update at time t (0-d tensor) with step dt."""
    return sampler_update(x, v, step_coeffs(t, dt), noise)


def head_step(denoise, x, coeffs, noise, guidance, rows):
    """One head evaluation and its update: ``denoise(x_in)`` is the head's x_0 prediction for
    the rows ``[x; x]`` (with guidance) or ``x``; ``coeffs`` ``[6]`` (see
    :func:`step_schedule`)."""
    x_in = tile_rows(x, rows)
    v = (denoise(x_in).float() - x_in) / coeffs[DENOM]
    return sampler_update(x, guide(v, guidance, x.shape[0]), coeffs, noise)


def run_steps(step, x0: torch.Tensor, noise: list, num_evaluations: int) -> torch.Tensor:
    """The loop of one block's sampling, written once: ``step(k, x, noise_k)`` is evaluation
    k (its head call and update, however a backend runs them) for k = 0 .. N (the N
    Euler-Maruyama steps, then the final Euler step); ``noise`` holds the N Euler-Maruyama
    draws (the final step draws none: it gets x, which its coefficients scale by 0)."""
    x = x0
    for k in range(num_evaluations):
        x = step(k, x, noise[k] if k < len(noise) else x)
    return x


def run_sampler(denoise_at, x0, noise, coeffs, guidance, rows: int) -> torch.Tensor:
    """The sampling loop of one block: ``denoise_at(k, x_in)`` evaluates the head at step k;
    ``noise`` the N tensors of the Euler-Maruyama steps (the final step draws none)."""
    return run_steps(
        lambda k, x, step_noise: head_step(lambda x_in: denoise_at(k, x_in), x, coeffs[k],
                                           step_noise, guidance, rows),
        x0, noise, coeffs.shape[0])


def sample_block(net, cond: torch.Tensor, noise: list[torch.Tensor], guidance: float,
                 times, coeffs) -> torch.Tensor:
    """The reference sampler for one block: the whole head network ``net(x_t, t_rows, cond)``
    at every step, as the authors' pipeline runs it. ``noise`` = x_0, then one tensor per
    Euler-Maruyama step; returns x ``[B, P, 32]`` (float32, before ``sign``)."""
    rows = cond.shape[0]
    return run_sampler(lambda k, x_in: net(x_in, times[k].expand(rows), cond), noise[0],
                       noise[1:], coeffs, guidance, rows)


def head_modulations(net, cond: torch.Tensor, times: torch.Tensor, dtype=None):
    """The x-independent outputs of a :class:`~bitdance_rt.models.head.HeadNet` for every
    time of ``times`` ``[N + 1]``, in one batch: ``(ada, final)``, ``ada`` a list with one
    ``[N + 1, R, P, 6C]`` tensor per shared adaLN block, ``final`` ``[N + 1, R, P, 2C]``. Row
    for row the same arithmetic as the per-step network."""
    rows = cond.shape[0]
    t_rows = times[:, None].expand(times.shape[0], rows)
    return net.modulation(net.conditioning(t_rows, cond.to(dtype or cond.dtype)))


def premodulated(net, modulations, dtype, denoise=None):
    """``denoise_at(k, x_in)`` of step k given :func:`head_modulations`' ``(ada, final)``:
    only the x-dependent part of the head (``net.denoise``, or ``denoise``, e.g. compiled)."""
    denoise = denoise or net.denoise
    ada, final = modulations  # leading dim: step
    return lambda k, x_in: denoise(x_in.to(dtype), ([a[k] for a in ada], final[k]))


def sample_block_premodulated(net, cond: torch.Tensor, noise, guidance, times, coeffs,
                              dtype=torch.float32, denoise=None) -> torch.Tensor:
    """Same result as :func:`sample_block`, cheaper: the x-independent part of the head for
    all N + 1 step times is computed once per block (:func:`head_modulations`), so each step
    runs only ``net.denoise``. ``denoise`` replaces ``net.denoise`` (e.g. compiled). The torch
    backend's sampler (eager and in a CUDA graph)."""
    mods = head_modulations(net, cond, times, dtype)
    return run_sampler(premodulated(net, mods, dtype, denoise), noise[0], noise[1:], coeffs,
                       guidance, cond.shape[0])


class NoiseSource:
    """The random numbers of one AR run: one ``torch.Generator`` per request, each drawing its
    images' tensors in the reference order (per block: x_0, then one tensor per
    Euler-Maruyama step; after all blocks, a gan-decoder's noise). A request's draws are those
    of the reference pipeline seeded with its seed, whatever else is in the batch.

    Images can be dropped from a run (:meth:`keep`): a request still draws for all of its
    images, so the images it keeps get exactly the numbers they got before, and a request with
    no image left stops drawing."""

    def __init__(self, parts: list[tuple[torch.Generator, int | None]]):
        if not parts:
            raise ValueError("a NoiseSource needs at least one generator")
        self.parts = parts
        self._kept = None  # per part, the kept image rows of its draws (None: all)

    @classmethod
    def from_seeds(cls, seeds, device) -> "NoiseSource":
        """``seeds``: an int (one request), or ``(seed, images)`` pairs, one per request."""
        device = torch.device(device)
        if isinstance(seeds, int):
            seeds = [(seeds, None)]
        return cls([(torch.Generator(device).manual_seed(int(s)), n) for s, n in seeds])

    def _counts(self, images: int) -> list[int]:
        counts = [n for _, n in self.parts]
        if None in counts:  # a single request: all images
            counts = [images]
        if self._kept is None and sum(counts) != images:
            raise ValueError(f"the noise source draws for {sum(counts)} images, the plan has "
                             f"{images}")
        return counts

    def keep(self, images: list[int], total: int) -> None:
        """From now on draw only for ``images`` (indices among the ``total`` images the source
        was made for)."""
        counts, kept, start = self._counts(total), [], 0
        for n in counts:
            kept.append([i - start for i in images if start <= i < start + n])
            start += n
        self.parts = [(g, n) for (g, _), n in zip(self.parts, counts)]
        self._kept = kept

    def _draw(self, shape_per_image: tuple, images: int, device) -> torch.Tensor:
        out = []
        for i, ((g, _), n) in enumerate(zip(self.parts, self._counts(images))):
            rows = None if self._kept is None else self._kept[i]
            if rows == []:
                continue  # every image of this request was dropped
            x = torch.randn((n,) + tuple(shape_per_image), device=device, generator=g)
            out.append(x if rows is None or len(rows) == n else x[rows])
        return torch.cat(out)

    def block(self, images: int, tokens: int, channels: int, steps: int, device) -> list:
        """x_0 and the N Euler-Maruyama draws of one block, ``[B, P, C]`` each."""
        return [self._draw((tokens, channels), images, device) for _ in range(steps + 1)]

    def decoder(self, images: int, channels: int, h: int, w: int, device) -> torch.Tensor:
        """A gan-decoder's noise ``[B, C, h, w]`` (drawn after every block)."""
        return self._draw((channels, h, w), images, device)
