"""The ``head_step`` graph: one sampler step of the diffusion head, guidance fused in.

Inputs
  x          ``[B, P, 32]`` float32  current sample
  t          ``[1]`` float32         time of this network evaluation
  coeffs     ``[3]`` float32         ``(dt, score_weight, noise_scale)`` of this step
  noise      ``[B, P, 32]`` float32  the step's standard normal draw (any values when
                                     noise_scale is 0)
  cond       ``[S, P, H]`` float32   head condition; S = B (no guidance) or 2B (cond rows,
                                     then uncond rows)
  guidance   ``[1]`` float32         the guidance scale g (ignored when S = B)
Output
  x_next     ``[B, P, 32]`` float32

The step, written in :mod:`bitdance_rt.sampling`'s order of operations::

    v      = (f(x, t, cond) - x) / max(1 - t, 0.05)      then v = v_u + g (v_c - v_u)
    score  = (t v - x) / ((1 - t)^2 + t (1 - t))
    x_next = x + (v + score_weight * ((1 - t) * score)) * dt + noise_scale * noise

Euler-Maruyama step k: ``t = t_k``, coefficients ``(dt_k, 1, sqrt(2 (1 - t_k) dt_k))``. Final
Euler step: ``t = 0.95``, ``(0.05, 0, 0)``, which gives exactly ``x + 0.05 v``. In closed form
the EM step is ``x_next = (1 - dt) x + (1 + t) dt v + sqrt(2 (1 - t) dt) noise`` (the variance
simplifies to 1 - t), but keeping the reference's operations keeps the result within rounding of
the PyTorch backend. With S = B the guidance formula reduces to v exactly (v_u = v_c).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import LAST_STEP, T_FINAL, em_update, guide, velocity
from .common import GraphDef, dim, tile_rows

NAME = "head_step"


def step_inputs(ts, dts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(t [1], coeffs [3])`` of the N + 1 head steps of a block (float32, on the CPU)."""
    steps = []
    for t, dt in zip(ts, dts):
        noise_scale = (2.0 * (1.0 - t) * dt) ** 0.5  # the reference's expression, float32
        steps.append((t.reshape(1).float(),
                      torch.stack([dt.float(), torch.tensor(1.0), noise_scale.float()])))
    final = torch.tensor([T_FINAL], dtype=torch.float32)
    steps.append((final, torch.tensor([LAST_STEP, 0.0, 0.0], dtype=torch.float32)))
    return steps


class HeadStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model.head.net
        self.dtype = model.dtype
        # The sinusoid frequencies of the time embedding as a constant computed by PyTorch,
        # exactly as :func:`~bitdance_rt.models.head.timestep_embedding` computes them. Left in
        # the graph, exp() is evaluated elsewhere and may differ by an ulp, which at 1000 t ~ 950
        # moves cos/sin by ~1e-5 (ten times the rest of the graph's error).
        freq_dim = self.net.time_embed.freq_dim
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(
            -math.log(10000.0) * torch.arange(0, half, dtype=torch.float32) / half),
            persistent=False)

    def time_embedding(self, t_rows):
        args = (1000.0 * t_rows.float())[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.net.time_embed.mlp(emb.to(self.net.time_embed.mlp[0].weight.dtype))

    def network(self, x, t_rows, cond):
        """``net(x, t, cond)`` (HeadNet.forward) with the time embedding above."""
        net = self.net
        y = F.silu(self.time_embedding(t_rows).unsqueeze(1) + net.cond_embed(cond))
        return net.denoise(x, net.modulation(y))

    def forward(self, x, t, coeffs, noise, cond, guidance):
        rows, b = cond.shape[0], x.shape[0]
        x_in = tile_rows(x, rows)
        t_rows = t.expand(rows)
        out = self.network(x_in.to(self.dtype), t_rows, cond.to(self.dtype)).float()
        v = (out - x_in) / (1 - t_rows.view(-1, 1, 1)).clamp_min(LAST_STEP)
        first = torch.arange(b, device=x.device)
        v_c = v.index_select(0, first)
        v_u = v.index_select(0, first + (rows - b))
        v = v_u + guidance * (v_c - v_u)
        dt, score_weight, noise_scale = coeffs[0], coeffs[1], coeffs[2]
        t = t[0]
        var = (1 - t) ** 2 - (t / 1 * -1) * (1 - t)
        score = (t / 1 * v - x) / var
        drift = v + score_weight * ((1 - t) * score)
        return x + drift * dt + noise_scale * noise


def reference(model, feeds: dict) -> dict:
    """The same step through :mod:`bitdance_rt.sampling` and the head module (PyTorch)."""
    x, t, coeffs = feeds["x"], feeds["t"], feeds["coeffs"]
    cond, g = feeds["cond"], float(feeds["guidance"][0])
    rows, b = cond.shape[0], x.shape[0]
    cfg_mult = rows // b
    x_in = torch.cat([x] * cfg_mult, dim=0)
    t_rows = t.expand(rows).clone()
    f = model.head.net(x_in.to(model.dtype), t_rows, cond.to(model.dtype)).float()
    v = guide(velocity(f, x_in, t_rows), g, cfg_mult)
    if float(coeffs[1]) == 0.0:  # the final Euler step
        return {"x_next": x + v * float(coeffs[0])}
    return {"x_next": em_update(x, v, t[0], coeffs[0], feeds["noise"])}


def random_inputs(model, gen: torch.Generator, batch: int, guided: bool, final: bool) -> dict:
    from ..sampling import time_grid

    spec = model.spec
    p, c, hid = spec.parallel_num, spec.head.ch_target, spec.llm.hidden_size
    steps = step_inputs(*time_grid(6, spec.head.time_shift))
    t, coeffs = steps[-1] if final else steps[int(torch.randint(0, 6, (1,), generator=gen))]
    rows = 2 * batch if guided else batch
    return {"x": torch.randn(batch, p, c, generator=gen), "t": t, "coeffs": coeffs,
            "noise": torch.randn(batch, p, c, generator=gen),
            "cond": torch.randn(rows, p, hid, generator=gen),
            "guidance": torch.tensor([4.5 if guided else 1.0])}


def graph_def(model, batch: int = 2) -> GraphDef:
    gen = torch.Generator().manual_seed(0)
    example = random_inputs(model, gen, batch, guided=True, final=False)
    B, S = dim("batch"), dim("rows")
    dynamic = {"x": {0: B}, "t": None, "coeffs": None, "noise": {0: B}, "cond": {0: S},
               "guidance": None}
    return GraphDef(NAME, HeadStep(model), example, dynamic, ["x_next"])
