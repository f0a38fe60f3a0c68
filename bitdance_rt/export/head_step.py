"""The ``head_step`` graph: one sampler step of the diffusion head, guidance fused in.

Only the x-dependent part of the network runs here (``HeadNet.denoise``); the condition
embedding and the modulations of every step of the block come from one ``head_prepare`` call.

Inputs
  x          ``[B, P, 32]`` float32     current sample
  t          ``[1]`` float32            time of this network evaluation
  coeffs     ``[3]`` float32            ``(dt, score_weight, noise_scale)`` of this step
  noise      ``[B, P, 32]`` float32     the step's standard normal draw (any values when
                                        noise_scale is 0)
  ada_mod    ``[A, S, P, 6 C]``         this step's slice of ``head_prepare``'s outputs (export
  final_mod  ``[S, P, 2 C]``            dtype); S = B (no guidance) or 2B (cond rows, then
                                        uncond rows)
  guidance   ``[1]`` float32            the guidance scale g (ignored when S = B)
Output
  x_next     ``[B, P, 32]`` float32

The step, written in :mod:`bitdance_rt.sampling`'s order of operations::

    f      = denoise(x, (ada_mod, final_mod))            the head's x_0 prediction at time t
    v      = (f - x) / max(1 - t, 0.05)                  then v = v_u + g (v_c - v_u)
    score  = (t v - x) / ((1 - t)^2 + t (1 - t))
    x_next = x + (v + score_weight * ((1 - t) * score)) * dt + noise_scale * noise

Euler-Maruyama step k: ``t = t_k``, coefficients ``(dt_k, 1, sqrt(2 (1 - t_k) dt_k))``. Final
Euler step: ``t = 0.95``, ``(0.05, 0, 0)``, which gives exactly ``x + 0.05 v``. In closed form
the EM step is ``x_next = (1 - dt) x + (1 + t) dt v + sqrt(2 (1 - t) dt) noise`` (the variance
simplifies to 1 - t), but keeping the reference's operations keeps the result within rounding of
the PyTorch backend. With S = B the guidance formula reduces to v exactly (v_u = v_c).
"""

from __future__ import annotations

import torch
from torch import nn

from ..sampling import LAST_STEP, T_FINAL, em_update, guide, velocity
from .common import GraphDef, dim, tile_rows
from .head_prepare import modulations

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

    def forward(self, x, t, coeffs, noise, ada_mod, final_mod, guidance):
        rows, b = final_mod.shape[0], x.shape[0]
        x_in = tile_rows(x, rows)
        t_rows = t.expand(rows)
        ada = [ada_mod[i] for i in range(ada_mod.shape[0])]
        out = self.net.denoise(x_in.to(self.dtype), (ada, final_mod)).float()
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
    """The same step through :mod:`bitdance_rt.sampling` and the head's ``denoise``
    (PyTorch)."""
    x, t, coeffs = feeds["x"], feeds["t"], feeds["coeffs"]
    ada, final, g = feeds["ada_mod"], feeds["final_mod"], float(feeds["guidance"][0])
    rows, b = final.shape[0], x.shape[0]
    cfg_mult = rows // b
    x_in = torch.cat([x] * cfg_mult, dim=0)
    t_rows = t.expand(rows).clone()
    f = model.head.net.denoise(x_in.to(model.dtype), (list(ada.unbind(0)), final)).float()
    v = guide(velocity(f, x_in, t_rows), g, cfg_mult)
    if float(coeffs[1]) == 0.0:  # the final Euler step
        return {"x_next": x + v * float(coeffs[0])}
    return {"x_next": em_update(x, v, t[0], coeffs[0], feeds["noise"])}


def random_inputs(model, gen: torch.Generator, batch: int, guided: bool, final: bool) -> dict:
    """A step's inputs; the modulations are those of a random condition at the step's time
    (``head_prepare``'s PyTorch reference), so they have the scale the runtime feeds."""
    from ..sampling import time_grid

    spec = model.spec
    p, c, hid = spec.parallel_num, spec.head.ch_target, spec.llm.hidden_size
    steps = step_inputs(*time_grid(6, spec.head.time_shift))
    t, coeffs = steps[-1] if final else steps[int(torch.randint(0, 6, (1,), generator=gen))]
    rows = 2 * batch if guided else batch
    cond = torch.randn(rows, p, hid, generator=gen)
    with torch.no_grad():
        ada, final_mod = modulations(model.head.net, cond, t, model.dtype)
    return {"x": torch.randn(batch, p, c, generator=gen), "t": t, "coeffs": coeffs,
            "noise": torch.randn(batch, p, c, generator=gen), "ada_mod": ada[0],
            "final_mod": final_mod[0], "guidance": torch.tensor([4.5 if guided else 1.0])}


def graph_def(model, batch: int = 2) -> GraphDef:
    gen = torch.Generator().manual_seed(0)
    example = random_inputs(model, gen, batch, guided=True, final=False)
    B, S = dim("batch"), dim("rows")
    dynamic = {"x": {0: B}, "t": None, "coeffs": None, "noise": {0: B}, "ada_mod": {1: S},
               "final_mod": {0: S}, "guidance": None}
    return GraphDef(NAME, HeadStep(model), example, dynamic, ["x_next"])
