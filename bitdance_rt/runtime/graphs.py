"""Captured graphs: the CUDA graph of a body of work, and its CPU stand-in for tests.

:class:`CudaGraph` warms the body up on a side stream, captures it and replays the kernels. A
captured graph holds raw addresses, not references: every tensor it reads that was made before
the capture must be kept alive by its owner, or its memory is reused and each replay silently
reads garbage.

:class:`RecordedGraph` runs the same body on the CPU the way a capture treats it: it records
every operation of the body (through a dispatch mode), then drops the body and its closure, and
each replay re-runs the recorded operations on the recorded tensors. Tensors made during the
capture belong to the graph (as the capture's memory pool does); tensors made before it are
held only weakly, so a replay that would read one its owner let go fails loudly, where a real
capture would read freed memory. It also refuses what a capture cannot hold: a tensor made from
host data (a host-to-device copy) and a device value read on the host (a synchronisation).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .timing import WorkMeter

# Ops that cannot sit inside a captured CUDA graph.
NOT_CAPTURABLE = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::_local_scalar_dense",
                  "aten::nonzero", "aten::masked_select", "aten::item"}


class CaptureError(RuntimeError):
    """A graph body does something a CUDA graph capture cannot hold."""


def cuda_device(device=None) -> torch.device:
    """``device`` as a CUDA device with its index (None, or ``cuda`` without an index: the
    current one)."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise ValueError(f"a CUDA graph is captured on a CUDA device, not {device}")
    return device if device.index is not None else torch.device("cuda",
                                                                torch.cuda.current_device())


class CudaGraph:
    """``fn()`` captured as a CUDA graph on ``device`` (default: the current device), whichever
    device is current when it is made or replayed; :meth:`replay` reruns it, :attr:`out` is its
    static output (overwritten by each replay)."""

    def __init__(self, fn, device=None):
        self.device = cuda_device(device)
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                fn()  # warm-up: allocator and autotuning outside the capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # captured on this device's stream (torch's shared default capture stream lives
            # on whichever device was current when it was first made)
            with torch.cuda.graph(self.graph, stream=stream):
                self.out = fn()

    def replay(self):
        with torch.cuda.device(self.device):
            self.graph.replay()


class _Ref:
    """How a recorded op reaches one argument: a value, a tensor the graph owns, or (weakly) a
    tensor made before the capture."""

    __slots__ = ("kind", "obj", "desc")

    def __init__(self, kind, obj, desc=""):
        self.kind, self.obj, self.desc = kind, obj, desc

    def get(self, op: str):
        if self.kind != "weak":
            return self.obj
        x = self.obj()
        if x is None:
            raise CaptureError(
                f"the captured graph reads a tensor ({self.desc}, an input of {op}) that was "
                "made before the capture and is no longer referenced: on a GPU its memory "
                "would be reused and every replay would read garbage; keep it on the graph's "
                "owner")
        return x


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.owned = {}  # id -> tensor made during the capture (the graph's memory pool)
        self.refused = []

    def _ref(self, x):
        if not isinstance(x, torch.Tensor):
            return _Ref("value", x)
        if self.owned.get(id(x)) is x:
            return _Ref("owned", x)
        return _Ref("weak", weakref.ref(x), f"{tuple(x.shape)} {x.dtype}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in NOT_CAPTURABLE:
            self.refused.append(func._schema.name)
        spec = tree_map(self._ref, (list(args), dict(kwargs)))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.owned.setdefault(id(t), t)
        self.ops.append((func, spec, out))
        return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride())


class RecordedGraph:
    """The CPU stand-in for :class:`CudaGraph` (see the module docstring)."""

    def __init__(self, fn, device=None):
        self.device = None if device is None else torch.device(device)
        fn()  # the warm-up run, as a capture makes one
        recorder = _Recorder()
        with recorder:
            self.out = fn()
        if recorder.refused:
            raise CaptureError(f"a graph body calls ops a CUDA graph capture refuses: "
                               f"{sorted(set(recorder.refused))}")
        self.ops = recorder.ops  # fn and its closure are dropped here, as capture drops them

    def replay(self):
        for func, spec, out in self.ops:
            name = func._schema.name
            args, kwargs = tree_map(lambda r: r.get(name), spec)
            result = func(*args, **kwargs)
            for o, r in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                if isinstance(o, torch.Tensor) and not (r is o or _same_memory(o, r)):
                    o.copy_(r)


def capture(fn, emulate: bool = False, device=None):
    """A CUDA graph of ``fn`` on ``device`` (the backend's; default: the current CUDA device),
    or, with ``emulate``, its CPU stand-in (which records ``device`` and runs where the tensors
    are)."""
    return RecordedGraph(fn, device) if emulate else CudaGraph(fn, device)


def counted_capture(be, fn, counting=None, emulate: bool = False):
    """:func:`capture` of ``fn`` on backend ``be``'s device, and the work one run of ``fn``
    does, ``(calls, weight bytes)``: a replay runs no Python, so no hook or counter sees it,
    and it adds this to a metered run instead. The warm-up run and the capture each run ``fn``
    once and are counted here (``counting(meter)``: a context that counts the backend's work
    into ``meter``; the backend's own counters use ``be.meter``, which points here meanwhile);
    their work belongs to no stage of a metered run."""
    work, outer = WorkMeter(), be.meter
    saved = outer.take() if outer is not None else None
    be.meter = work
    try:
        with counting(work) if counting is not None else contextlib.nullcontext():
            graph = capture(fn, emulate=emulate, device=be.device)
    finally:
        be.meter = outer
        if outer is not None:
            outer.take()
            outer.add(*saved)
    return graph, (work.calls // 2, work.weight_bytes // 2)
