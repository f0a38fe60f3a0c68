"""Activation statistics (``bitdance-export calibrate``): the real generation schedule over
the calibration prompts, with a hook on the input of every Linear layer of the LLM and the
head, recording per layer the absolute maximum of its input and the maximum per input channel
(what SmoothQuant needs).

The schedule is the runtime's own (the PyTorch backend's AR loop, without CUDA graphs so the
hooks run): the prompt pass, every image block, both guidance branches, every head step
(the x-independent part of the head batched over the steps, as the backend runs it).

A calibration file is one safetensors file: per layer ``<component>/<name>.amax`` (0-d) and
``<component>/<name>.channel_max`` ``[K]`` (float32), and in its metadata the checkpoint's
weights fingerprint and config hash, the prompts' hash and the settings. A file is refused for
another checkpoint (:meth:`Calibration.check_checkpoint`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BitDanceError
from ..files import atomic_path
from .prompts import prompts_hash
from .recipes import HEAD, LLM

FORMAT = 1
META_KEY = "bitdance_calibration"


@dataclass
class Calibration:
    meta: dict
    amax: dict = field(default_factory=dict)         # "component/name" -> float
    channel_max: dict = field(default_factory=dict)  # "component/name" -> [K] float32

    def layer(self, component: str, name: str) -> tuple[float, torch.Tensor]:
        key = f"{component}/{name}"
        if key not in self.amax:
            raise BitDanceError(f"the calibration file has no statistics for {name!r} of the "
                                f"{component}; calibrate again with this version")
        return self.amax[key], self.channel_max[key]

    def check_checkpoint(self, ckpt_dir) -> None:
        """Refuse statistics collected on other weights."""
        from ..checkpoint import weights_fingerprint

        have = weights_fingerprint(ckpt_dir)
        want = self.meta.get("weights_fingerprint")
        if have != want:
            raise BitDanceError(
                f"the calibration file was made on other weights (fingerprint {want}) than "
                f"{ckpt_dir} (fingerprint {have}); run `bitdance-export calibrate --checkpoint "
                f"{ckpt_dir}` to calibrate this checkpoint")

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, value in self.amax.items():
            tensors[f"{key}.amax"] = torch.tensor(float(value), dtype=torch.float32)
            tensors[f"{key}.channel_max"] = self.channel_max[key].float().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BitDanceError(f"calibration file {path} does not exist; write one with "
                                "`bitdance-export calibrate --checkpoint DIR --out FILE`")
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors' and json's own error types
            raise BitDanceError(f"{path} cannot be read as a calibration file ({e}); run "
                                "`bitdance-export calibrate` again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BitDanceError(f"{path} is not a format-{FORMAT} bitdance-rt calibration file; "
                                "run `bitdance-export calibrate` again")
        calib = cls(meta)
        for k, t in tensors.items():
            if k.endswith(".amax"):
                calib.amax[k[:-5]] = float(t)
            elif k.endswith(".channel_max"):
                calib.channel_max[k[:-12]] = t
        return calib


class _Recorder:
    """Forward pre-hooks on every Linear layer: running absolute maxima of the inputs."""

    def __init__(self, parts: dict[str, nn.Module]):
        self.amax: dict[str, float] = {}
        self.channel_max: dict[str, torch.Tensor] = {}
        self.handles = []
        for component, module in parts.items():
            for name, m in module.named_modules():
                if isinstance(m, nn.Linear):
                    self.handles.append(m.register_forward_pre_hook(
                        self._hook(f"{component}/{name}")))

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0].detach()
            ch = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
            if key in self.channel_max:
                torch.maximum(self.channel_max[key], ch, out=self.channel_max[key])
            else:
                self.channel_max[key] = ch
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.amax = {k: float(v.max()) for k, v in self.channel_max.items()}


def collect(model, ckpt_dir, prompts: list[str], steps: int | None = None,
            height: int | None = None, width: int | None = None,
            guidance: float | None = None, seed: int = 0,
            on_step: Callable[[int, int], None] | None = None) -> Calibration:
    """Run one generation per prompt (seed ``seed + i``) and record the statistics of
    ``model`` (loaded from ``ckpt_dir``, whose weights fingerprint the file records).
    ``on_step(done, total)`` counts image blocks over all prompts."""
    from ..checkpoint import weights_fingerprint
    from ..models.quant import QuantLinear
    from ..request import GenerationRequest, plan_for
    from ..runtime.backends.torch_backend import TorchBackend
    from ..runtime.loop import generate

    if any(isinstance(m, QuantLinear) for part in (model.llm, model.head)
           for m in part.modules()):
        raise BitDanceError(f"{ckpt_dir} is a quantized checkpoint; calibrate the float "
                            "checkpoint it was made from")
    reqs = [GenerationRequest(p, height=height, width=width, steps=steps, guidance=guidance,
                              seed=seed + i).resolved(model.spec) for i, p in enumerate(prompts)]
    plans = [plan_for(model, r) for r in reqs]  # every prompt checked before any work
    if not plans[0].cfg:
        raise BitDanceError("calibration runs both guidance branches: --guidance must be "
                            "above 1")
    backend = TorchBackend(model, cuda_graphs=False)  # hooks do not run in a graph replay
    blocks = plans[0].tokens // model.spec.parallel_num
    total = blocks * len(plans)
    recorder = _Recorder({LLM: model.llm, HEAD: model.head})
    t0 = time.perf_counter()
    try:
        for i, (req, plan) in enumerate(zip(reqs, plans)):
            step = (lambda done, _n, i=i: on_step(i * blocks + done, total)) if on_step else None
            generate(backend, plan, req.seed, on_step=step)
    finally:
        recorder.close()
    first = reqs[0]
    meta = {"format": FORMAT,
            "weights_fingerprint": weights_fingerprint(ckpt_dir) if ckpt_dir else None,
            "config_hash": model.spec.config_hash(), "prompts_sha256": prompts_hash(prompts),
            "samples": len(prompts), "steps": first.steps, "height": first.height,
            "width": first.width, "guidance": first.guidance, "seed": seed,
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "seconds": round(time.perf_counter() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return Calibration(meta, recorder.amax, recorder.channel_max)


def calibrate_checkpoint(ckpt_dir, out, prompts: list[str], steps=None, height=None, width=None,
                         guidance=None, seed: int = 0, device=None, dtype=None,
                         on_step=None) -> Calibration:
    """Load ``ckpt_dir`` (default device: CUDA when present; float32 on the CPU, bf16 on
    CUDA), collect the statistics and write them to ``out``."""
    from ..checkpoint import load_checkpoint
    from ..files import check_writable_dir
    from ..runtime.session import resolve_device, resolve_dtype

    check_writable_dir(Path(out).parent)
    dev = resolve_device(device)
    model = load_checkpoint(ckpt_dir, dtype=resolve_dtype(dtype, dev), device=dev)
    calib = collect(model, ckpt_dir, prompts, steps, height, width, guidance, seed, on_step)
    calib.save(out)
    return calib
