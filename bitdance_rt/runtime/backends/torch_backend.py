"""The PyTorch backend: one batched LLM call per block for all 2B sequences over a static KV
cache written in place, and on CUDA the head sampling loop and the block step replayed as
CUDA graphs.

Numerics follow the reference pipeline op for op (same sampler arithmetic, same projector and
position-embedding additions), so on the CPU in float32 it reproduces the reference's image.
"""

from __future__ import annotations

import torch

from ...checkpoint import BitDanceModel
from ...errors import ResourceError
from ...models.kv_cache import StaticKVCache
from ...pipeline import decode_tokens
from ...sampling import sample_block_premodulated, time_grid
from ..backend import Backend, ImagePlan
from ..buffers import available_memory, block_posembs, ensure_cache_fits, modulation_bytes
from ..timing import module_bytes


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: BitDanceModel, cuda_graphs: bool | None = None,
                 compile: bool = False, use_plugin: bool = True):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.spec = model.spec
        self.parallel_num = model.spec.parallel_num
        self.ch_target = model.spec.head.ch_target
        self.gan_decoder = model.spec.ae.gan_decoder
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.attention = None
        if use_plugin or self.cuda_graphs:  # graphs need the length-aware fused op
            from ...plugins import kv_attention

            self.attention = kv_attention
        self.head_net = model.head.net
        self.denoise = torch.compile(self.head_net.denoise) if compile else None
        self.cache: StaticKVCache | None = None
        self._key = None
        self._head_graphs: dict = {}
        self._block_graph = None

    # -- buffers ---------------------------------------------------------------------------

    def weight_bytes(self, plan: ImagePlan) -> dict:
        llm, net = self.model.llm.model, self.model.head.net
        layers = module_bytes(llm.layers) + module_bytes(llm.norm)
        # The x-independent part of the head (condition embedding and every modulation) is
        # read once per block, the rest once per step.
        once = (module_bytes(net.cond_embed) + module_bytes(net.ada_ln_blocks)
                + module_bytes(net.final_layer.ada_ln_modulation))
        per_step = module_bytes(net) - once
        calls = len(plan.seq_ids) + 1  # a causal pass per prompt, one batched block call
        return {"prefill": calls * layers, "prefill_calls": calls,
                "block_step": layers + module_bytes(self.model.projector),
                "head": once + (plan.steps + 1) * per_step, "head_calls": plan.steps + 1,
                "decode": module_bytes(self.model.ae.decoder)}

    def begin(self, plan: ImagePlan) -> None:
        cfg = self.spec.llm
        p = self.parallel_num
        rows, max_len = plan.rows, plan.max_len(p)
        key = (plan.h, plan.w, plan.steps, plan.guidance, rows, max_len)
        self.plan = plan
        if self.cache is not None and key == self._key:
            self.cache.reset()  # same sizes: buffers and captured graphs stay valid
            return
        # New sizes: drop the graphs (they point at the old buffers) and rebuild.
        self._key, self._head_graphs, self._block_graph, self.cache = key, {}, None, None
        ts, dts = time_grid(plan.steps, self.spec.head.time_shift)
        self.ts = [t.to(self.device) for t in ts]
        self.dts = [d.to(self.device) for d in dts]
        self.pe_blocks = block_posembs(self.spec, plan.h, plan.w, self.device)
        need = StaticKVCache.nbytes_for(cfg.num_hidden_layers, rows, cfg.num_key_value_heads,
                                        max_len, cfg.head_dim, self.dtype)
        ensure_cache_fits(need, available_memory(self.device), rows, max_len, self.device,
                          extra=modulation_bytes(self.spec, rows, plan.steps, self.dtype))
        self.cache = StaticKVCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len,
                                   cfg.head_dim, self.dtype, self.device, attention=self.attention)

    # -- LLM -------------------------------------------------------------------------------

    def prefill(self) -> torch.Tensor:
        """Causal pass per prompt (its B rows at the prompt's exact length, as the reference
        does), then one batched block call for every sequence's image-start tokens."""
        plan, p, m, b = self.plan, self.parallel_num, self.model, self.plan.images
        image_part = []
        for g, ids in enumerate(plan.seq_ids):
            ids = torch.tensor(ids, device=self.device)
            emb = m.llm.model.embed_tokens(ids)[None].expand(b, -1, -1)
            t = len(ids) - p
            pos = torch.arange(t, device=self.device)[None].expand(b, t)
            rows = self.cache.rows(g * b, (g + 1) * b)
            m.llm.model(emb[:, :t].to(self.dtype), pos, rows, "causal")
            image_part.append(emb[:, t:])
        self.cache.advance([len(ids) - p for ids in plan.seq_ids for _ in range(b)])
        return self._block_llm(torch.cat(image_part)) + self.pe_blocks[0]

    def _block_llm(self, embeds):
        p = self.parallel_num
        pos = self.cache.lens[:, None] + torch.arange(p, device=self.device)
        hidden = self.model.llm.model(embeds.to(self.dtype), pos, self.cache, "block")
        self.cache.advance(p)
        return hidden

    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        if self.cuda_graphs:
            return self._block_step_graph(tokens, block)
        return self._block_step_eager(tokens, block)

    def _block_step_eager(self, tokens, block):
        copies = len(self.plan.seq_ids)
        tokens = torch.cat([tokens] * copies, dim=0)
        embeds = self.model.projector(tokens.to(self.dtype)) + self.pe_blocks[block]
        return self._block_llm(embeds) + self.pe_blocks[block + 1]

    # -- head ------------------------------------------------------------------------------

    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        if self.cuda_graphs:
            return self._head_graph(cond.shape[0])(cond, noise)
        return self._sample(cond, noise)

    def _sample(self, cond, noise):
        return sample_block_premodulated(self.head_net, cond, noise, self.plan.guidance,
                                         self.ts, self.dts, self.dtype, self.denoise)

    def decode(self, tokens, noise):
        return decode_tokens(self.model, tokens, self.plan.h, self.plan.w, noise)

    # -- CUDA graphs -----------------------------------------------------------------------

    def _head_graph(self, rows: int):
        key = (rows, self.plan.steps, self.plan.guidance)
        if key not in self._head_graphs:
            self._head_graphs[key] = HeadLoopGraph(self, rows)
        return self._head_graphs[key]

    def _block_step_graph(self, tokens, block):
        if self._block_graph is None:
            self._block_graph = BlockStepGraph(self)
        return self._block_graph(tokens, block)


def _capture(fn):
    """Warm ``fn`` up on a side stream, then capture it; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class HeadLoopGraph:
    """The whole sampling loop of one block (N + 1 head evaluations and their updates) as one
    CUDA graph; inputs are copied into static buffers before each replay."""

    def __init__(self, be: TorchBackend, rows: int):
        plan, p, dev = be.plan, be.parallel_num, be.device
        self.cond = torch.zeros((rows, p, be.spec.llm.hidden_size), device=dev)
        self.schedule = (be.ts, be.dts)  # the graph reads these tensors: keep them alive
        self.noise = torch.zeros((plan.steps + 1, plan.images, p, be.ch_target), device=dev)

        def run():
            return be._sample(self.cond, list(self.noise.unbind(0)))

        self.graph, self.out = _capture(run)

    def __call__(self, cond, noise):
        self.cond.copy_(cond)
        self.noise.copy_(torch.stack(noise))
        self.graph.replay()
        return self.out.clone()


class BlockStepGraph:
    """One block step for all sequences as a CUDA graph: static token buffer in, head
    condition out; the cache lengths live on the device and advance inside the graph, and the
    block index is a device scalar set before each replay, so one capture serves every block."""

    def __init__(self, be: TorchBackend):
        self.be = be
        cache = be.cache
        self.rows = cache.k.shape[1]
        p, dev = be.parallel_num, be.device
        self.tokens = torch.zeros((be.plan.images, p, be.ch_target), device=dev)
        self.pe_blocks = be.pe_blocks  # read by the graph: keep alive
        self.block = torch.zeros((), dtype=torch.long, device=dev)
        arange = torch.arange(p, device=dev)
        copies = len(be.plan.seq_ids)
        m = be.model

        def run():
            toks = torch.cat([self.tokens] * copies, dim=0)
            pe = be.pe_blocks.index_select(0, self.block.view(1))[0]
            pe_next = be.pe_blocks.index_select(0, (self.block + 1).view(1))[0]
            embeds = m.projector(toks.to(be.dtype)) + pe
            pos = cache.lens[:, None] + arange
            hidden = m.llm.model(embeds.to(be.dtype), pos, cache, "block")
            cache.lens.add_(p)
            return hidden + pe_next

        saved_lens, saved_host = cache.lens.clone(), list(cache.lens_host)
        self.graph, self.out = _capture(run)
        cache.lens.copy_(saved_lens)  # undo the warm-up's advance
        cache.lens_host = saved_host

    def __call__(self, tokens, block):
        cache = self.be.cache
        if max(cache.lens_host) + self.be.parallel_num > cache.max_len:
            raise ResourceError("KV cache overflow in the block step graph")
        self.tokens.copy_(tokens)
        self.block.fill_(block)
        self.graph.replay()
        cache.lens_host = [n + self.be.parallel_num for n in cache.lens_host]
        return self.out.clone()
