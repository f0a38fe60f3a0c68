"""The class-conditional family's steps over the graphs of ``bitdance-export`` (ONNX Runtime):
the same calls as :class:`bitdance_rt.imagenet.sample.TorchSteps`, so the one AR loop of
:func:`~bitdance_rt.imagenet.sample.generate_tokens` runs them.

The transformer graphs return the keys and values of their new positions; this runner keeps
them (the cache grows by one AR step per call, every sequence the same length). The head runs
as in every graph backend: one ``head_prepare`` call per AR step (the x-independent part for all
N + 1 step times), then N + 1 ``head_step`` calls through :func:`bitdance_rt.sampling.run_steps`.
Only the checkpoint's configs are needed (``load(dir, weights=False)``): the graphs hold the
weights. The export must match the checkpoint (config hash, weights fingerprint) and its files
must be those written (sizes, sha256).

:class:`EngineSteps` runs the same calls on the TensorRT engines ``bitdance-export build`` made
of such an export (on a CUDA GPU): the engine directory, the export it came from, the TensorRT
that built them and the GPU's target are checked as for the text-to-image engines, before any
CUDA work; tensors are bound by address (the text-to-image backend's :func:`bind`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import EngineError
from .. import dtypes
from ..manifest import (GRAPH_INPUTS, IMAGENET_GRAPHS, check_engines, check_files, check_model,
                        check_weights, find_engine_dir, graph_file, read_engines,
                        read_manifest)
from ..models.posemb import tokens_to_latent
from ..runtime.backends.onnxruntime_backend import load_session, providers_for, run_bound
from ..sampling import run_steps
from .checkpoint import ImageNetModel, weight_files


class GraphSteps:
    name = "onnxruntime"

    def __init__(self, model: ImageNetModel, export_dir):
        if export_dir is None:
            raise EngineError("--backend onnxruntime needs --export-dir, a directory written by "
                              "`bitdance-export --checkpoint DIR --out EXPORT`")
        self._check_model(model, Path(export_dir), read_manifest(export_dir))
        manifest = self.manifest
        if manifest["dtype"] != "fp32" and self.device.type == "cpu":
            raise EngineError(f"{self.dir} holds {manifest['dtype']} graphs; on the CPU ONNX "
                              "Runtime runs fp32 exports: re-export with --dtype fp32")
        check_files(manifest, self.dir, IMAGENET_GRAPHS)
        self._dev = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        providers = providers_for(self.device)
        self.sessions = {}
        for name in IMAGENET_GRAPHS:
            session = load_session(manifest, self.dir, name, providers,
                                   self.device.type == "cpu")
            have = {i.name for i in session.get_inputs()}
            if not GRAPH_INPUTS[name] <= have:
                raise EngineError(f"{graph_file(manifest, self.dir, name)} is not this "
                                  f"version's {name} graph; re-export into {self.dir}")
            self.sessions[name] = session
        self._bytes = {n: sum(manifest["graphs"][n]["files"].values()) for n in IMAGENET_GRAPHS}

    def _check_model(self, model: ImageNetModel, d: Path, manifest: dict) -> None:
        """The graphs in ``d`` (described by ``manifest``) are this family's, of ``model``'s
        config and (when it has a directory) of its weights."""
        self.model, self.spec, self.device = model, model.spec, model.device
        self.dir = d
        if manifest.get("family") != "imagenet":
            raise EngineError(f"{d} holds a text-to-image model's graphs, not a "
                              "class-conditional one's; export this checkpoint with "
                              f"`bitdance-export --checkpoint {model.path} --out DIR`")
        check_model(manifest, self.spec, d)
        if model.path is not None:
            check_weights(manifest, model.path, d, files=weight_files(model.path))
        self.manifest, self.limits = manifest, manifest["limits"]
        self.dtype = dtypes.parse(manifest["dtype"])
        self.past = None
        self.meter = None

    def _run(self, name: str, inputs: dict, outputs: dict) -> dict:
        run_bound(self.sessions[name], self._dev, inputs, outputs)
        if self.meter is not None:  # one call; it reads its graph's weights
            self.meter.add(1, self._bytes[name])
        return outputs

    @contextlib.contextmanager
    def metering(self, meter):
        """Count into ``meter`` every graph call and the bytes of its files, while the block
        runs."""
        self.meter = meter
        try:
            yield
        finally:
            self.meter = None

    def _empty(self, *shape, dtype=None):
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def _step(self, name: str, inputs: dict, rows: int, t: int) -> torch.Tensor:
        s = self.spec
        kv = (s.n_layer, rows, s.n_head, t, 64)
        out = self._run(name, inputs, {"cond": self._empty(rows, s.parallel_num, s.dim),
                                       "keys": self._empty(*kv), "values": self._empty(*kv)})
        if self.past is None:
            self.past = (out["keys"], out["values"])
        else:
            self.past = tuple(torch.cat([a, b], dim=3)
                              for a, b in zip(self.past, (out["keys"], out["values"])))
        return out["cond"]

    def start(self, rows: int) -> None:
        most = self.limits["max_rows"]
        if rows > most:
            raise EngineError(f"{rows} sequences (images, twice with guidance) are more than "
                              f"the {most} this export takes (--max-batch "
                              f"{self.limits['max_batch']}); use fewer images per run or "
                              "re-export with a larger --max-batch")
        self.past = None

    def first(self, labels: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return self._step("first_step", {"labels": labels}, labels.shape[0],
                          s.cls_token_num + s.parallel_num - 1)

    def next(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        return self._step("next_step", {"tokens": tokens.float(), "past_keys": self.past[0],
                                        "past_values": self.past[1]},
                          tokens.shape[0], self.spec.parallel_num)

    def sample(self, cond, noise, guidance, times, coeffs) -> torch.Tensor:
        s = self.spec
        rows, p, c = cond.shape[0], s.parallel_num, s.head_dim
        chunks = 6 if p > 1 else 3
        n = times.shape[0]
        mods = self._run("head_prepare", {"cond": cond.float(), "times": times.float()},
                         {"ada_mod": self._empty(n, s.head_adaln, rows, p, chunks * c),
                          "final_mod": self._empty(n, rows, p, 2 * c)})
        ada, final = mods["ada_mod"], mods["final_mod"]
        g = torch.tensor([float(guidance)])
        x0 = noise[0]

        def step(k, x, step_noise):
            out = self._empty(*x.shape, dtype=torch.float32)
            return self._run("head_step", {"x": x, "coeffs": coeffs[k].float(),
                                           "noise": step_noise, "ada_mod": ada[k],
                                           "final_mod": final[k], "guidance": g},
                             {"x_next": out})["x_next"]

        return run_steps(step, x0, noise[1:], coeffs.shape[0])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self.spec
        side = s.latent_side
        latent = tokens_to_latent(tokens.float(), side, side, s.patch)
        image = self._empty(latent.shape[0], s.image_size, s.image_size, 3, dtype=torch.uint8)
        return self._run("decoder", {"latent": latent}, {"image": image})["image"]

    def finish(self) -> None:
        self.past = None


class EngineSteps(GraphSteps):
    """The family's TensorRT engines (``bitdance-export build`` of its export), on a CUDA GPU."""

    name = "tensorrt"

    def __init__(self, model: ImageNetModel, engine_dir, flavor: str | None = None):
        from .. import trt as trt_compat
        from ..runtime.backends.tensorrt_backend import check_runtime, load_engines, require_gpu

        if engine_dir is None:
            raise EngineError("--backend tensorrt needs --export-dir: an export with its engines "
                              "(`bitdance-export --checkpoint DIR --out EXPORT --engines`, or "
                              "`bitdance-export build EXPORT`)")
        d = find_engine_dir(engine_dir)
        info = read_engines(d)
        check_engines(info, d)
        self._check_model(model, d, read_manifest(d))
        self.info = info
        self.flavor = trt_compat.load(flavor or info["flavor"])
        gpu = trt_compat.gpu_target(self.device) if self.device.type == "cuda" else None
        check_runtime(info, self.flavor, gpu, d, device_checked=False)
        require_gpu(self.device)
        check_runtime(info, self.flavor, gpu, d)
        self._bytes = {n: info["engines"][n]["bytes"] for n in IMAGENET_GRAPHS}
        # -- CUDA work starts here --
        with torch.cuda.device(self.device):
            self._logger, self.runtime, self.engines, self.contexts = load_engines(
                self.flavor, info, d, IMAGENET_GRAPHS, self.device, self._check_inputs)
            self._stream = torch.cuda.Stream(self.device)

    @staticmethod
    def _check_inputs(name: str, names: set, path) -> None:
        if not GRAPH_INPUTS[name] <= names:
            raise EngineError(f"{path} is not this version's {name} engine; re-export and "
                              "rebuild the engines")

    def _run(self, name: str, inputs: dict, outputs: dict) -> dict:
        from ..runtime.backends.tensorrt_backend import enqueue

        inputs = {k: v.to(self.device).contiguous() for k, v in inputs.items()}
        enqueue(self.contexts[name], name, inputs, outputs, self.device, self._stream,
                self.flavor.label)
        if self.meter is not None:
            self.meter.add(1, self._bytes[name])
        return outputs
