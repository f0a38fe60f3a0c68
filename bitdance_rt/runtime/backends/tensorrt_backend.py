"""The TensorRT backend: the engines of ``bitdance-export build`` (TensorRT or TensorRT-RTX)
under the generic loop of :class:`~.graph_runtime.GraphRuntime`.

- Torch CUDA tensors are the engines' inputs and outputs, bound by address
  (``set_tensor_address``), no copies; every shape and address TensorRT refuses is an
  EngineError naming the tensor. Engines are enqueued on a non-default stream: torch's current
  one (a capture's, a caller's), or, where that is the legacy default stream (on which TensorRT
  synchronises), the backend's own stream, ordered after the torch work queued before and
  before the torch work queued after (:func:`engine_stream`).
- The KV cache is aliased in place: a native engine's cache input and output are bound to the
  same memory (TensorRT's KV cache update layer requires it).
- The head sampling loop of a block (the ``head_prepare`` calls and N + 1 ``head_step``
  enqueues) and the block step are captured as CUDA graphs on the backend's device and replayed
  (``cuda_graphs``, default on). A captured graph holds each engine call at the shapes it was
  captured with, so no input may change shape within one graph (checked while capturing; the
  ``head_prepare`` slices of N > 50 all have one size).

Before any CUDA work the engine directory is checked (:func:`bitdance_rt.manifest.check_engines`:
engine files, the export copy, the export they came from), the model it was exported from (its
config hash and weights fingerprint), the TensorRT flavor and version that built them, and the
GPU's compute capability against the engines' targets; each refusal is an EngineError naming
the fix.
"""

from __future__ import annotations

import contextlib

import torch

from ... import trt as trt_compat
from ...checkpoint import BitDanceModel
from ...errors import EngineError
from ...manifest import (GRAPHS, check_engines, engine_file, find_engine_dir, read_engines,
                         read_manifest)
from ..graphs import counted_capture
from .graph_runtime import GraphRuntime

ALIGN = 256  # bytes: what TensorRT requires of every tensor address


def check_runtime(info: dict, flavor: trt_compat.Flavor, gpu: str | None, where,
                  device_checked: bool = True) -> None:
    """The engines were built by this TensorRT (flavor and version) and, with
    ``device_checked``, for this GPU (``gpu``: its compute capability, None without one). No
    advice names a flavor or a target that cannot serve this GPU."""
    rebuild = f"rebuild them here with `bitdance-export build` ({where})"
    built = f"{trt_compat.LABEL.get(info['flavor'], info['flavor'])} {info['version']}"
    why = trt_compat.host_refusal(flavor, gpu, then=", then rebuild the engines with "
                                  f"`bitdance-export build EXPORT_DIR --trt tensorrt` ({where})")
    if why:  # no engine of this flavor runs on this GPU, whatever its version
        raise EngineError(why)
    if info["flavor"] != flavor.name or info["version"] != flavor.version:
        runs_here = gpu is None or gpu in info["targets"]
        raise EngineError(f"the engines in {where} were built by {built}, but this runtime "
                          f"has {flavor.label} {flavor.version} (engines run only with the "
                          f"version that built them); "
                          + (f"install {built} or {rebuild}" if runs_here else rebuild))
    if not device_checked:
        return
    if gpu is None:
        raise EngineError("--backend tensorrt runs on a CUDA GPU and none is visible; use "
                          "--backend onnxruntime or torch on the CPU")
    if gpu not in info["targets"]:
        auto = not flavor.rtx or gpu in trt_compat.RTX_DEFAULT_TARGETS
        raise EngineError(f"the engines in {where} were built for {', '.join(info['targets'])}, "
                          f"not for this GPU ({gpu}); {rebuild} with --target {gpu}"
                          + (" (or auto)" if auto else ""))


def load_engines(flavor, info: dict, engine_dir, names, device, check_inputs):
    """Deserialize engines ``names`` of ``engine_dir`` (each file checked first,
    :func:`~bitdance_rt.manifest.engine_file`) on the current device; ``check_inputs(name,
    tensor names, path)`` refuses an engine of another version. Returns (logger, runtime,
    engines, execution contexts)."""
    logger = flavor.logger()
    runtime = flavor.trt.Runtime(logger)
    engines, contexts = {}, {}
    for name in names:
        path = engine_file(info, engine_dir, name)  # checked, then loaded
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"{flavor.label} cannot load engine {path} on this GPU; rebuild "
                              f"it with `bitdance-export build` for {device}")
        check_inputs(name, {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)},
                     path)
        engines[name] = engine
        contexts[name] = engine.create_execution_context()
    return logger, runtime, engines, contexts


def require_gpu(device: torch.device) -> None:
    """Engines run on a CUDA device: a one-line refusal naming the way on a CPU."""
    if device.type == "cuda":
        return
    if not torch.cuda.is_available():  # say it once, not "pass --device cuda"
        raise EngineError("--backend tensorrt runs on a CUDA GPU and this machine has none; "
                          "use --backend onnxruntime (the same export) or torch here")
    raise EngineError("--backend tensorrt runs on a CUDA GPU; pass --device cuda (or use "
                      "--backend onnxruntime on the CPU)")


def bind(ctx, name: str, inputs: dict, outputs: dict, pinned: dict | None = None):
    """Set every input's shape and every tensor's address on the execution context ``ctx`` of
    engine ``name``; returns (aligned copies to keep alive until the engine ran, (output,
    aligned stand-in) pairs to copy back after it). TensorRT wants 256-byte aligned addresses:
    a view that is not (one step's 6 coefficients, a slice of the step times) goes through an
    aligned copy; the KV cache (bound as input and output: in place) always is aligned.
    ``pinned`` (while a CUDA graph is captured): the shape each input had first; a different
    one is refused, since the graph would replay the context at the shape it was captured
    with."""
    aliased = {t.data_ptr() for t in outputs.values()}
    keep, back = [], []
    for key, t in inputs.items():
        if not t.is_contiguous():
            raise RuntimeError(f"{name}: input {key} must be contiguous")
        shape = tuple(t.shape)
        if pinned is not None:
            first = pinned.setdefault((name, key), shape)
            if first != shape:
                raise EngineError(f"the {name} engine's input {key} changes shape from "
                                  f"{list(first)} to {list(shape)} inside one captured CUDA "
                                  "graph, which would replay the first shape; run with "
                                  "--no-cuda-graphs and report this")
        if t.data_ptr() % ALIGN:
            if t.data_ptr() in aliased:
                raise RuntimeError(f"{name}: the in-place tensor {key} is not aligned")
            t = t.clone()  # torch's allocations are aligned
            keep.append(t)
        if not ctx.set_input_shape(key, shape):
            raise EngineError(f"the {name} engine refused the shape {list(shape)} for its "
                              f"input {key} (outside its optimization profile); re-export with "
                              "limits that cover this request and rebuild the engines")
        if not ctx.set_tensor_address(key, t.data_ptr()):
            raise EngineError(f"the {name} engine refused the address of its input {key} "
                              f"(shape {list(shape)}, {t.dtype}); rebuild the engines with "
                              "`bitdance-export build` from this version's export")
    for key, t in outputs.items():
        if t.data_ptr() % ALIGN:
            tmp = torch.empty_like(t)
            back.append((t, tmp))
            t = tmp
        if not ctx.set_tensor_address(key, t.data_ptr()):
            raise EngineError(f"the {name} engine refused the address of its output {key} "
                              f"(shape {list(t.shape)}, {t.dtype}); rebuild the engines with "
                              "`bitdance-export build` from this version's export")
    return keep, back


@contextlib.contextmanager
def engine_stream(current, default, own, enter=None):
    """The stream to enqueue engines on: ``current`` (torch's current stream) unless it is
    ``default``, the legacy default stream, on which TensorRT synchronises; then ``own``, made
    to wait for the work queued on ``current`` so far, and ``current`` made to wait for
    everything queued on ``own`` in the block. ``enter(stream)``: a context that makes the
    stream torch's current one inside the block (``torch.cuda.stream``)."""
    if current != default:
        yield current
        return
    own.wait_stream(current)
    try:
        with enter(own) if enter is not None else contextlib.nullcontext():
            yield own
    finally:
        current.wait_stream(own)


def enqueue(ctx, name: str, inputs: dict, outputs: dict, device, own_stream, label: str,
            pinned: dict | None = None) -> None:
    """Bind torch tensors by address (:func:`bind`) and enqueue engine ``name`` (execution
    context ``ctx``) on a non-default stream ordered with torch's work (:func:`engine_stream`;
    ``own_stream``: the caller's stream for when torch's is the legacy default one)."""
    keep, back = bind(ctx, name, inputs, outputs, pinned)
    with torch.cuda.device(device), engine_stream(
            torch.cuda.current_stream(device), torch.cuda.default_stream(device), own_stream,
            torch.cuda.stream) as stream:
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{label} failed to run the {name} engine (shapes outside its "
                              "profile?); re-export with limits that cover this request and "
                              "rebuild the engines")
        for dst, tmp in back:  # ordered after the engine on the same stream
            dst.copy_(tmp)
    del keep  # the engine's reads are ordered before anything queued after this point


class TensorRTBackend(GraphRuntime):
    name = "tensorrt"

    def __init__(self, model: BitDanceModel, engine_dir, cuda_graphs: bool = True,
                 flavor: str | None = None):
        d = find_engine_dir(engine_dir)
        info = read_engines(d)
        check_engines(info, d)
        super().__init__(model, read_manifest(d), d)
        self.engine_dir, self.info = d, info
        self.flavor = trt_compat.load(flavor or info["flavor"])
        gpu = trt_compat.gpu_target(self.device) if self.device.type == "cuda" else None
        check_runtime(info, self.flavor, gpu, d, device_checked=False)
        require_gpu(self.device)
        check_runtime(info, self.flavor, gpu, d)
        self.max_steps_per_call = info.get("head_prepare_steps")
        self.cuda_graphs = cuda_graphs
        self._pinned = None  # while a graph is captured: the shape of every engine input
        # -- CUDA work starts here (on the model's device, whichever is current) --
        with torch.cuda.device(self.device):
            self._load_engines(d, info)
            self._stream = torch.cuda.Stream(self.device)  # eager enqueues (see engine_stream)
        self._head_graphs, self._block_graph = {}, None

    def _load_engines(self, d, info) -> None:
        self._logger, self.runtime, self.engines, self.contexts = load_engines(
            self.flavor, info, d, GRAPHS, self.device, self.check_inputs)

    def _graph_bytes(self, name: str) -> int:
        return self.info["engines"][name]["bytes"]

    def _run(self, name: str, inputs: dict, outputs: dict) -> None:
        enqueue(self.contexts[name], name, inputs, outputs, self.device, self._stream,
                self.flavor.label, self._pinned)

    @contextlib.contextmanager
    def _one_shape_per_input(self):
        """While a graph is captured (its warm-up included): every engine input keeps one
        shape (see :func:`bind`)."""
        self._pinned = {}
        try:
            yield
        finally:
            self._pinned = None

    # -- CUDA graphs ----------------------------------------------------------------------------

    def forget_plan(self) -> None:
        self._head_graphs, self._block_graph = {}, None

    def sample_head(self, cond: torch.Tensor, noise: list) -> torch.Tensor:
        if not self.cuda_graphs:
            return super().sample_head(cond, noise)
        key = (cond.shape[0], noise[0].shape[0])
        if key not in self._head_graphs:
            self._head_graphs[key] = HeadLoopGraph(self, cond, noise)
        return self._head_graphs[key](cond, noise)

    def block_step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        if not self.cuda_graphs:
            return super().block_step(tokens, block)
        self._reserve(self.parallel_num)
        if self._block_graph is None or self._block_graph.batch != tokens.shape[0]:
            self._block_graph = BlockStepGraph(self, tokens, block)
            return self._block_graph.out.clone()  # the capture's warm-up did this block
        return self._block_graph(tokens, block)


class HeadLoopGraph:
    """``head_prepare`` and the N + 1 ``head_step`` enqueues of one block as one CUDA graph,
    over buffers it owns (condition and noise are copied in before each replay)."""

    def __init__(self, be: TensorRTBackend, cond, noise):
        self.cond = torch.empty_like(cond)
        self.noise = torch.empty((len(noise),) + tuple(noise[0].shape), device=be.device)
        self.copy_in(cond, noise)
        self.be = be
        with be._one_shape_per_input():
            self.graph, self.work = counted_capture(
                be, lambda: GraphRuntime.sample_head(be, self.cond, list(self.noise.unbind(0))))

    def copy_in(self, cond, noise):
        self.cond.copy_(cond)
        self.noise.copy_(torch.stack(noise))

    def __call__(self, cond, noise):
        self.copy_in(cond, noise)
        self.graph.replay()
        if self.be.meter is not None:
            self.be.meter.add(*self.work)
        return self.graph.out.clone()


class BlockStepGraph:
    """The block step as one CUDA graph: tokens and the two position embeddings are copied
    into its buffers before each replay; the cache lengths advance on the device inside it.
    Capturing runs the step once (the warm-up), which does the block it was made for."""

    def __init__(self, be: TensorRTBackend, tokens, block: int):
        self.be, self.batch = be, tokens.shape[0]
        rows, p = be.cache_k.shape[1], be.parallel_num
        self.tokens = tokens.float().clone()
        self.pe = be.pe_blocks[block].clone()
        self.pe_next = be.pe_blocks[block + 1].clone()
        self.cond = torch.empty(rows, p, be.spec.llm.hidden_size, device=be.device)

        def run():
            be._block_step(self.tokens, self.pe, self.pe_next, self.cond)
            return self.cond

        with be._one_shape_per_input():  # the warm-up wrote this block, advanced the lengths
            self.graph, self.work = counted_capture(be, run)
        if be.meter is not None:  # the warm-up was this block's step
            be.meter.add(*self.work)
        self.out = self.cond

    def __call__(self, tokens, block: int):
        be = self.be
        self.tokens.copy_(tokens)
        self.pe.copy_(be.pe_blocks[block])
        self.pe_next.copy_(be.pe_blocks[block + 1])
        self.graph.replay()
        if be.meter is not None:
            be.meter.add(*self.work)
        return self.cond.clone()
