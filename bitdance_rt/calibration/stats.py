"""Activation statistics (``bitdance-export calibrate``): the real generation schedule over
the calibration prompts, with a hook on the input of every Linear layer of the LLM and the
head, recording per layer the absolute maximum of its input and the maximum per input channel
(what SmoothQuant needs).

The schedule is the runtime's own (the PyTorch backend's AR loop, without CUDA graphs so the
hooks run): the prompt pass, every image block, both guidance branches, every head step
(the x-independent part of the head batched over the steps, as the backend runs it).

A calibration file is one safetensors file: per layer ``<component>/<name>.amax`` (0-d) and
``<component>/<name>.channel_max`` ``[K]`` (float32), and in its metadata the checkpoint's
weights fingerprint and config hash, the prompts' hash, the settings and a sha256 of all of it
(:func:`content_sha256`: every statistic and the metadata), which a reader recomputes: a file
with a flipped bit is refused, and so are statistics that are not finite numbers (NaN or
infinity: an overflow in the calibration run). A file is refused for another checkpoint
(:meth:`Calibration.check_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import math
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

FORMAT = 2  # 2: the content hash (SHA_KEY), finite statistics only
META_KEY = "bitdance_calibration"
SHA_KEY = "bitdance_calibration_sha256"


def content_sha256(meta: dict, amax: dict, channel_max: dict) -> str:
    """A sha256 of a calibration: its metadata and every layer's statistics (names, shapes,
    float32 bytes), in key order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(set(amax) | set(channel_max)):
        a = float(amax[key]) if key in amax else None
        ch = channel_max.get(key, torch.empty(0)).float().contiguous()
        h.update(f"\n{key}:{a!r}:{list(ch.shape)}\n".encode("utf-8", "surrogateescape"))
        h.update(ch.numpy().tobytes())
    return h.hexdigest()


def check_statistics(amax: dict, channel_max: dict, where) -> None:
    """Refuse statistics that are not finite (NaN or infinity: the calibration run overflowed
    or the weights hold such values): one line naming the first layer."""
    for key in sorted(set(amax) | set(channel_max)):
        ch = channel_max.get(key)
        if ch is None or key not in amax:
            raise BitDanceError(f"{where} has only half the statistics of {key}; run "
                                "`bitdance-export calibrate` again")
        a = float(amax[key])
        bad = int(ch.numel() - torch.isfinite(ch.float()).sum())
        if not math.isfinite(a) or bad:
            raise BitDanceError(
                f"{where}: the input statistics of {key} are not finite numbers (amax {a}, "
                f"{bad} of {ch.numel()} channel maxima NaN or infinite): the calibration "
                "overflowed; calibrate in float32 (--dtype float32) or check the checkpoint's "
                "weights")


@dataclass
class Calibration:
    meta: dict
    amax: dict = field(default_factory=dict)         # "component/name" -> float
    channel_max: dict = field(default_factory=dict)  # "component/name" -> [K] float32
    sha256: str | None = None                        # content_sha256, once saved or loaded

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
        check_statistics(self.amax, self.channel_max, "the calibration run")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, value in self.amax.items():
            tensors[f"{key}.amax"] = torch.tensor(float(value), dtype=torch.float32)
            tensors[f"{key}.channel_max"] = self.channel_max[key].float().contiguous()
        amax = {k: float(tensors[f"{k}.amax"]) for k in self.amax}
        self.sha256 = content_sha256(self.meta, amax, self.channel_max)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(self.meta),
                                                   SHA_KEY: self.sha256})
        return path

    @classmethod
    def load(cls, path) -> "Calibration":
        from ..checkpoint import open_safetensors
        from ..files import parse_json

        path = Path(path)
        again = "run `bitdance-export calibrate` again"
        if not path.is_file():
            raise BitDanceError(f"calibration file {path} does not exist; write one with "
                                "`bitdance-export calibrate --checkpoint DIR --out FILE`")
        with open_safetensors(path, "a calibration file", again) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = parse_json(metadata.get(META_KEY, "null"), f"the metadata of {path}", fix=again)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BitDanceError(f"{path} is not a format-{FORMAT} bitdance-rt calibration file; "
                                f"{again}")
        calib = cls(meta)
        for k, t in tensors.items():
            if k.endswith(".amax") and t.dim() == 0:
                calib.amax[k[:-5]] = float(t)
            elif k.endswith(".channel_max") and t.dim() == 1 and t.is_floating_point():
                calib.channel_max[k[:-12]] = t.float()
            else:
                raise BitDanceError(f"{path} holds {k!r} (shape {list(t.shape)}), which no "
                                    f"calibration file has; {again}")
        have = content_sha256(meta, calib.amax, calib.channel_max)
        if have != metadata.get(SHA_KEY):
            raise BitDanceError(f"{path} has changed since it was written (its statistics' "
                                f"sha256 is {have[:16]}..., the file records "
                                f"{str(metadata.get(SHA_KEY))[:16]}...); {again}")
        calib.sha256 = have
        check_statistics(calib.amax, calib.channel_max, path)
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
            on_step: Callable[[int, int], None] | None = None,
            on_first: Callable[[float, int], None] | None = None) -> Calibration:
    """Run one generation per prompt (seed ``seed + i``) and record the statistics of
    ``model`` (loaded from ``ckpt_dir``, whose weights fingerprint the file records).
    ``on_step(done, total)`` counts image blocks over all prompts; ``on_first(seconds,
    prompts)`` hears how long the first prompt took."""
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
            if i == 0 and on_first:
                on_first(time.perf_counter() - t0, len(plans))
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


CALIBRATION_STEPS = 25  # the default head steps of a calibration run
# About the largest calibration file (the 14B: a maximum per input channel of every layer)
CALIBRATION_BYTES = 8 << 20


def check_calibration_out(out: Path) -> None:
    """``--out`` is a new file or an earlier calibration file (which is replaced): never a
    directory, nor another file of the user's."""
    from ..checkpoint import open_safetensors
    from ..errors import CheckpointError

    if out.is_dir():
        raise BitDanceError(f"--out {out} is a directory; name the calibration file to write")
    if out.exists() or out.is_symlink():
        try:
            with open_safetensors(out) as f:
                ours = META_KEY in (f.metadata() or {})
        except CheckpointError:
            ours = False
        if not ours:
            raise BitDanceError(f"--out {out} exists and is not a calibration file; "
                                "bitdance-export replaces only its own outputs: name a new "
                                "file")


def calibrate_checkpoint(ckpt_dir, out, prompts: list[str], steps=None, height=None, width=None,
                         guidance=None, seed: int = 0, device=None, dtype=None,
                         on_step=None, on_first=None) -> Calibration:
    """Load ``ckpt_dir`` (default device: CUDA when present; float32 on the CPU, bf16 on
    CUDA), collect the statistics and write them to ``out``."""
    from ..checkpoint import load_checkpoint
    from ..files import check_room
    from ..runtime.session import resolve_device, resolve_dtype

    check_calibration_out(Path(out))
    check_room({Path(out): CALIBRATION_BYTES}, "--out")
    dev = resolve_device(device)
    model = load_checkpoint(ckpt_dir, dtype=resolve_dtype(dtype, dev), device=dev)
    if steps is None:  # enough steps to visit the head's range of times, not the model's 50
        steps = min(CALIBRATION_STEPS, model.spec.info.defaults.steps)
    calib = collect(model, ckpt_dir, prompts, steps, height, width, guidance, seed, on_step,
                    on_first)
    calib.save(out)
    return calib
