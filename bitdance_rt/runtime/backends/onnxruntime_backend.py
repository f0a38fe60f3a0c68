"""The ONNX Runtime backend: the AR loop over the graphs written by ``bitdance-export``.

Every graph call goes through IO binding onto torch tensors (``data_ptr``), on the CPU as on
CUDA: inputs are read and outputs written in place, so on CUDA nothing leaves the device
between calls. The graphs never write the KV cache; they return the keys and values of their new
tokens and this backend scatters them into its one preallocated cache ``[L, S, Hkv, S_max, D]``
at each sequence's length (conditional and unconditional rows have different lengths).

The graphs hold the weights: the backend needs only the checkpoint's configs and tokenizer
(``load_checkpoint(dir, weights=False)``). The directory must match the checkpoint (the
manifest's config hash and, for a checkpoint read from a directory, its weights fingerprint),
and its graph files must be present with the sizes the export wrote; otherwise
:class:`~bitdance_rt.errors.EngineError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ... import dtypes
from ...checkpoint import BitDanceModel
from ...errors import EngineError, ResourceError
from ...manifest import GRAPHS, check_files, check_model, check_weights, read_manifest
from ...models.kv_cache import StaticKVCache
from ...models.posemb import tokens_to_latent
from ...sampling import step_schedule
from ..backend import Backend, ImagePlan
from ..buffers import (available_memory, block_posembs, ensure_cache_fits, modulation_bytes,
                       modulation_shapes)

# Inputs the runtime feeds each graph (a directory from another version may differ).
GRAPH_INPUTS = {
    "prefill": {"input_ids", "input_lens", "block_ids", "pe"},
    "block_step": {"tokens", "pe", "pe_next", "k_cache", "v_cache", "cache_lens"},
    "head_prepare": {"cond", "times"},
    "head_step": {"x", "coeffs", "noise", "ada_mod", "final_mod", "guidance"},
    "decoder": {"latent"},
}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model: BitDanceModel, engine_dir, providers: list | None = None):
        self.model = model
        self.spec = model.spec
        self.device = model.device
        self.parallel_num = model.spec.parallel_num
        self.ch_target = model.spec.head.ch_target
        self.gan_decoder = model.spec.ae.gan_decoder
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir)
        check_model(self.manifest, self.spec, self.engine_dir)
        check_weights(self.manifest, model.path, self.engine_dir)
        check_files(self.manifest, self.engine_dir)
        dtype = self.manifest["dtype"]
        if dtype not in ("fp32", "fp16", "bf16"):
            raise EngineError(f"{self.engine_dir}/manifest.json has an unknown dtype {dtype!r}")
        self.kv_dtype = dtypes.parse(dtype)
        if self.device.type == "cpu" and dtype == "bf16":
            raise EngineError(
                f"{self.engine_dir} holds bf16 graphs, which ONNX Runtime's CPU provider cannot "
                "run; use --device cuda, or re-export with --dtype fp32 (or fp16) for the CPU")
        if self.manifest.get("attention", "standard") != "standard":
            raise EngineError(
                f"{self.engine_dir} was exported with --attention "
                f"{self.manifest['attention']} (a custom node for TensorRT), which ONNX Runtime "
                "cannot run; re-export with --attention standard")
        self.limits = self.manifest.get("limits", {})
        self._dev = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        self.providers = providers or self._providers()
        self.sessions = {name: self._load(name) for name in GRAPHS}
        self.cache_k = self.cache_v = None
        self._key = None

    # -- loading ---------------------------------------------------------------------------

    def _providers(self) -> list:
        import onnxruntime as ort

        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError("this onnxruntime has no CUDA provider; install onnxruntime-gpu or "
                              "use --device cpu")
        # ORT runs on torch's current stream, so its work is ordered with the tensors it binds.
        stream = torch.cuda.current_stream(self.device).cuda_stream
        return [("CUDAExecutionProvider", {"device_id": self._dev[1],
                                           "user_compute_stream": str(stream)}),
                "CPUExecutionProvider"]

    def _load(self, name: str):
        import onnxruntime as ort

        graph = self.manifest["graphs"][name]
        path = self.engine_dir / graph["file"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.device.type == "cpu":
            # Each session has its own intra-op threads, which by default keep spinning after a
            # run; the spinning threads of the graph that just ran then take the cores from the
            # next graph's (head_prepare, head_step and block_step alternate every block).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # ORT raises several types for unreadable or invalid models
            raise EngineError(
                f"ONNX Runtime cannot load graph file {path}: it is corrupt or not an ONNX model "
                f"({str(e).strip().splitlines()[0][:200]}); re-run `bitdance-export` into "
                f"{self.engine_dir}") from None
        have = {i.name for i in session.get_inputs()}
        if not GRAPH_INPUTS[name] <= have:
            raise EngineError(
                f"graph file {path} lacks the inputs {sorted(GRAPH_INPUTS[name] - have)}: it was "
                "written by another version of bitdance-export, whose graphs this version cannot "
                f"run; re-export it with `bitdance-export --checkpoint CKPT --out "
                f"{self.engine_dir}`")
        return session

    def _run(self, name: str, inputs: dict, outputs: dict) -> None:
        """Bind torch tensors (device memory, no copies) and run graph ``name``."""
        session = self.sessions[name]
        binding = session.io_binding()
        keep = []
        kind, index = self._dev
        for key, t in inputs.items():
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(key, kind, index, dtypes.ort_element_type(t.dtype), tuple(t.shape),
                               t.data_ptr())
        for key, t in outputs.items():
            binding.bind_output(key, kind, index, dtypes.ort_element_type(t.dtype), tuple(t.shape),
                                t.data_ptr())
        session.run_with_iobinding(binding)

    # -- buffers ---------------------------------------------------------------------------

    def _graph_bytes(self, name: str) -> int:
        return sum(self.manifest["graphs"][name]["files"].values())

    def weight_bytes(self, plan: ImagePlan) -> dict:
        """Approximate: the graphs' file sizes (weights dominate them). Per block the head
        reads ``head_prepare`` (the x-independent part) once and ``head_step`` N + 1 times;
        its calls are those graph calls."""
        return {"prefill": self._graph_bytes("prefill"), "prefill_calls": 1,
                "block_step": self._graph_bytes("block_step"),
                "head": (self._graph_bytes("head_prepare")
                         + (plan.steps + 1) * self._graph_bytes("head_step")),
                "head_calls": plan.steps + 2, "decode": self._graph_bytes("decoder")}

    def _check_limits(self, plan: ImagePlan) -> None:
        max_batch, max_seq = self.limits.get("max_batch"), self.limits.get("max_seq")
        if max_batch and plan.images > max_batch:
            raise EngineError(f"{plan.images} images at once exceed the export's --max-batch "
                              f"{max_batch}; generate fewer or re-export with a larger --max-batch")
        need = plan.max_len(self.parallel_num)
        if max_seq and need > max_seq:
            raise EngineError(f"this prompt and size need {need} KV slots, more than the export's "
                              f"--max-seq {max_seq}; re-export with --max-seq {need} or more")

    def begin(self, plan: ImagePlan) -> None:
        self._check_limits(plan)
        cfg, p, dev = self.spec.llm, self.parallel_num, self.device
        rows, max_len = plan.rows, plan.max_len(p)
        self.plan = plan
        key = (plan.h, plan.w, plan.steps, plan.guidance, rows, max_len)
        if key != self._key:
            self._key, self.cache_k, self.cache_v = key, None, None
            shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
            need = StaticKVCache.nbytes_for(*shape[:4], cfg.head_dim, self.kv_dtype)
            ensure_cache_fits(need, available_memory(dev), rows, max_len, dev,
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
        else:
            self.cache_k.zero_()
            self.cache_v.zero_()
        self.lens = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.lens_host = [0] * rows

    def _write_kv(self, keys, values) -> None:
        """Scatter new keys/values ``[L, S, Hkv, T, D]`` into the cache at ``lens``; advance."""
        t = keys.shape[3]
        if max(self.lens_host) + t > self.cache_k.shape[3]:
            raise ResourceError(f"KV cache overflow: {max(self.lens_host)} + {t} tokens > "
                                f"{self.cache_k.shape[3]} slots")
        pos = self.lens[:, None] + torch.arange(t, device=self.device)[None]
        index = pos[None, :, None, :, None].expand(keys.shape)
        self.cache_k.scatter_(3, index, keys)
        self.cache_v.scatter_(3, index, values)
        self.lens += t
        self.lens_host = [n + t for n in self.lens_host]

    def _kv_out(self, rows: int, tokens: int):
        cfg = self.spec.llm
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, tokens, cfg.head_dim)
        return (torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                torch.empty(shape, dtype=self.kv_dtype, device=self.device))

    # -- the five calls --------------------------------------------------------------------

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
        pk, pv = self._kv_out(len(seqs), t)
        bk, bv = self._kv_out(len(seqs), p)
        self._run("prefill", inputs, {"cond": cond, "prompt_keys": pk, "prompt_values": pv,
                                      "block_keys": bk, "block_values": bv})
        self._write_kv(pk, pv)  # slots [0, T); zero past each row's prompt
        self.lens = inputs["input_lens"].clone()
        self.lens_host = lens
        self._write_kv(bk, bv)  # the image-start block right after each row's prompt
        return cond

    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        """One ``head_prepare`` call (every step's modulations), then N + 1 ``head_step``
        calls, step k bound to slice k of those outputs (a view: no copy)."""
        self._run("head_prepare", {"cond": cond, "times": self.times},
                  {"ada_mod": self.ada_mod, "final_mod": self.final_mod})
        x = noise[0]
        for k in range(self.times.shape[0]):
            step_noise = noise[k + 1] if k + 1 < len(noise) else x  # final step: unused (x 0)
            out = torch.empty_like(x)
            self._run("head_step", {"x": x, "coeffs": self.coeffs[k], "noise": step_noise,
                                    "ada_mod": self.ada_mod[k], "final_mod": self.final_mod[k],
                                    "guidance": self.guidance}, {"x_next": out})
            x = out
        return x

    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        rows, p = self.cache_k.shape[1], self.parallel_num
        cond = torch.empty(rows, p, self.spec.llm.hidden_size, device=self.device)
        keys, values = self._kv_out(rows, p)
        self._run("block_step", {"tokens": tokens.float(), "pe": self.pe_blocks[block],
                                 "pe_next": self.pe_blocks[block + 1], "k_cache": self.cache_k,
                                 "v_cache": self.cache_v, "cache_lens": self.lens},
                  {"cond": cond, "new_keys": keys, "new_values": values})
        self._write_kv(keys, values)
        return cond

    def decode(self, tokens: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One image at a time, as the torch backend decodes (an image does not depend on the
        batch it was generated in)."""
        plan = self.plan
        latent = tokens_to_latent(tokens.float(), plan.h, plan.w, self.spec.patch)
        up = self.spec.ae.downsample
        images = []
        for i in range(plan.images):
            inputs = {"latent": latent[i:i + 1]}
            if self.gan_decoder:
                inputs["noise"] = noise[i:i + 1].float()
            image = torch.empty(1, up * plan.h, up * plan.w, 3, dtype=torch.uint8,
                                device=self.device)
            self._run("decoder", inputs, {"image": image})
            images.append(image.cpu())
        return torch.cat(images)
