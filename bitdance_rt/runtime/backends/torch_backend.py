"""The PyTorch backend: one batched LLM call per block for all 2B sequences over a static KV
cache written in place, the x-independent part of the head once per block, and on CUDA the
head sampling loop and the block step replayed as CUDA graphs.

It computes with the same functions as the reference (:mod:`bitdance_rt.models.steps`,
:mod:`bitdance_rt.sampling`), so on the CPU in float32 it reproduces the reference's image.

Buffers are kept while they are large enough: the KV cache (rows x slots), the position
embeddings of a size, the captured graphs. A plan with fewer images or shorter prompts reuses
them; with CUDA graphs its images are placed in the captured batch (the spare rows compute
nothing anyone reads). Only a larger plan, another size or another step count allocates or
captures again, after the memory check.
"""

from __future__ import annotations

import dataclasses

import torch

from ...checkpoint import BitDanceModel
from ...models.kv_cache import StaticKVCache
from ...models.steps import block_step, decode_tokens, image_start, prompt_pass, tile_rows
from ...request import ImagePlan, row_groups
from ...sampling import sample_block_premodulated, step_schedule
from .. import graphs
from ..backend import Backend
from ..buffers import available_memory, block_posembs, ensure_cache_fits, modulation_bytes
from ..timing import model_meter_modules, watch_modules

PROMPT_ROOM = 256


class TorchBackend(Backend):
    name = "torch"
    can_drop = True

    def __init__(self, model: BitDanceModel, cuda_graphs: bool | None = None,
                 compile: bool = False, use_plugin: bool = True, emulate_graphs: bool = False):
        """``cuda_graphs``: replay the head loop and the block step as CUDA graphs (default:
        on CUDA). ``emulate_graphs`` runs the graph code paths on the CPU through
        :class:`~bitdance_rt.runtime.graphs.RecordedGraph` (tests)."""
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.spec = model.spec
        self.parallel_num = model.spec.parallel_num
        self.ch_target = model.spec.head.ch_target
        self.gan_decoder = model.spec.ae.gan_decoder
        on_cuda = self.device.type == "cuda"
        self.emulate = emulate_graphs
        self.graphs = emulate_graphs or (on_cuda and cuda_graphs is not False)
        # The fused op (CPU: SDPA as the reference calls it; CUDA: the Triton kernel), or the
        # plain-PyTorch form of the same contract (an independent check of the op).
        from ...attention import kv_attention, kv_attention_ref

        self.attention = kv_attention if use_plugin or self.graphs else kv_attention_ref
        self.head_net = model.head.net
        self.denoise = torch.compile(self.head_net.denoise) if compile else None
        self.storage: StaticKVCache | None = None  # the KV cache at its capacity
        self.cache: StaticKVCache | None = None    # the rows of the current plan
        self._pe = {}
        self._schedules = {}
        self._head_graphs = {}
        self._block_graphs = {}
        self._views = {}
        self._graph_batch = {}
        self.plan = None

    # -- buffers ---------------------------------------------------------------------------

    def _images(self, plan: ImagePlan) -> int:
        """The batch the plan runs at: its own, or with graphs the largest captured one."""
        if not self.graphs:
            return plan.images
        n = max(plan.images, self._graph_batch.get(plan.cfg, 0))
        self._graph_batch[plan.cfg] = n
        return n

    def begin(self, plan: ImagePlan) -> None:
        cfg, p = self.spec.llm, self.parallel_num
        self.plan = plan
        self.images = self._images(plan)
        rows = self.images * (2 if plan.cfg else 1)
        max_len = plan.max_len(p)
        old = self.storage
        if old is None or rows > old.k.shape[1] or max_len > old.max_len:
            # Larger than what we hold: drop the graphs (they point at the old buffers), check
            # the memory, allocate at the new capacity.
            self.storage, self.cache, self._views = None, None, {}
            self._head_graphs, self._block_graphs = {}, {}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the old buffers' memory counts as free again
            cap_rows = max(rows, old.k.shape[1] if old is not None else 0)
            # room for prompts up to the next multiple of PROMPT_ROOM tokens, so that another
            # prompt length does not reallocate
            longest = max_len - plan.tokens + p
            room = -(-longest // PROMPT_ROOM) * PROMPT_ROOM
            # (and at least two blocks: a block-step graph's capture writes two)
            cap_len = max(max_len + room - longest, old.max_len if old is not None else 0,
                          2 * p)
            del old
            need = StaticKVCache.nbytes_for(cfg.num_hidden_layers, cap_rows,
                                            cfg.num_key_value_heads, cap_len, cfg.head_dim,
                                            self.dtype)
            ensure_cache_fits(need, available_memory(self.device), cap_rows, cap_len,
                              self.device,
                              extra=modulation_bytes(self.spec, cap_rows, plan.steps, self.dtype))
            self.storage = StaticKVCache(cfg.num_hidden_layers, cap_rows,
                                         cfg.num_key_value_heads, cap_len, cfg.head_dim,
                                         self.dtype, self.device, attention=self.attention)
        if rows not in self._views:  # one view object per row count: graphs hold it
            self._views[rows] = self.storage.rows(0, rows)
        self.cache = self._views[rows]
        self.cache.reset()
        if (plan.h, plan.w) not in self._pe:
            self._pe[(plan.h, plan.w)] = block_posembs(self.spec, plan.h, plan.w, self.device)
        self.pe_blocks = self._pe[(plan.h, plan.w)]
        if plan.steps not in self._schedules:
            times, coeffs = step_schedule(plan.steps, self.spec.head.time_shift)
            self._schedules[plan.steps] = (times.to(self.device), coeffs.to(self.device))
        self.times, self.coeffs = self._schedules[plan.steps]

    def _row_ids(self) -> list:
        """The sequence of every cache row: the plan's rows, with graphs padded to the captured
        batch by repeating the first image's sequences (their results are not read)."""
        plan, pad = self.plan, self.images - self.plan.images
        cond = list(plan.cond_ids) + [plan.cond_ids[0]] * pad
        return cond + ([plan.uncond_ids] * self.images if plan.cfg else [])

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` -> ``[images, ...]`` with zero rows for the spare images."""
        pad = self.images - x.shape[0]
        return x if pad == 0 else torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))])

    def drop(self, keep: list[int], cond: torch.Tensor) -> torch.Tensor:
        """Move the kept images' rows (cache, lengths, condition) to the front; with graphs
        the captured batch stays and the spare rows grow."""
        plan, halves = self.plan, 2 if self.plan.cfg else 1
        images = self.images if self.graphs else len(keep)
        src = []
        for h in range(halves):
            kept = [h * self.images + i for i in keep]
            src += kept + [kept[0]] * (images - len(keep))
        idx = torch.tensor(src, device=self.device)
        old, used = self.cache, max(self.cache.lens_host)
        k = old.k[:, :, :, :used].index_select(1, idx)
        v = old.v[:, :, :, :used].index_select(1, idx)
        lens, lens_host = old.lens.index_select(0, idx), [old.lens_host[i] for i in src]
        self.plan = dataclasses.replace(plan, cond_ids=tuple(plan.cond_ids[i] for i in keep))
        self.images = images
        rows = images * halves
        if rows not in self._views:
            self._views[rows] = self.storage.rows(0, rows)
        self.cache = self._views[rows]
        self.cache.k[:, :, :, :used].copy_(k)
        self.cache.v[:, :, :, :used].copy_(v)
        self.cache.lens.copy_(lens)
        self.cache.lens_host = lens_host
        return cond.index_select(0, idx)

    # -- LLM -------------------------------------------------------------------------------

    def prefill(self) -> torch.Tensor:
        """Causal pass per prompt (its rows at the prompt's exact length, as the reference
        does), then one batched block call for every sequence's image-start block."""
        p, rows = self.parallel_num, self._row_ids()
        for a, b, seq in row_groups(rows):
            ids = torch.tensor([seq] * (b - a), device=self.device)
            prompt_pass(self.model, ids[:, :-p], self.cache.rows(a, b))
        self.cache.advance([len(ids) - p for ids in rows])
        block_ids = torch.tensor([ids[-p:] for ids in rows], device=self.device)
        cond = image_start(self.model, block_ids, self.cache, self.pe_blocks[0])
        self.cache.advance(p)
        return cond

    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        if self.graphs:
            return self._block_graph()(self._pad(tokens), block)
        return self._block_step(tokens, self.pe_blocks[block], self.pe_blocks[block + 1])

    def _block_step(self, tokens, pe, pe_next):
        cond = block_step(self.model, tile_rows(tokens, self.cache.k.shape[1]), pe, pe_next,
                          self.cache)
        self.cache.advance(self.parallel_num)
        return cond

    # -- head ------------------------------------------------------------------------------

    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        if self.graphs:
            graph = self._head_graph()
            return graph(cond, [self._pad(n) for n in noise], self.plan.guidance)[:self.plan.images]
        return self._sample(cond, noise, self.plan.guidance)

    def _sample(self, cond, noise, guidance):
        return sample_block_premodulated(self.head_net, cond, noise, guidance, self.times,
                                         self.coeffs, self.dtype, self.denoise)

    def decode(self, tokens, noise):
        return decode_tokens(self.model, tokens, self.plan.h, self.plan.w, noise,
                             per_image=True)

    # -- CUDA graphs -----------------------------------------------------------------------

    def _head_graph(self) -> "HeadLoopGraph":
        key = (self.images, self.plan.cfg, self.plan.steps)
        if key not in self._head_graphs:
            self._head_graphs[key] = HeadLoopGraph(self)
        return self._head_graphs[key]

    def _block_graph(self) -> "BlockStepGraph":
        key = (self.images, self.plan.cfg, self.plan.h, self.plan.w)
        if key not in self._block_graphs:
            self._block_graphs[key] = BlockStepGraph(self)
        return self._block_graphs[key]


def counted_capture(be: TorchBackend, fn):
    """The graph of ``fn`` and the work one run does (counted by the model's hooks)."""
    return graphs.counted_capture(
        be, fn, lambda work: watch_modules(work, *model_meter_modules(be.model)), be.emulate)


class HeadLoopGraph:
    """The whole sampling loop of one block (N + 1 head evaluations and their updates) as one
    graph. It reads only tensors it owns: the condition, the noise, the guidance scale and the
    schedule are copied into its static buffers before each replay."""

    def __init__(self, be: TorchBackend):
        plan, p, dev = be.plan, be.parallel_num, be.device
        rows = be.images * (2 if plan.cfg else 1)
        self.cond = torch.zeros((rows, p, be.spec.llm.hidden_size), device=dev)
        self.noise = torch.zeros((plan.steps + 1, be.images, p, be.ch_target), device=dev)
        self.guidance = torch.ones((), device=dev)
        self.times, self.coeffs = be.times, be.coeffs  # read by the graph: owned here
        self.be = be
        self.graph, self.work = counted_capture(
            be, lambda: be._sample(self.cond, list(self.noise.unbind(0)), self.guidance))

    def __call__(self, cond, noise, guidance: float):
        self.cond.copy_(cond)
        self.noise.copy_(torch.stack(noise))
        self.guidance.fill_(guidance)
        self.graph.replay()
        if self.be.meter is not None:
            self.be.meter.add(*self.work)
        return self.graph.out.clone()


class BlockStepGraph:
    """One block step for all sequences as a graph: a static token buffer in, the head
    condition out. The cache lengths live on the device and advance inside the graph, and the
    block index is a device scalar set before each replay, so one capture serves every block
    and every plan of the captured batch. Everything it reads is owned here or by the backend
    (the cache, the position embeddings)."""

    def __init__(self, be: TorchBackend):
        self.be = be
        p, dev = be.parallel_num, be.device
        self.cache = be.cache
        self.pe_blocks = be.pe_blocks
        self.tokens = torch.zeros((be.images, p, be.ch_target), device=dev)
        self.block = torch.zeros((), dtype=torch.long, device=dev)

        def run():
            pe = self.pe_blocks.index_select(0, self.block.view(1))[0]
            pe_next = self.pe_blocks.index_select(0, (self.block + 1).view(1))[0]
            rows = tile_rows(self.tokens, self.cache.k.shape[1])
            cond = block_step(be.model, rows, pe, pe_next, self.cache)
            self.cache.lens.add_(p)
            return cond

        # The warm-up run and the capture (a stand-in's too) each write a block: make them
        # write slots [0, 2P) whatever the cache holds now (a late capture would write past
        # its end), and put those slots and the lengths back afterwards.
        cache = self.cache
        saved_lens, saved_host = cache.lens.clone(), list(cache.lens_host)
        saved_k, saved_v = cache.k[..., :2 * p, :].clone(), cache.v[..., :2 * p, :].clone()
        cache.lens.zero_()
        self.graph, self.work = counted_capture(be, run)
        cache.k[..., :2 * p, :].copy_(saved_k)
        cache.v[..., :2 * p, :].copy_(saved_v)
        cache.lens.copy_(saved_lens)
        cache.lens_host = saved_host

    def __call__(self, tokens, block):
        cache, p = self.cache, self.be.parallel_num
        if max(cache.lens_host) + p > cache.max_len:
            raise RuntimeError("KV cache overflow in the block step graph")
        self.tokens.copy_(tokens)
        self.block.fill_(block)
        self.graph.replay()
        if self.be.meter is not None:
            self.be.meter.add(*self.work)
        cache.lens_host = [n + p for n in cache.lens_host]
        return self.graph.out.clone()
