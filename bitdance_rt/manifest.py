"""An export directory's ``manifest.json``: writing it (the exporter), reading and verifying
it (the runtime, ``check`` and ``build``), and the content hashes that make every file the
runtime trusts checkable.

A manifest records the preset, the config hash of the exported model (``ModelSpec.config_hash()``,
of the truncated model when ``--num-layers`` was given, with the checkpoint's own hash beside
it), the dtype, opset, attention, the supported envelope (``max_batch``, ``max_seq``), tool
versions, and per graph its files with their sizes and content hashes and every input and
output with shape, dtype and dynamic axes, and a fingerprint of the checkpoint's weights
(:func:`~bitdance_rt.checkpoint.weights_fingerprint`).

A consumer refuses a directory that does not match the model it is given (its shapes or its
weights), that another version of ``bitdance-export`` wrote, or whose files are missing, of the
wrong size or of other content than the export wrote (sha256), each with an
:class:`~bitdance_rt.errors.EngineError` naming the file and the fix.

Hashing a 28 GB export takes tens of seconds, so a verified hash is remembered per directory in
:data:`VERIFIED` (file name, size, modification time and inode): a file that was not touched
since is not read again. Writing a file changes its modification time, so damage done by a
write (a copy, an editor, a truncated transfer) is always rehashed.

The graph inputs and outputs that runtime and exporter agree on live here too: the names of
the per-layer KV cache tensors of ``--attention native`` graphs (cache in, cache out, the same
buffer) and the inputs the runtime feeds each graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from .errors import EngineError

MANIFEST = "manifest.json"
FORMAT = 4  # 3: sha256 of every graph file; native attention (per-layer caches in and out);
#            4: the plugin form's node is bitdance::kv_attend (it reads the cache only)
GRAPHS = ("prefill", "block_step", "head_prepare", "head_step", "decoder")
VERIFIED = ".bitdance-verified.json"  # the per-directory cache of verified hashes

# Inputs the runtime feeds each graph besides a native graph's caches (a directory from another
# version may differ).
GRAPH_INPUTS = {
    "prefill": {"input_ids", "input_lens", "block_ids", "pe"},
    "block_step": {"tokens", "pe", "pe_next", "cache_lens"},
    "head_prepare": {"cond", "times"},
    "head_step": {"x", "coeffs", "noise", "ada_mod", "final_mod", "guidance"},
    "decoder": {"latent"},
}
STACKED_CACHE = ("k_cache", "v_cache")  # block_step of standard and plugin graphs
LLM_GRAPHS = ("prefill", "block_step")


def cache_inputs(num_layers: int) -> list[str]:
    """A native LLM graph's cache inputs, ``[S, Hkv, S_max, D]`` each: keys of every layer,
    then values."""
    return [f"k_cache_{i}" for i in range(num_layers)] + [f"v_cache_{i}" for i in range(num_layers)]


def cache_outputs(num_layers: int) -> list[str]:
    """The same caches after the graph wrote its new tokens; the runtime binds each to the
    memory of its input (TensorRT requires it, ONNX Runtime then writes in place)."""
    return [f"k_cache_out_{i}" for i in range(num_layers)] + [
        f"v_cache_out_{i}" for i in range(num_layers)]


def expected_inputs(name: str, attention: str, num_layers: int) -> set[str]:
    """Every input the runtime feeds graph ``name`` of an export with ``attention``."""
    want = set(GRAPH_INPUTS[name])
    if name in LLM_GRAPHS and attention == "native":
        want |= set(cache_inputs(num_layers))
    elif name == "block_step":
        want |= set(STACKED_CACHE)
    return want


def read_manifest(engine_dir) -> dict:
    d = Path(engine_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise EngineError(f"export directory {d} does not exist; write one with "
                          "`bitdance-export --checkpoint CKPT --out DIR`")
    if not path.is_file():
        raise EngineError(f"{path} is missing: {d} is not a complete `bitdance-export` output "
                          "(re-run the export into it)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}); re-run the export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineError(f"{path} is not a format-{FORMAT} bitdance-rt manifest (another "
                          "version of bitdance-export wrote it); re-run the export with this "
                          "version")
    missing = [k for k in ("config_hash", "graphs", "dtype") if k not in manifest]
    if missing:
        raise EngineError(f"{path} lacks {missing}; re-run the export")
    return manifest


def check_model(manifest: dict, spec, engine_dir) -> None:
    """Refuse a directory exported from another model (its config hash differs)."""
    want = spec.config_hash()
    if manifest["config_hash"] == want:
        return
    layers = manifest.get("num_layers")
    if manifest.get("checkpoint_config_hash") == want and layers is not None:
        raise EngineError(
            f"{engine_dir} was exported with --num-layers {layers} (a truncated test export); "
            "re-export without --num-layers to generate with this checkpoint")
    raise EngineError(
        f"{engine_dir} was exported from another model (preset {manifest.get('preset')!r}, "
        f"config hash {manifest['config_hash']}) than the checkpoint given (config hash {want}); "
        "re-export from this checkpoint or pass the matching --checkpoint")


def check_weights(manifest: dict, ckpt_dir, engine_dir) -> None:
    """Refuse a directory exported from other weights of the same architecture (another seed,
    a fine-tune): the manifest's weights fingerprint must match the checkpoint's. Exports of
    an in-memory model carry none and are not checked."""
    from .checkpoint import weights_fingerprint

    want = manifest.get("weights_fingerprint")
    if want is None or ckpt_dir is None:
        return
    have = weights_fingerprint(ckpt_dir)
    if have != want:
        raise EngineError(
            f"{engine_dir} was exported from other weights (fingerprint {want}) than the "
            f"checkpoint {ckpt_dir} (fingerprint {have}), although both have the same shapes; "
            "re-export from this checkpoint or pass the checkpoint it was exported from")


def check_files(manifest: dict, engine_dir, names=GRAPHS) -> None:
    """Every graph file exists, has the size and the content (sha256) the export wrote."""
    d = Path(engine_dir)
    fix = f"re-run `bitdance-export` into {d}"
    hashes = {}
    for name in names:
        graph = manifest["graphs"].get(name)
        if graph is None:
            raise EngineError(
                f"{d / MANIFEST} lists no {name!r} graph: {d} was written by another version "
                "of bitdance-export, whose graphs this version cannot run; re-export it with "
                f"`bitdance-export --checkpoint CKPT --out {d}`")
        sha = graph.get("sha256", {})
        for f, size in graph["files"].items():
            if f not in sha:
                raise EngineError(f"{d / MANIFEST} records no content hash of {f}; {fix}")
            check_size(d / f, size, "graph file", fix)
            hashes[f] = sha[f]
    verify_hashes(d, hashes, "graph file", fix)


def check_size(path: Path, size: int, what: str, fix: str) -> None:
    if not path.is_file():
        raise EngineError(f"{what} {path} is missing; {fix}")
    have = path.stat().st_size
    if have != size:
        raise EngineError(f"{what} {path} is corrupt or truncated ({have} bytes, {size} were "
                          f"written); {fix}")


# -- content hashes ----------------------------------------------------------------------------


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list:
    st = path.stat()
    # ctime too: a write that restores the modification time (touch -r) still changes it
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _read_verified(d: Path) -> dict:
    try:
        data = json.loads((d / VERIFIED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_hashes(d, hashes: dict) -> None:
    """Record that the files ``hashes`` names (relative to ``d``) have these contents now (a
    writer that just hashed what it wrote calls this, so the first reader need not rehash).
    A read-only directory simply keeps no record."""
    d = Path(d)
    known = _read_verified(d)
    for f, sha in hashes.items():
        with contextlib.suppress(OSError):
            known[f] = _stamp(d / f) + [sha]
    tmp = d / f"{VERIFIED}.{os.getpid()}.partial"
    try:
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, d / VERIFIED)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def verify_hashes(d, hashes: dict, what: str, fix: str) -> None:
    """Each file of ``hashes`` (relative to ``d``) has that sha256; a file whose size,
    modification and change times and inode are those recorded when it was last verified is
    not read again. Raises EngineError naming the first file that differs and ``fix``."""
    d = Path(d)
    known = _read_verified(d)
    fresh = {}
    for f, want in hashes.items():
        path = d / f
        if not path.is_file():
            raise EngineError(f"{what} {path} is missing; {fix}")
        rec = known.get(f)
        stamp = _stamp(path)
        if isinstance(rec, list) and rec[:len(stamp)] == stamp and rec[len(stamp):] == [want]:
            continue
        have = sha256_file(path)
        if have != want:
            raise EngineError(f"{what} {path} has changed since it was written (its sha256 is "
                              f"{have[:16]}..., {want[:16]}... was recorded); {fix}")
        fresh[f] = have
    if fresh:
        remember_hashes(d, fresh)


# -- engines.json: TensorRT engines built from an export ------------------------------------------

ENGINES = "engines.json"
ENGINES_FORMAT = 1
ENGINES_SUBDIR = "engines"  # where `bitdance-export build EXPORT_DIR` puts them by default


def find_engine_dir(d) -> Path:
    """``d`` if it holds ``engines.json``, else ``d/engines`` (an export with its engines)."""
    d = Path(d)
    for candidate in (d, d / ENGINES_SUBDIR):
        if (candidate / ENGINES).is_file():
            return candidate
    if not d.is_dir():
        raise EngineError(f"engine directory {d} does not exist; build engines with "
                          "`bitdance-export build EXPORT_DIR`")
    raise EngineError(f"{d} holds no {ENGINES} (nor does {d / ENGINES_SUBDIR}): it has no "
                      f"TensorRT engines; build them with `bitdance-export build "
                      f"{d if (d / MANIFEST).is_file() else 'EXPORT_DIR'}`")


def read_engines(d) -> dict:
    path = Path(d) / ENGINES
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} cannot be read ({e}); rebuild the engines with "
                          "`bitdance-export build EXPORT_DIR`") from None
    if not isinstance(info, dict) or info.get("format") != ENGINES_FORMAT:
        raise EngineError(f"{path} is not a format-{ENGINES_FORMAT} engines.json (another "
                          "version of bitdance-export wrote it); rebuild the engines with "
                          "`bitdance-export build EXPORT_DIR`")
    missing = [k for k in ("flavor", "version", "targets", "export", "engines") if k not in info]
    if missing:
        raise EngineError(f"{path} lacks {missing}; rebuild the engines")
    return info


def export_dir_of(info: dict, engine_dir) -> Path:
    """The export the engines were built from (recorded relative to the engine directory
    when inside it, so that the two move together)."""
    return (Path(engine_dir) / info["export"]["dir"]).resolve()


def check_engines(info: dict, engine_dir) -> None:
    """The engine directory is what ``build`` wrote: its copy of the export's manifest and
    every engine file have the recorded sha256; and when the export it was built from is
    still there, that export has not changed since (re-exported, or a graph file damaged)."""
    d = Path(engine_dir)
    export = export_dir_of(info, d)
    rebuild = f"rebuild them with `bitdance-export build {export}`"
    verify_hashes(d, {MANIFEST: info["export"]["manifest_sha256"]}, "manifest copy",
                  f"the engine directory was modified; {rebuild}")
    hashes = {}
    for name in GRAPHS:
        entry = info["engines"].get(name)
        if entry is None:
            raise EngineError(f"{d / ENGINES} lists no {name!r} engine; {rebuild}")
        check_size(d / entry["file"], entry["bytes"], "engine file", rebuild)
        hashes[entry["file"]] = entry["sha256"]
    verify_hashes(d, hashes, "engine file", rebuild)
    if (export / MANIFEST).is_file():
        if sha256_file(export / MANIFEST) != info["export"]["manifest_sha256"]:
            raise EngineError(f"the engines in {d} were built from an earlier export in "
                              f"{export} (it was exported again since); {rebuild}")
        verify_hashes(export, info["export"]["onnx_sha256"], "graph file",
                      f"re-run `bitdance-export` into {export}, then rebuild the engines")


def ort_session_options(manifest: dict, cpu: bool):
    """ONNX Runtime session options for the graphs of ``manifest``: no spinning intra-op
    threads on the CPU (the graphs alternate every block, and a spinning pool takes the cores
    from the next graph's), and basic graph optimizations for E4M3 activation Q/DQ (ONNX
    Runtime's default QDQ propagation moves an E4M3 tensor through a Transpose it has no CPU
    kernel for)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if cpu:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "fp8-activations" in (manifest.get("quantization") or ()):
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return opts


# ----------------------------------------------------------------------------------------------
# Writing a manifest (the exporter)


def tool_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("bitdance-rt", "torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime",
                "polygraphy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _value_info(v) -> dict:
    from onnx import helper

    t = v.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
    return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name
            if t.elem_type != 16 else "bfloat16", "shape": shape}


def describe_graph(out_dir: Path, files: list[str]) -> dict:
    """Files, sizes, inputs, outputs and dynamic axes of a written graph."""
    import onnx

    model = onnx.load(str(out_dir / files[0]), load_external_data=False)
    inputs = [_value_info(v) for v in model.graph.input]
    outputs = [_value_info(v) for v in model.graph.output]
    dynamic = {}
    for v in inputs + outputs:
        axes = {str(i): d for i, d in enumerate(v["shape"]) if isinstance(d, str)}
        if axes:
            dynamic[v["name"]] = axes
    hashes = {f: sha256_file(out_dir / f) for f in files}
    remember_hashes(out_dir, hashes)  # the first run after the export need not rehash
    return {"file": files[0], "files": {f: (out_dir / f).stat().st_size for f in files},
            "sha256": hashes, "inputs": inputs, "outputs": outputs, "dynamic_axes": dynamic,
            "external_data": len(files) > 1}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
