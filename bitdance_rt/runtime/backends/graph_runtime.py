"""The AR loop over the graphs written by ``bitdance-export``, for any engine that runs them.

Everything that does not depend on the engine lives here: the manifest checks (the model, its
weights, the attention form, the limits), the KV cache buffers, the prefill's padding, the head
sampling schedule (one ``head_prepare`` call per block, then N + 1 ``head_step`` calls) and the
per-image decode. A subclass loads the five graphs and runs one with torch tensors bound as its
inputs and outputs (:meth:`_run`): :class:`~.onnxruntime_backend.OnnxRuntimeBackend` through
ONNX Runtime's IO binding, :class:`~.tensorrt_backend.TensorRTBackend` through TensorRT engines.

The KV cache is one preallocated buffer ``[L, S, Hkv, slots, D]`` (layer-major, so each layer's
``[S, Hkv, slots, D]`` is contiguous). Two forms of LLM graphs write it:

- ``standard`` (and ``plugin``): the graphs return the keys and values of their new tokens and
  this class scatters them at each sequence's length (rows have different lengths).
- ``native``: each layer's cache is an input and an output of the graph, bound to the same
  memory, and the graph writes its new tokens in place (ONNX ``TensorScatter``); the cache has
  exactly the export's static ``cache_slots`` slots.

The graphs hold the weights: only the checkpoint's configs and tokenizer are needed
(``load_checkpoint(dir, weights=False)``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ... import dtypes
from ...checkpoint import BitDanceModel
from ...errors import EngineError, ResourceError
from ...manifest import cache_inputs, cache_outputs, check_model, check_weights, expected_inputs
from ...models.kv_cache import StaticKVCache
from ...attention.plain import write_at
from ...models.posemb import tokens_to_latent
from ...sampling import run_steps, step_schedule
from ..backend import Backend, ImagePlan
from ..buffers import (available_memory, block_posembs, ensure_cache_fits, modulation_bytes,
                       modulation_shapes)


class GraphRuntime(Backend):
    """The five backend calls over five graphs; subclasses provide :meth:`_run`."""

    # head_prepare calls take at most this many step times (None: all N + 1 at once); an
    # engine whose profile allows fewer sets it
    max_steps_per_call: int | None = None

    def __init__(self, model: BitDanceModel, manifest: dict, where):
        """``manifest``: the export's (read by the subclass); ``where``: the directory named
        in errors."""
        self.model = model
        self.spec = model.spec
        self.device = model.device
        self.parallel_num = model.spec.parallel_num
        self.ch_target = model.spec.head.ch_target
        self.gan_decoder = model.spec.ae.gan_decoder
        self.where = Path(where)
        self.manifest = manifest
        check_model(manifest, self.spec, where)
        check_weights(manifest, model.path, where)
        dtype = manifest["dtype"]
        if dtype not in ("fp32", "fp16", "bf16"):
            raise EngineError(f"{where}/manifest.json has an unknown dtype {dtype!r}; re-export")
        self.kv_dtype = dtypes.parse(dtype)
        self.attention = manifest.get("attention", "standard")
        self.native = self.attention == "native"
        self.slots = manifest.get("cache_slots") if self.native else None
        if self.native and not isinstance(self.slots, int):
            raise EngineError(f"{where}/manifest.json records no cache_slots for its native "
                              "graphs; re-export")
        self.limits = manifest.get("limits", {})
        self.layers = self.spec.llm.num_hidden_layers
        self.cache_k = self.cache_v = None
        self._key = None

    # -- what a subclass provides ---------------------------------------------------------------

    def _run(self, name: str, inputs: dict, outputs: dict) -> None:
        """Run graph ``name`` reading ``inputs`` and writing ``outputs`` (torch tensors on the
        backend's device, bound in place), ordered on torch's current stream."""
        raise NotImplementedError

    def _graph_bytes(self, name: str) -> int:
        raise NotImplementedError

    def check_inputs(self, name: str, have: set, path) -> None:
        """Refuse a graph that lacks an input this runtime feeds it (another version's)."""
        want = expected_inputs(name, self.attention, self.layers)
        if not want <= have:
            missing = sorted(want - have)
            raise EngineError(
                f"graph file {path} lacks the inputs {missing[:6]}{' ...' if len(missing) > 6 else ''}: "
                "it was written by another version of bitdance-export, whose graphs this "
                f"version cannot run; re-export it with `bitdance-export --checkpoint CKPT "
                f"--out {self.where}`")

    # -- buffers --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def metered(self, meter):
        """Each graph run counts as a call reading that graph's weights (the graphs hold
        them: no PyTorch module runs)."""
        self.meter = meter
        try:
            yield
        finally:
            self.meter = None

    def _call(self, name: str, inputs: dict, outputs: dict) -> None:
        """Run graph ``name`` (:meth:`_run`), counted when metered."""
        if self.meter is not None:
            self.meter.add(1, self._graph_bytes(name))
        self._run(name, inputs, outputs)

    def _check_limits(self, plan: ImagePlan) -> None:
        max_batch, max_seq = self.limits.get("max_batch"), self.limits.get("max_seq")
        if max_batch and plan.images > max_batch:
            raise EngineError(f"{plan.images} images at once exceed the export's --max-batch "
                              f"{max_batch}; generate fewer or re-export with a larger --max-batch")
        need = plan.max_len(self.parallel_num)
        limit = self.slots or max_seq
        if limit and need > limit:
            raise EngineError(f"this prompt and size need {need} KV slots, more than the export's "
                              f"--max-seq {limit}; re-export with --max-seq {need} or more")

    def begin(self, plan: ImagePlan) -> None:
        self._check_limits(plan)
        cfg, p, dev = self.spec.llm, self.parallel_num, self.device
        rows, max_len = plan.rows, plan.max_len(p)
        slots = self.slots or max_len
        self.plan = plan
        key = (plan.h, plan.w, plan.steps, plan.guidance, rows, slots)
        if key != self._key:
            self._key, self.cache_k, self.cache_v = None, None, None
            self.forget_plan()
            shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, slots, cfg.head_dim)
            need = StaticKVCache.nbytes_for(*shape[:4], cfg.head_dim, self.kv_dtype)
            ensure_cache_fits(need, available_memory(dev), rows, slots, dev,
                              extra=modulation_bytes(self.spec, rows, plan.steps, self.kv_dtype))
            self.cache_k = torch.zeros(shape, dtype=self.kv_dtype, device=dev)
            self.cache_v = torch.zeros(shape, dtype=self.kv_dtype, device=dev)
            self.pe_blocks = block_posembs(self.spec, plan.h, plan.w, dev)
            times, coeffs = step_schedule(plan.steps, self.spec.head.time_shift)
            self.times, self.coeffs = times.to(dev), coeffs.to(dev)
            # head_prepare's outputs (export dtype), one slice per step, written once per block
            ada_shape, final_shape = modulation_shapes(self.spec, rows, plan.steps)
            self.ada_mod = torch.empty(ada_shape, dtype=self.kv_dtype, device=dev)
            self.final_mod = torch.empty(final_shape, dtype=self.kv_dtype, device=dev)
            self.guidance = torch.tensor([plan.guidance], dtype=torch.float32, device=dev)
            # per-row cache lengths on the device, updated in place (captured graphs read it)
            self.lens = torch.zeros(rows, dtype=torch.int64, device=dev)
            self._key = key
        else:
            self.cache_k.zero_()
            self.cache_v.zero_()
            self.lens.zero_()
        self.lens_host = [0] * rows

    def forget_plan(self) -> None:
        """Drop what belongs to the previous plan's buffers (a subclass's captured graphs)."""

    def _caches(self) -> tuple[dict, dict]:
        """A native graph's cache bindings: each layer's view of the one buffer, as input and
        as output (the same memory: the graph writes in place)."""
        views = [self.cache_k[i] for i in range(self.layers)] + [
            self.cache_v[i] for i in range(self.layers)]
        return (dict(zip(cache_inputs(self.layers), views)),
                dict(zip(cache_outputs(self.layers), views)))

    def _write_kv(self, keys, values) -> None:
        """Scatter new keys/values ``[L, S, Hkv, T, D]`` into the cache at ``lens``; advance
        (device work only: a captured graph replays it)."""
        write_at(self.cache_k, keys, self.lens, seq_dim=3, batch_dim=1)
        write_at(self.cache_v, values, self.lens, seq_dim=3, batch_dim=1)
        self.lens += keys.shape[3]

    def _reserve(self, t: int) -> None:
        """Host-side bookkeeping of ``t`` new tokens per row (checked before any work)."""
        if max(self.lens_host) + t > self.cache_k.shape[3]:
            raise ResourceError(f"KV cache overflow: {max(self.lens_host)} + {t} tokens > "
                                f"{self.cache_k.shape[3]} slots")
        self.lens_host = [n + t for n in self.lens_host]

    def _kv_out(self, rows: int, tokens: int):
        cfg = self.spec.llm
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, tokens, cfg.head_dim)
        return (torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                torch.empty(shape, dtype=self.kv_dtype, device=self.device))

    # -- the five calls -------------------------------------------------------------------------

    def prefill(self) -> torch.Tensor:
        """All prompt rows in one call (right-padded to the longest prompt)."""
        plan, p, dev = self.plan, self.parallel_num, self.device
        seqs = [list(ids) for ids in plan.row_ids()]
        lens = [len(s) - p for s in seqs]
        t = max(lens)
        ids = torch.zeros(len(seqs), t, dtype=torch.int64)
        for i, s in enumerate(seqs):
            ids[i, :lens[i]] = torch.tensor(s[:-p])
        inputs = {"input_ids": ids.to(dev),
                  "input_lens": torch.tensor(lens, device=dev),
                  "block_ids": torch.tensor([s[-p:] for s in seqs], device=dev),
                  "pe": self.pe_blocks[0]}
        cond = torch.empty(len(seqs), p, self.spec.llm.hidden_size, device=dev)
        if self.native:  # prompt and image-start block written in place
            self._reserve(t + p)
            cache_in, cache_out = self._caches()
            self._call("prefill", {**inputs, **cache_in}, {"cond": cond, **cache_out})
            self.lens.copy_(inputs["input_lens"] + p)
            self.lens_host = [n + p for n in lens]
            return cond
        pk, pv = self._kv_out(len(seqs), t)
        bk, bv = self._kv_out(len(seqs), p)
        self._call("prefill", inputs, {"cond": cond, "prompt_keys": pk, "prompt_values": pv,
                                      "block_keys": bk, "block_values": bv})
        self._reserve(t)
        self._write_kv(pk, pv)  # slots [0, T); zero past each row's prompt
        self.lens.copy_(inputs["input_lens"])
        self.lens_host = lens
        self._reserve(p)
        self._write_kv(bk, bv)  # the image-start block right after each row's prompt
        return cond

    def _prepare_head(self, cond: torch.Tensor) -> None:
        """Every step's modulations into ``ada_mod``/``final_mod``: one ``head_prepare`` call,
        or, when an engine takes fewer step times at once, several over slices that all have
        one size (the last one ends at N + 1 and overlaps the one before it: the steps they
        share are computed again from the same inputs): an engine context then keeps one input
        shape, as a captured graph of the head loop needs."""
        n = self.times.shape[0]
        size = min(n, self.max_steps_per_call or n)
        for a in list(range(0, n - size, size)) + [n - size]:
            b = a + size
            self._call("head_prepare", {"cond": cond, "times": self.times[a:b]},
                       {"ada_mod": self.ada_mod[a:b], "final_mod": self.final_mod[a:b]})

    def _head_step(self, k: int, x: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
        """One ``head_step`` call, bound to slice k of the modulations (a view)."""
        out = torch.empty_like(x)
        self._call("head_step", {"x": x, "coeffs": self.coeffs[k], "noise": step_noise,
                                "ada_mod": self.ada_mod[k], "final_mod": self.final_mod[k],
                                "guidance": self.guidance}, {"x_next": out})
        return out

    def _head_steps(self, x: torch.Tensor, noise: list) -> torch.Tensor:
        """N + 1 ``head_step`` calls (the sampler's loop, :func:`~bitdance_rt.sampling.run_steps`)."""
        return run_steps(self._head_step, x, noise[1:], self.times.shape[0])

    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        self._prepare_head(cond)
        return self._head_steps(noise[0], noise)

    def _block_step(self, tokens, pe, pe_next, cond) -> None:
        """The block step's device work (graph call, cache write, lengths advanced)."""
        inputs = {"tokens": tokens, "pe": pe, "pe_next": pe_next, "cache_lens": self.lens}
        if self.native:
            cache_in, cache_out = self._caches()
            self._call("block_step", {**inputs, **cache_in}, {"cond": cond, **cache_out})
            self.lens += self.parallel_num
            return
        keys, values = self._kv_out(self.cache_k.shape[1], self.parallel_num)
        self._call("block_step", {**inputs, "k_cache": self.cache_k, "v_cache": self.cache_v},
                  {"cond": cond, "new_keys": keys, "new_values": values})
        self._write_kv(keys, values)

    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        rows, p = self.cache_k.shape[1], self.parallel_num
        self._reserve(p)
        cond = torch.empty(rows, p, self.spec.llm.hidden_size, device=self.device)
        self._block_step(tokens.float(), self.pe_blocks[block], self.pe_blocks[block + 1], cond)
        return cond

    def decode(self, tokens: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One image at a time, as the torch backend decodes (an image does not depend on the
        batch it was generated in)."""
        plan = self.plan
        latent = tokens_to_latent(tokens.float(), plan.h, plan.w, self.spec.patch)
        up = self.spec.ae.downsample
        images = []
        for i in range(latent.shape[0]):  # the images still alive (the loop may drop some)
            inputs = {"latent": latent[i:i + 1]}
            if self.gan_decoder:
                inputs["noise"] = noise[i:i + 1].float()
            image = torch.empty(1, up * plan.h, up * plan.w, 3, dtype=torch.uint8,
                                device=self.device)
            self._call("decoder", inputs, {"image": image})
            images.append(image.cpu())
        return torch.cat(images)

