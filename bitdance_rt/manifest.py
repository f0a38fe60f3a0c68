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

Hashes cannot be walked around: a manifest (and ``engines.json``) is read through the one JSON
reader with its schema (:data:`MANIFEST_SCHEMA`, :data:`ENGINES_SCHEMA`: every field typed);
every graph has one list of files, each with its size and sha256, and the ``file`` it loads
must be one of them; every listed name stays inside the directory
(:func:`~bitdance_rt.files.inside`: no absolute paths, no ``..``, no symbolic links leading
out); and a graph or engine is opened only through :func:`graph_file` / :func:`engine_file`,
which verify its files first.

Hashing a 28 GB export takes tens of seconds, so a verified hash is remembered per directory in
:data:`VERIFIED` (file name, size, modification time and inode): a file that was not touched
since is not read again. Writing a file changes its modification time, so damage done by a
write (a copy, an editor, a truncated transfer) is always rehashed.

The graph inputs and outputs that runtime and exporter agree on live here too: the names of
the per-layer KV cache tensors of ``--attention native`` graphs (cache in, cache out, the same
buffer) and the inputs the runtime feeds each graph.
"""

from __future__ import annotations

import json
import platform
import re
import time
from importlib import metadata
from pathlib import Path

from .errors import EngineError
from .verified import (VERIFIED, recall_verdict, remember_hashes,  # noqa: F401  (re-exported)
                       remember_verdict, sha256_file, verdict_record, verify_hashes)
from .files import (PATH_TEXT, PLAIN_NAME, Check, MapOf, Nullable, Opt, check_schema, inside,
                    is_plain_name, read_json)

MANIFEST = "manifest.json"
FORMAT = 4  # 3: sha256 of every graph file; native attention (per-layer caches in and out);
#            4: the plugin form's node is bitdance::kv_attend (it reads the cache only)
GRAPHS = ("prefill", "block_step", "head_prepare", "head_step", "decoder")
# The class-conditional (ImageNet) family's graphs: its transformer's first and next AR steps,
# then the same head and decoder graphs
IMAGENET_GRAPHS = ("first_step", "next_step", "head_prepare", "head_step", "decoder")


def graph_names(manifest: dict) -> tuple:
    """The graphs of an export, by its model family."""
    return IMAGENET_GRAPHS if manifest.get("family") == "imagenet" else GRAPHS

# Inputs the runtime feeds each graph besides a native graph's caches (a directory from another
# version may differ).
GRAPH_INPUTS = {
    "prefill": {"input_ids", "input_lens", "block_ids", "pe"},
    "block_step": {"tokens", "pe", "pe_next", "cache_lens"},
    "head_prepare": {"cond", "times"},
    "head_step": {"x", "coeffs", "noise", "ada_mod", "final_mod", "guidance"},
    "decoder": {"latent"},
    "first_step": {"labels"},
    "next_step": {"tokens", "past_keys", "past_values"},
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


# The shape of a manifest (older versions' manifests are refused by their format first).
SHA256 = Check(str, lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None,
               "a sha256 (64 lower-case hex digits)")
SIZE = Check(int, lambda v: v >= 0, "a size in bytes (an integer >= 0)")
POSITIVE = Check(int, lambda v: v >= 1, "an integer >= 1")
PAIR = Check([int], lambda v: len(v) == 2 and min(v) > 0, "[height, width] in pixels")
_TENSOR = {"name": str, "dtype": str, "shape": [(int, str)]}
GRAPH_SCHEMA = {
    "file": PLAIN_NAME,                 # the file that is loaded: one of ``files``
    "files": MapOf(SIZE, PLAIN_NAME),   # every file of the graph, with its size ...
    "sha256": MapOf(SHA256, PLAIN_NAME),  # ... and its content hash
    "inputs": [_TENSOR], "outputs": [_TENSOR],
    "dynamic_axes": Opt(MapOf(MapOf(str))), "external_data": Opt(bool),
}
MANIFEST_SCHEMA = {
    "format": int, "config_hash": str, "dtype": str, "parallel_num": POSITIVE,
    "family": Opt(str), "past_range": Opt([POSITIVE]),
    "graphs": MapOf(GRAPH_SCHEMA),
    "limits": {"max_batch": POSITIVE, "max_rows": POSITIVE, "max_seq": POSITIVE},
    "preset": Opt(Nullable(str)), "checkpoint_config_hash": Opt(Nullable(str)),
    "weights_fingerprint": Opt(Nullable(str)), "num_layers": Opt(Nullable(POSITIVE)),
    "gan_decoder": Opt(bool), "opset": Opt(int), "attention": Opt(str),
    "quantization": Opt(Nullable([str])), "cache_slots": Opt(Nullable(POSITIVE)),
    "sizes": Opt([PAIR]), "default_size": Opt(PAIR),
    "source": Opt({"checkpoint": Opt(Nullable(PATH_TEXT))}),
    "tools": Opt(MapOf(object)), "created": Opt(str),
}


def read_manifest(engine_dir) -> dict:
    """The manifest of an export directory, checked: its format, every field's type (one
    line naming the field otherwise), and per graph one list of files, each with its size and
    content hash, the loaded ``file`` among them, every name inside the directory."""
    d = Path(engine_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise EngineError(f"export directory {d} does not exist; write one with "
                          "`bitdance-export --checkpoint CKPT --out DIR`")
    if not path.is_file():
        raise EngineError(f"{path} is missing: {d} is not a complete `bitdance-export` output "
                          "(re-run the export into it)")
    fix = "re-run the export"
    manifest = read_json(path, "manifest", error=EngineError, fix=fix)
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path} is not a format-{FORMAT} bitdance-rt manifest (another "
                          "version of bitdance-export wrote it); re-run the export with this "
                          "version")
    missing = [k for k in ("config_hash", "graphs", "dtype") if k not in manifest]
    if missing:
        raise EngineError(f"{path} lacks {missing}; re-run the export")
    check_schema(manifest, MANIFEST_SCHEMA, f"manifest {path}", error=EngineError, fix=fix)
    for name, graph in manifest["graphs"].items():
        if graph["file"] not in graph["files"]:
            raise EngineError(f"manifest {path}: graph {name!r} loads {graph['file']!r}, which "
                              f"is not one of its hashed files {sorted(graph['files'])}; {fix}")
        unhashed = sorted(set(graph["files"]) ^ set(graph["sha256"]))
        if unhashed:
            raise EngineError(f"{path} records no content hash of {unhashed[0]} (or hashes a "
                              f"file the graph does not list); {fix}")
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


def check_weights(manifest: dict, ckpt_dir, engine_dir, files=None) -> None:
    """Refuse a directory exported from other weights of the same architecture (another seed,
    a fine-tune): the manifest's weights fingerprint must match the checkpoint's. Exports of
    an in-memory model carry none and are not checked."""
    from .checkpoint import weights_fingerprint

    want = manifest.get("weights_fingerprint")
    if want is None or ckpt_dir is None:
        return
    have = weights_fingerprint(ckpt_dir, files=files)
    if have != want:
        raise EngineError(
            f"{engine_dir} was exported from other weights (fingerprint {want}) than the "
            f"checkpoint {ckpt_dir} (fingerprint {have}), although both have the same shapes; "
            "re-export from this checkpoint or pass the checkpoint it was exported from")


def check_files(manifest: dict, engine_dir, names=None) -> None:
    """Every file of the graphs ``names`` (default: every graph of the export's family) exists
    inside the directory and has the size and the content (sha256) the export wrote."""
    d = Path(engine_dir)
    names = graph_names(manifest) if names is None else names
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
        if graph["file"] not in graph["files"]:
            raise EngineError(f"{d / MANIFEST}: graph {name!r} loads {graph['file']!r}, which is "
                              f"not one of its hashed files; {fix}")
        for f, size in graph["files"].items():
            if f not in sha:
                raise EngineError(f"{d / MANIFEST} records no content hash of {f}; {fix}")
            check_size(inside(d, f, "graph file", error=EngineError, fix=fix), size,
                       "graph file", fix)
            hashes[f] = sha[f]
    verify_hashes(d, hashes, "graph file", fix)


def graph_file(manifest: dict, engine_dir, name: str) -> Path:
    """The path of graph ``name``'s file, after every file of the graph was checked (inside
    the directory, its size and content hash as written): the only way to a graph to load."""
    check_files(manifest, engine_dir, (name,))
    return Path(engine_dir) / manifest["graphs"][name]["file"]


def check_size(path: Path, size: int, what: str, fix: str) -> None:
    if not path.is_file():
        raise EngineError(f"{what} {path} is missing; {fix}")
    have = path.stat().st_size
    if have != size:
        raise EngineError(f"{what} {path} is corrupt or truncated ({have} bytes, {size} were "
                          f"written); {fix}")


def export_files(d, writes=frozenset()) -> set:
    """The entries of an export directory that ``bitdance-export`` wrote there: its manifest,
    the graph files it lists (of any format), the hash record, and, when the new output
    writes ``engines/`` too (``--engines``), an ``engines/`` that holds only what ``build``
    wrote. Everything else is the user's. A manifest that cannot be read owns nothing."""
    from .errors import BitDanceError

    d = Path(d)
    try:
        manifest = read_json(d / MANIFEST, "manifest", error=EngineError)
    except BitDanceError:
        return set()
    names = {MANIFEST, VERIFIED}
    graphs = manifest.get("graphs")
    for graph in (graphs.values() if isinstance(graphs, dict) else ()):
        if isinstance(graph, dict):
            listed = [graph.get("file"), *(graph.get("files") or ())]
            names |= {n for n in listed if is_plain_name(n) and "/" not in n}
    sub = d / ENGINES_SUBDIR
    if ENGINES_SUBDIR in writes and sub.is_dir() and not sub.is_symlink():
        inner = {p.name for p in sub.iterdir()}
        if inner <= engine_files(sub):
            names.add(ENGINES_SUBDIR)
    return names


def engine_files(d, writes=frozenset()) -> set:
    """The entries of an engine directory that ``bitdance-export build`` wrote: engines.json,
    the engines it lists, the manifest copy and the hash record."""
    from .errors import BitDanceError

    d = Path(d)
    try:
        info = read_json(d / ENGINES, "engines.json", error=EngineError)
    except BitDanceError:
        return set()
    names = {ENGINES, MANIFEST, VERIFIED}
    engines = info.get("engines")
    for entry in (engines.values() if isinstance(engines, dict) else ()):
        f = entry.get("file") if isinstance(entry, dict) else None
        if is_plain_name(f) and "/" not in f:
            names.add(f)
    return names


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


_ENGINE_SCHEMA = {"file": PLAIN_NAME, "bytes": SIZE, "sha256": SHA256,
                  "profile": Opt(MapOf(MapOf([int])))}
ENGINES_SCHEMA = {
    "format": int, "flavor": str, "version": str, "targets": [str],
    "export": {"dir": PATH_TEXT, "manifest_sha256": SHA256,
               "onnx_sha256": MapOf(SHA256, PLAIN_NAME)},
    "engines": MapOf(_ENGINE_SCHEMA), "config_hash": Opt(str),
    "weights_fingerprint": Opt(Nullable(str)), "dtype": Opt(str), "attention": Opt(str),
    "cache_slots": Opt(Nullable(POSITIVE)), "head_prepare_steps": Opt(POSITIVE),
    "tools": Opt(MapOf(object)), "created": Opt(str),
}


def read_engines(d) -> dict:
    path = Path(d) / ENGINES
    fix = "rebuild the engines with `bitdance-export build EXPORT_DIR`"
    info = read_json(path, "engines.json", error=EngineError, fix=fix)
    if info.get("format") != ENGINES_FORMAT:
        raise EngineError(f"{path} is not a format-{ENGINES_FORMAT} engines.json (another "
                          "version of bitdance-export wrote it); rebuild the engines with "
                          "`bitdance-export build EXPORT_DIR`")
    missing = [k for k in ("flavor", "version", "targets", "export", "engines") if k not in info]
    if missing:
        raise EngineError(f"{path} lacks {missing}; rebuild the engines")
    check_schema(info, ENGINES_SCHEMA, f"engines.json {path}", error=EngineError, fix=fix)
    return info


def export_dir_of(info: dict, engine_dir) -> Path:
    """The export the engines were built from (recorded relative to the engine directory
    when inside it, so that the two move together)."""
    return (Path(engine_dir) / info["export"]["dir"]).resolve()


def check_engines(info: dict, engine_dir) -> None:
    """The engine directory is what ``build`` wrote: its copy of the export's manifest and
    every engine file (names inside the directory) have the recorded sha256; and when the
    export it was built from is still there, that export has not changed since (re-exported,
    or a graph file damaged)."""
    d = Path(engine_dir)
    export = export_dir_of(info, d)
    rebuild = f"rebuild them with `bitdance-export build {export}`"
    verify_hashes(d, {MANIFEST: info["export"]["manifest_sha256"]}, "manifest copy",
                  f"the engine directory was modified; {rebuild}")
    hashes = {}
    copy = read_json(d / MANIFEST, "manifest copy", error=EngineError, fix=rebuild)
    for name in graph_names(copy if isinstance(copy, dict) else {}):  # the family's graphs
        entry = info["engines"].get(name)
        if entry is None:
            raise EngineError(f"{d / ENGINES} lists no {name!r} engine; {rebuild}")
        path = inside(d, entry["file"], "engine file", error=EngineError, fix=rebuild)
        check_size(path, entry["bytes"], "engine file", rebuild)
        hashes[entry["file"]] = entry["sha256"]
    verify_hashes(d, hashes, "engine file", rebuild)
    if (export / MANIFEST).is_file():
        if sha256_file(export / MANIFEST) != info["export"]["manifest_sha256"]:
            raise EngineError(f"the engines in {d} were built from an earlier export in "
                              f"{export} (it was exported again since); {rebuild}")
        verify_hashes(export, info["export"]["onnx_sha256"], "graph file",
                      f"re-run `bitdance-export` into {export}, then rebuild the engines")


def engine_file(info: dict, engine_dir, name: str) -> Path:
    """The path of engine ``name``, after its file was checked (inside the directory, its size
    and content hash as ``build`` wrote them): the only way to an engine to load."""
    d = Path(engine_dir)
    rebuild = f"rebuild them with `bitdance-export build {export_dir_of(info, d)}`"
    entry = info["engines"].get(name)
    if entry is None:
        raise EngineError(f"{d / ENGINES} lists no {name!r} engine; {rebuild}")
    path = inside(d, entry["file"], "engine file", error=EngineError, fix=rebuild)
    check_size(path, entry["bytes"], "engine file", rebuild)
    verify_hashes(d, {entry["file"]: entry["sha256"]}, "engine file", rebuild)
    return path


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
