"""The ``head_step`` graph: one sampler step of the diffusion head, guidance fused in.

Only the x-dependent part of the network runs here (``HeadNet.denoise``); the condition
embedding and the modulations of every step of the block come from one ``head_prepare`` call.

Inputs
  x          ``[B, P, 32]`` float32     current sample
  coeffs     ``[6]`` float32            this step's coefficients, ``(t, max(1 - t, 0.05), var,
                                        w (1 - t), dt, noise_scale)``
                                        (:func:`~bitdance_rt.sampling.step_schedule`)
  noise      ``[B, P, 32]`` float32     the step's standard normal draw (any finite values
                                        when noise_scale is 0)
  ada_mod    ``[A, S, P, 6 C]``         this step's slice of ``head_prepare``'s outputs (export
  final_mod  ``[S, P, 2 C]``            dtype); S = B (no guidance) or 2B (cond rows, then
                                        uncond rows)
  guidance   ``[1]`` float32            the guidance scale g (ignored when S = B)
Output
  x_next     ``[B, P, 32]`` float32

The step (:func:`~bitdance_rt.sampling.head_step`, in the reference's order of operations)::

    f      = denoise(x, (ada_mod, final_mod))            the head's x_0 prediction at time t
    v      = (f - x) / max(1 - t, 0.05)                  then v = v_u + g (v_c - v_u)
    score  = (t v - x) / var
    x_next = x + (v + w (1 - t) score) dt + noise_scale noise

An Euler-Maruyama step has ``w = 1``; the final Euler step (``t = 0.95``, ``dt = 0.05``,
``w = noise_scale = 0``) gives exactly ``x + 0.05 v``. With S = B the guidance formula
reduces to v exactly (v_u = v_c).
"""

from __future__ import annotations

import torch
from torch import nn

from ..sampling import head_modulations, head_step, step_schedule
from .common import GraphDef, dim

NAME = "head_step"


class HeadStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model.head.net
        self.dtype = model.dtype

    def forward(self, x, coeffs, noise, ada_mod, final_mod, guidance):
        ada = [ada_mod[i] for i in range(ada_mod.shape[0])]
        return head_step(lambda x_in: self.net.denoise(x_in.to(self.dtype), (ada, final_mod)),
                         x, coeffs, noise, guidance, final_mod.shape[0])


def pytorch_outputs(model, feeds: dict) -> dict:
    """The same step through the PyTorch backend's code (eager, Python guidance scale)."""
    ada, final = feeds["ada_mod"], feeds["final_mod"]
    net = model.head.net
    with torch.no_grad():
        x = head_step(lambda x_in: net.denoise(x_in.to(model.dtype), (list(ada.unbind(0)), final)),
                      feeds["x"], feeds["coeffs"], feeds["noise"], float(feeds["guidance"][0]),
                      final.shape[0])
    return {"x_next": x}


def random_inputs(model, gen: torch.Generator, batch: int, guided: bool, final: bool) -> dict:
    """A step's inputs; the modulations are those of a random condition at the step's time
    (``head_prepare``'s PyTorch reference), so they have the scale the runtime feeds."""
    spec = model.spec
    p, c, hid = spec.parallel_num, spec.head.ch_target, spec.llm.hidden_size
    times, coeffs = step_schedule(6, spec.head.time_shift)
    k = 6 if final else int(torch.randint(0, 6, (1,), generator=gen))
    rows = 2 * batch if guided else batch
    cond = torch.randn(rows, p, hid, generator=gen)
    with torch.no_grad():
        ada, final_mod = head_modulations(model.head.net, cond, times[k:k + 1], model.dtype)
    return {"x": torch.randn(batch, p, c, generator=gen), "coeffs": coeffs[k], "noise": torch.randn(batch, p, c, generator=gen),
            "ada_mod": torch.stack(ada, dim=1)[0], "final_mod": final_mod[0],
            "guidance": torch.tensor([4.5 if guided else 1.0])}


def graph_def(model, batch: int = 2) -> GraphDef:
    gen = torch.Generator().manual_seed(0)
    example = random_inputs(model, gen, batch, guided=True, final=False)
    B, S = dim("batch"), dim("rows")
    dynamic = {"x": {0: B}, "coeffs": None, "noise": {0: B}, "ada_mod": {1: S},
               "final_mod": {0: S}, "guidance": None}
    return GraphDef(NAME, HeadStep(model), example, dynamic, ["x_next"])
