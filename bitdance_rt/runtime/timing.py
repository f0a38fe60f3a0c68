"""Per-stage timing: seconds, calls and weight bytes read, per stage of the AR loop."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

STAGES = ("prefill", "block_step", "head", "decode")


@dataclass
class StageStats:
    seconds: float = 0.0
    calls: int = 0
    weight_bytes: int = 0
    # Per-call seconds of this stage, for growth checks (e.g. first vs last block step).
    per_call: list = field(default_factory=list)


class WorkMeter:
    """The work counted during the current stage: model calls and weight bytes read."""

    def __init__(self):
        self.calls = 0
        self.weight_bytes = 0

    def add(self, calls: int = 0, weight_bytes: int = 0) -> None:
        self.calls += calls
        self.weight_bytes += weight_bytes

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.weight_bytes)
        self.calls = self.weight_bytes = 0
        return out


def _weights_read(module: torch.nn.Module, inputs) -> int:
    """Bytes of the module's own weights that one forward reads (an embedding: the rows it
    looks up)."""
    if isinstance(module, torch.nn.Embedding):
        return inputs[0].numel() * module.embedding_dim * module.weight.element_size()
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


@contextmanager
def watch_modules(meter: WorkMeter, leaves, calls):
    """Count into ``meter``, while the block runs, every forward of a module under ``leaves``
    that holds weights (its bytes) and of each of the ``calls`` modules (one call)."""
    handles, seen = [], set()
    for root in leaves:
        for m in (root.modules() if root is not None else ()):
            if id(m) in seen or next(m.parameters(recurse=False), None) is None:
                continue
            seen.add(id(m))
            handles.append(m.register_forward_pre_hook(
                lambda mod, inputs: meter.add(weight_bytes=_weights_read(mod, inputs))))
    for m in calls:
        if m is not None:
            handles.append(m.register_forward_pre_hook(lambda mod, inputs: meter.add(calls=1)))
    try:
        yield meter
    finally:
        for h in handles:
            h.remove()


def model_meter_modules(model):
    """What :func:`watch_modules` watches for a BitDance model: every network's weights; as
    calls, the LLM, each evaluation of the head network (its input projection runs once per
    evaluation, whole or premodulated) and the decoder."""
    leaves = (model.llm, model.head, model.projector, model.ae)
    calls = (model.llm.model, model.head.net.input_proj, model.ae.decoder)
    return leaves, calls


class StageTimer:
    """``with timer.stage("head", calls=51, weight_bytes=...):`` accumulates each stage's time.

    On the CPU a stage is timed by the wall clock. On CUDA each stage records a pair of CUDA
    events on the current stream and nothing waits: the work keeps flowing, and :meth:`stop`
    synchronizes once and reads every event pair (the time the device spent between them). A
    disabled timer (the default in generation) records nothing.
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.cuda = self.device.type == "cuda"
        self.stats: dict[str, StageStats] = {}
        self.total = 0.0
        self._t0 = None
        self._events = []  # (name, start, end) on CUDA, read at stop()
        self.meter = WorkMeter()  # what the running stage does; backends add to it

    def start(self):
        if self.enabled and self.cuda:
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self):
        if self.enabled and self.cuda:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._events:
                dt = start.elapsed_time(end) / 1e3
                s = self.stats[name]
                s.seconds += dt
                s.per_call.append(dt)
            self._events = []
        self.total = time.perf_counter() - self._t0

    @contextmanager
    def stage(self, name: str):
        """Time the block as stage ``name``; the calls and weight bytes the backend counts
        into :attr:`meter` meanwhile are the stage's."""
        if not self.enabled:
            yield
            return
        s = self.stats.setdefault(name, StageStats())
        self.meter.take()  # work done between stages belongs to none
        try:
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._events.append((name, start, end))
                return
            t0 = time.perf_counter()
            yield
            dt = time.perf_counter() - t0
            s.seconds += dt
            s.per_call.append(dt)
        finally:
            calls, nbytes = self.meter.take()
            s.calls += calls
            s.weight_bytes += nbytes

    def as_dict(self) -> dict:
        return {
            "total_s": self.total,
            "stages": {k: v.seconds for k, v in self.stats.items()},
            "calls": {k: v.calls for k, v in self.stats.items()},
            "weight_bytes": {k: v.weight_bytes for k, v in self.stats.items()},
        }

    def table(self) -> str:
        rows = [f"{'stage':<12}{'seconds':>10}{'calls':>8}{'weights read':>14}"]
        for name in list(STAGES) + sorted(set(self.stats) - set(STAGES)):
            if name in self.stats:
                s = self.stats[name]
                rows.append(f"{name:<12}{s.seconds:>10.3f}{s.calls:>8}"
                            f"{s.weight_bytes / 1e9:>11.2f} GB")
        rows.append(f"{'total':<12}{self.total:>10.3f}")
        return "\n".join(rows)


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())
