"""The ``head_prepare`` graph: the part of the diffusion head that does not depend on x, for
every step of a block at once (as :func:`~bitdance_rt.sampling.sample_block_premodulated`).

Inputs
  cond       ``[S, P, H]`` float32          head condition; S = B (no guidance) or 2B (cond
                                            rows, then uncond rows)
  times      ``[N + 1]`` float32            the time of every head evaluation of the block,
                                            ``step_times(ts)``: the N sampler times, then 0.95
Outputs (in the export dtype)
  ada_mod    ``[N + 1, A, S, P, 6 C]``      per step, the output of each of the A shared adaLN
                                            blocks
  final_mod  ``[N + 1, S, P, 2 C]``         per step, the final layer's adaLN output

Per step k, ``y_k = silu(time_embed(times[k]) + cond_embed(cond))`` and the modulations are
``net.modulation(y_k)`` (:func:`~bitdance_rt.sampling.head_modulations`): the rows of the
per-step network, computed in one batch. The runtime calls this once per block and feeds
slice k of both outputs to ``head_step`` k.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sampling import head_modulations, step_schedule
from .common import GraphDef, dim

NAME = "head_prepare"


class HeadPrepare(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model.head.net
        self.dtype = model.dtype

    def forward(self, cond, times):
        ada, final = head_modulations(self.net, cond, times, self.dtype)
        return torch.stack(ada, dim=1), final


def pytorch_outputs(model, feeds: dict) -> dict:
    """:func:`~bitdance_rt.sampling.head_modulations` in PyTorch (the torch backend's code)."""
    with torch.no_grad():
        ada, final = head_modulations(model.head.net, feeds["cond"], feeds["times"], model.dtype)
    return {"ada_mod": torch.stack(ada, dim=1), "final_mod": final}


def random_inputs(model, gen: torch.Generator, rows: int, num_steps: int) -> dict:
    spec = model.spec
    times, _ = step_schedule(num_steps, spec.head.time_shift)
    return {"cond": torch.randn(rows, spec.parallel_num, spec.llm.hidden_size, generator=gen),
            "times": times}


def graph_def(model, batch: int = 2) -> GraphDef:
    gen = torch.Generator().manual_seed(0)
    example = random_inputs(model, gen, 2 * batch, 6)
    dynamic = {"cond": {0: dim("rows")}, "times": {0: dim("steps")}}
    return GraphDef(NAME, HeadPrepare(model), example, dynamic, ["ada_mod", "final_mod"])
