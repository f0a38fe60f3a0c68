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
``net.modulation(y_k)``: the rows of the per-step network, computed in one batch. The runtime
calls this once per block and feeds slice k of both outputs to ``head_step`` k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import head_modulations, step_times
from .common import GraphDef, dim

NAME = "head_prepare"


class HeadPrepare(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model.head.net
        self.dtype = model.dtype
        # The sinusoid frequencies of the time embedding as a constant computed by PyTorch,
        # exactly as :func:`~bitdance_rt.models.head.timestep_embedding` computes them. Left in
        # the graph, exp() is evaluated elsewhere and may differ by an ulp, which at 1000 t ~ 950
        # moves cos/sin by ~1e-5 (ten times the rest of the graph's error).
        half = self.net.time_embed.freq_dim // 2
        self.register_buffer("freqs", torch.exp(
            -math.log(10000.0) * torch.arange(0, half, dtype=torch.float32) / half),
            persistent=False)

    def time_embedding(self, t_rows):
        """``time_embed`` of ``[R]`` times -> ``[R, C]``."""
        args = (1000.0 * t_rows.float())[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.net.time_embed.mlp(emb.to(self.net.time_embed.mlp[0].weight.dtype))

    def forward(self, cond, times):
        net = self.net
        rows = cond.shape[0]
        c_emb = net.cond_embed(cond.to(self.dtype))  # [S, P, C]
        # One time per row, as the per-step network sees it: a matrix product over one row
        # (the time alone) may round differently from the same row within a batch.
        t_rows = times[:, None].expand(-1, rows).reshape(-1)  # [(N + 1) S]
        emb = self.time_embedding(t_rows).view(times.shape[0], rows, 1, -1)
        y = F.silu(emb + c_emb)  # [N + 1, S, P, C]
        ada, final = net.modulation(y)
        return torch.stack(ada, dim=1), final


def modulations(net, cond: torch.Tensor, times, dtype=torch.float32):
    """``(ada_mod, final_mod)`` in PyTorch, row by row as
    :func:`~bitdance_rt.sampling.sample_block_premodulated` computes them (``times``: the
    ``N + 1`` step times)."""
    ada, final = head_modulations(net, cond, times, dtype)
    return torch.stack(ada, dim=1), final


def reference(model, feeds: dict) -> dict:
    ada, final = modulations(model.head.net, feeds["cond"], feeds["times"].unbind(0),
                             model.dtype)
    return {"ada_mod": ada, "final_mod": final}


def random_inputs(model, gen: torch.Generator, rows: int, num_steps: int) -> dict:
    from ..sampling import time_grid

    spec = model.spec
    ts, _ = time_grid(num_steps, spec.head.time_shift)
    return {"cond": torch.randn(rows, spec.parallel_num, spec.llm.hidden_size, generator=gen),
            "times": torch.stack(step_times(ts))}


def graph_def(model, batch: int = 2) -> GraphDef:
    gen = torch.Generator().manual_seed(0)
    example = random_inputs(model, gen, 2 * batch, 6)
    dynamic = {"cond": {0: dim("rows")}, "times": {0: dim("steps")}}
    return GraphDef(NAME, HeadPrepare(model), example, dynamic, ["ada_mod", "final_mod"])
