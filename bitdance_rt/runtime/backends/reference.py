"""The eager reference: the authors' generation semantics, kept as the baseline
every faster backend is compared against; a backend of the one AR loop like the others.

Like the authors' pipeline it runs the conditional and unconditional sequences as separate LLM
calls, grows the KV cache by concatenation, runs one LLM call after the last block and runs the
whole head network at every sampler step. Its float32 CPU output reproduces the authors'
pipeline token for token (``tests/test_pipeline.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from ...checkpoint import BitDanceModel
from ...models.kv_cache import ConcatKVCache
from ...models.steps import block_step, decode_tokens, image_start, prompt_pass, tile_rows
from ...request import ImagePlan
from ...sampling import sample_block, step_schedule
from ..backend import Backend
from ..buffers import block_posembs


class HeadFn:
    """The head network as the sampler sees it: float32 in and out, model dtype inside."""

    def __init__(self, model: BitDanceModel):
        self.net = model.head.net
        self.dtype = model.dtype

    def __call__(self, x, t, cond):
        return self.net(x.to(self.dtype), t, cond.to(self.dtype)).float()


class ReferenceBackend(Backend):
    """Eager generation with the authors' semantics (and their inefficiencies)."""

    name = "reference"
    final_block_step = True
    can_drop = True

    def __init__(self, model: BitDanceModel):
        self.model = model
        self.device = model.device
        self.parallel_num = model.spec.parallel_num
        self.ch_target = model.spec.head.ch_target
        self.gan_decoder = model.spec.ae.gan_decoder
        self.head_fn = HeadFn(model)

    def begin(self, plan: ImagePlan) -> None:
        self.plan = plan
        self.groups = [(a, b, ConcatKVCache(self.model.spec.llm.num_hidden_layers))
                       for a, b, _ in plan.groups()]
        self.pe = block_posembs(self.model.spec, plan.h, plan.w, self.device)
        times, coeffs = step_schedule(plan.steps, self.model.spec.head.time_shift)
        self.times, self.coeffs = times.to(self.device), coeffs.to(self.device)

    def prefill(self) -> torch.Tensor:
        """Per prompt: its B rows causally, then their image-start block."""
        p, rows = self.parallel_num, self.plan.row_ids()
        conds = []
        for a, b, cache in self.groups:
            ids = torch.tensor(rows[a:b], device=self.device)
            prompt_pass(self.model, ids[:, :-p], cache)
            conds.append(image_start(self.model, ids[:, -p:], cache, self.pe[0]))
        return torch.cat(conds)

    def sample_head(self, cond, noise):
        return sample_block(self.head_fn, cond, noise, self.plan.guidance, self.times,
                            self.coeffs)

    def block_step(self, tokens, block):
        rows = tile_rows(tokens, self.plan.rows)
        return torch.cat([block_step(self.model, rows[a:b], self.pe[block], self.pe[block + 1],
                                     cache) for a, b, cache in self.groups])

    def drop(self, keep, cond):
        """Keep only the rows of the kept images in every prompt's cache."""
        plan, b = self.plan, self.plan.images
        rows = keep + ([b + i for i in keep] if plan.cfg else [])
        groups, start = [], 0
        for a, e, cache in self.groups:
            local = [r - a for r in rows if a <= r < e]
            if not local:
                continue
            index = torch.tensor(local, device=self.device)
            cache.k = [t.index_select(0, index) for t in cache.k]
            cache.v = [t.index_select(0, index) for t in cache.v]
            groups.append((start, start + len(local), cache))
            start += len(local)
        self.groups = groups
        self.plan = dataclasses.replace(plan, cond_ids=tuple(plan.cond_ids[i] for i in keep))
        return cond.index_select(0, torch.tensor(rows, device=self.device))

    def decode(self, tokens, noise):
        return decode_tokens(self.model, tokens, self.plan.h, self.plan.w, noise)
