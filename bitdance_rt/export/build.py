"""``bitdance-export build``: one TensorRT engine per graph of an export, and ``engines.json``.

Each ONNX graph is parsed into a strongly typed network (precision comes from the graph's own
types: the export's ``--dtype``), given one optimization profile whose min/opt/max shapes come
from the manifest for every dynamic axis (:func:`dim_ranges`), and built for the targets asked
(:func:`resolve_targets`). The engine directory (default ``EXPORT_DIR/engines``) is written to a
staging directory that replaces the old one only when every engine is built; it holds the
engines, a byte copy of the export's ``manifest.json`` (so it runs without the ONNX files) and
``engines.json``: the TensorRT flavor and version, the targets, every engine's profile, size,
build time and sha256, and the sha256 of the export's manifest and ONNX files, which the runtime
checks (:func:`bitdance_rt.manifest.check_engines`).

TensorRT's attention layers are made decomposable: where no fused kernel covers a graph's
attention (small head sizes, float32), TensorRT falls back to separate kernels instead of
failing the build.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..errors import BitDanceError, EngineError
from .. import signals
from ..files import atomic_path, staged_directory
from ..manifest import (ENGINES, ENGINES_FORMAT, ENGINES_SUBDIR, MANIFEST, check_files,
                        engine_files, graph_file, graph_names, read_manifest, remember_hashes,
                        sha256_file)
from ..spec import LATENT_STRIDE
from .. import trt as trt_compat
from .common import check_out_dir

TARGETS = ("auto", "sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "sm121")
# head_prepare takes at most this many step times per call (N = 50 in one call); the runtime
# splits longer schedules
HEAD_PREPARE_STEPS = 51
OPT_PROMPT = 64


def parse_size(text: str | None, what: str = "--opt-size") -> tuple[int, int] | None:
    """``"HxW"`` in pixels -> latent ``(h, w)``."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise BitDanceError(f"{what} must be HEIGHTxWIDTH in pixels (e.g. 1024x1024); got "
                            f"{text!r}") from None
    if h <= 0 or w <= 0 or h % LATENT_STRIDE or w % LATENT_STRIDE:
        raise BitDanceError(f"{what} {text}: both sides must be positive multiples of "
                            f"{LATENT_STRIDE} pixels")
    return h // LATENT_STRIDE, w // LATENT_STRIDE


TURING = ("sm75",)  # TensorRT-RTX: fp16 matrix products only (no fp32 GEMM, no bf16)


def resolve_targets(flavor: trt_compat.Flavor, target: str) -> tuple[list[str], list]:
    """(names recorded in engines.json, the flavor's compute-capability values to set; empty:
    the flavor's default). TensorRT-RTX's default is its portable set (Ampere and later);
    datacenter TensorRT builds for the visible GPU, which ``target`` must match."""
    target = (target or "auto").lower()
    if target not in TARGETS:
        raise BitDanceError(f"unknown --target {target!r}; choose one of {list(TARGETS)}")
    if flavor.rtx:
        if target == "auto":
            return list(trt_compat.RTX_DEFAULT_TARGETS), []
        caps = flavor.compute_capabilities()
        if target not in caps:
            raise trt_compat.TensorRTError(
                f"{flavor.label} {flavor.version} cannot build for {target} (its targets: "
                f"{sorted(caps)}); H100/H200 (sm90) and B200 (sm100) need datacenter "
                "TensorRT: install it and pass --trt tensorrt")
        return [target], [caps[target]]
    gpu = trt_compat.gpu_target()
    if gpu is None:
        raise trt_compat.TensorRTError(
            f"{flavor.label} builds engines on the GPU that will run them, and no CUDA device is "
            "visible; build on that GPU, or use TensorRT-RTX (pip install tensorrt-rtx-cu12), "
            "which builds for GeForce/RTX cards without one")
    if target not in ("auto", gpu):
        raise trt_compat.TensorRTError(
            f"--target {target}: {flavor.label} builds for the visible GPU ({gpu}); build on a "
            f"{target} GPU or pass --target auto")
    return [gpu], []


def check_build_settings(*, attention: str, dtype: str, target: str = "auto",
                         flavor: str | None = None, timing_cache=None, opt_size=None,
                         opt_batch: int | None = None) -> trt_compat.Flavor:
    """Everything ``build`` can refuse, checked before any work (and, for the one-shot
    ``--engines``, before the weights load)."""
    fl = trt_compat.load(flavor)
    resolve_targets(fl, target)
    if (target or "auto").lower() == "auto":  # engines for this machine: can its GPU run them?
        why = trt_compat.host_refusal(
            fl, trt_compat.gpu_target(), then=" and build with --trt tensorrt; or pass "
            f"--target with one of {', '.join(fl.targets() or ())} to build for another GPU")
        if why:
            raise trt_compat.TensorRTError(why)
    if attention == "native":
        why = fl.native_attention()
        if why:
            raise trt_compat.TensorRTError(why)
    names = resolve_targets(fl, target)[0]
    if fl.rtx and dtype != "fp16" and any(t in TURING for t in names):
        raise BitDanceError(
            f"--target {'/'.join(t for t in names if t in TURING)}: {fl.label} builds only fp16 "
            f"matrix products for Turing GPUs, and this export is {dtype}; build from an export "
            "made with --dtype fp16, or choose --target sm80 or newer")
    parse_size(opt_size)
    if opt_batch is not None and opt_batch < 1:
        raise BitDanceError("--opt-batch must be at least 1")
    if attention == "plugin" and not fl.plugins:
        raise trt_compat.TensorRTError(
            f"--attention plugin needs TensorRT plugin layers, which {fl.label} does not have; "
            "export with --attention native (TensorRT's own attention layers) instead")
    if timing_cache is not None and Path(timing_cache).is_dir():
        raise BitDanceError(f"--timing-cache {timing_cache} is a directory; name a file")
    return fl


def dim_ranges(manifest: dict, opt_size=None, opt_batch: int | None = None) -> dict:
    """``{dim name: (min, opt, max)}`` for every dynamic axis of the graphs."""
    limits, p = manifest["limits"], manifest["parallel_num"]
    max_batch, max_rows, max_seq = limits["max_batch"], limits["max_rows"], limits["max_seq"]
    slots = manifest.get("cache_slots") or max_seq
    sizes = manifest.get("sizes") or [manifest.get("default_size", [1024, 1024])]
    hs = [h // LATENT_STRIDE for h, _ in sizes]
    ws = [w // LATENT_STRIDE for _, w in sizes]
    opt_h, opt_w = parse_size(opt_size) or tuple(
        v // LATENT_STRIDE for v in manifest.get("default_size", sizes[0]))
    ob = opt_batch or 1

    def clamp(lo, opt, hi):
        return lo, max(lo, min(opt, hi)), hi

    ranges = {}
    if manifest.get("past_range"):  # the class-conditional family's cache length
        lo, hi = manifest["past_range"]
        ranges["past"] = clamp(lo, (lo + hi) // 2, hi)
    return {
        **ranges,
        "batch": clamp(1, ob, max_batch),
        "rows": clamp(1, 2 * ob, max_rows),
        "prompt_len": clamp(1, OPT_PROMPT, max(1, slots - p)),
        "cache_slots": clamp(1, OPT_PROMPT + opt_h * opt_w, max_seq),
        "steps": clamp(1, HEAD_PREPARE_STEPS, HEAD_PREPARE_STEPS),
        "latent_h": clamp(min(hs), opt_h, max(hs)),
        "latent_w": clamp(min(ws), opt_w, max(ws)),
    }


def graph_profile(graph: dict, ranges: dict) -> dict:
    """``{input: {"min", "opt", "max"}}`` for the graph's inputs with a dynamic axis."""
    out = {}
    for v in graph["inputs"]:
        shape = v["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        unknown = [d for d in shape if isinstance(d, str) and d not in ranges]
        if unknown:
            raise EngineError(f"input {v['name']} has the dynamic axis {unknown[0]!r}, which "
                              "this version cannot size; re-export with this version")
        out[v["name"]] = {k: [d if isinstance(d, int) else ranges[d][i] for d in shape]
                          for i, k in enumerate(("min", "opt", "max"))}
    return out


class _Log:
    """Collects TensorRT's messages: errors go into the exception, the rest only with
    BITDANCE_DEBUG."""

    def __init__(self, trt):
        base = trt.ILogger
        sev = trt.ILogger.Severity
        debug = bool(os.environ.get("BITDANCE_DEBUG"))
        errors = self.errors = []

        class Logger(base):
            def __init__(self):
                base.__init__(self)

            def log(self, severity, msg):
                if severity in (sev.ERROR, sev.INTERNAL_ERROR):
                    errors.append(msg)
                if debug or severity == sev.INTERNAL_ERROR:
                    print(f"[{str(severity).split('.')[-1]}] {msg}", flush=True)

        self.logger = Logger()

    def first(self, default: str) -> str:
        text = self.errors[0] if self.errors else default
        return " ".join(text.split())[:300]


def _cancel_on_signal(trt):
    """A progress monitor that cancels the build once Ctrl-C or SIGTERM came (None where the
    TensorRT has no progress monitors)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Cancel(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def phase_finish(self, phase_name):
            pass

        def step_complete(self, phase_name, step):
            return signals.received() is None

    return Cancel()


def _decomposable_attention(trt, network) -> int:
    """Let every attention layer fall back to separate kernels (see the module docstring).
    A TensorRT without attention layers (datacenter TensorRT before 10.14) has none to set:
    its standard and plugin graphs build as they are."""
    kind = getattr(getattr(trt, "LayerType", None), "ATTENTION_OUTPUT", None)
    boundary = getattr(trt, "IAttentionBoundaryLayer", None)
    if kind is None or boundary is None:
        return 0
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = boundary
            layer.attention.decomposable = True
            n += 1
    return n


def build_engine(flavor: trt_compat.Flavor, onnx_path: Path, profile: dict, caps: list,
                 timing_cache: bytes | None = None):
    """One serialized engine (``IHostMemory``) and the timing cache after the build."""
    trt = flavor.trt
    log = _Log(trt)
    builder = trt.Builder(log.logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, log.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{flavor.label} {flavor.version} cannot parse {onnx_path} "
                          f"({' '.join((errors or log.errors or ['?'])[0].split())[:300]}); "
                          "re-export with this version of bitdance-export")
    _decomposable_attention(trt, network)
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            raise EngineError(f"{onnx_path}: input {tensor.name} is a TensorRT shape tensor, "
                              "which this runtime does not feed; re-export with this version")
        if tensor.name in profile:
            r = profile[tensor.name]
            prof.set_shape(tensor.name, r["min"], r["opt"], r["max"])
    config.add_optimization_profile(prof)
    if caps:
        config.num_compute_capabilities = len(caps)
        for i, cap in enumerate(caps):
            config.set_compute_capability(cap, i)
    if not flavor.rtx:  # TensorRT-RTX tunes on the device at first use: no timing cache
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _cancel_on_signal(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    # The build runs in native code and calls back into Python; an interrupt raised inside a
    # callback would be swallowed there: a signal waits (held) and the monitor ends the build
    # at its next step, then the signal is raised.
    with signals.held():
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{flavor.label} {flavor.version} could not build an engine from "
                          f"{onnx_path} ({log.first('no reason given')}); set BITDANCE_DEBUG=1 "
                          "for its whole log")
    new_cache = None
    if not flavor.rtx and config.get_timing_cache() is not None:
        new_cache = bytes(config.get_timing_cache().serialize())
    return plan, new_cache


def build_engines(export_dir, out=None, *, target: str = "auto", timing_cache=None,
                  opt_size=None, opt_batch: int | None = None, flavor: str | None = None,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Build an engine per graph of ``export_dir`` into ``out`` (default
    ``export_dir/engines``); returns the engines.json written."""
    export = Path(export_dir)
    manifest = read_manifest(export)
    check_files(manifest, export)  # every ONNX file is what the export wrote
    fl = check_build_settings(attention=manifest.get("attention", "standard"),
                              dtype=manifest["dtype"], target=target, flavor=flavor,
                              timing_cache=timing_cache, opt_size=opt_size, opt_batch=opt_batch)
    out = Path(out) if out is not None else export / ENGINES_SUBDIR
    graphs = graph_names(manifest)
    writes = {ENGINES, MANIFEST} | {f"{name}.engine" for name in graphs}
    check_out_dir(out, "engine directory", ENGINES, engine_files, writes,
                  size=sum(n for g in manifest["graphs"].values() for n in g["files"].values()))
    names, caps = resolve_targets(fl, target)
    ranges = dim_ranges(manifest, opt_size, opt_batch)
    if manifest.get("attention") == "plugin":
        from ..attention.tensorrt_plugin import register_plugin

        register_plugin()
    say = progress or (lambda line: None)
    cache = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() \
        else None
    if timing_cache and fl.rtx:
        say(f"--timing-cache ignored: {fl.label} has no timing cache (it tunes its kernels on "
            "the GPU at first use)")
    inside = out.absolute().parent.resolve() == export.resolve()
    engines = {}
    with staged_directory(out, engine_files, "engine directory") as stage:
        for i, name in enumerate(graphs):
            graph = manifest["graphs"][name]
            profile = graph_profile(graph, ranges)
            t0 = time.perf_counter()
            plan, cache = build_engine(fl, graph_file(manifest, export, name), profile, caps,
                                       cache)
            file = f"{name}.engine"
            with open(stage / file, "wb") as f:
                f.write(plan)
            del plan
            seconds = time.perf_counter() - t0
            size = (stage / file).stat().st_size
            engines[name] = {"file": file, "bytes": size, "sha256": sha256_file(stage / file),
                             "build_s": round(seconds, 2), "profile": profile}
            say(f"[{i + 1}/{len(graphs)}] {name}: {file} ({size / 1e6:.1f} MB) in "
                f"{seconds:.1f}s ({fl.label} {fl.version}, {', '.join(names)})")
        shutil.copyfile(export / MANIFEST, stage / MANIFEST)
        onnx = {f: sha for g in manifest["graphs"].values() for f, sha in g["sha256"].items()}
        info = {
            "format": ENGINES_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "flavor": fl.name,
            "version": fl.version,
            "targets": names,
            "export": {"dir": ".." if inside else str(export.resolve()),
                       "manifest_sha256": sha256_file(export / MANIFEST),
                       "onnx_sha256": onnx},
            "config_hash": manifest["config_hash"],
            "weights_fingerprint": manifest.get("weights_fingerprint"),
            "dtype": manifest["dtype"],
            "attention": manifest.get("attention", "standard"),
            "cache_slots": manifest.get("cache_slots"),
            "head_prepare_steps": HEAD_PREPARE_STEPS,
            "tools": {"bitdance-rt": _version(), fl.name: fl.version},
            "engines": engines,
        }
        (stage / ENGINES).write_text(json.dumps(info, indent=2) + "\n")
        remember_hashes(stage, {MANIFEST: info["export"]["manifest_sha256"],
                                **{e["file"]: e["sha256"] for e in engines.values()}})
    if timing_cache and cache:
        with atomic_path(Path(timing_cache)) as tmp:
            tmp.write_bytes(cache)
    return info


def export_with_engines(checkpoint, out_dir, *, build: dict, attention: str = "native",
                        progress: Callable[[str], None] | None = None, **export) -> dict:
    """The one-shot ``bitdance-export --engines``: the TensorRT settings are checked before
    the weights load, then the export and its engines (in ``out_dir/engines``) are written to
    one staging directory that replaces ``out_dir`` only when both are complete. ``export``:
    the keyword arguments of :func:`~bitdance_rt.export.exporter.export_checkpoint`."""
    from .exporter import export_checkpoint

    check_build_settings(attention=attention, dtype=export.get("dtype", "fp32"), **build)

    def finish(stage: Path) -> None:
        build_engines(stage, stage / ENGINES_SUBDIR, progress=progress, **build)

    return export_checkpoint(checkpoint, out_dir, attention=attention, finish=finish,
                             progress=progress, **export)


def _version() -> str:
    try:
        return metadata.version("bitdance-rt")
    except metadata.PackageNotFoundError:
        return "unknown"
