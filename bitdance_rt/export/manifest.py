"""``manifest.json``: what an export directory holds and which model it belongs to.

It records the preset, the config hash of the exported model (``ModelSpec.config_hash()``, of
the truncated model when ``--num-layers`` was given, with the checkpoint's own hash beside it),
the dtype, opset, attention, the supported envelope (``max_batch``, ``max_seq``), tool versions,
and per graph its files with their sizes and every input and output with shape, dtype and
dynamic axes, and a fingerprint of the checkpoint's weights
(:func:`~bitdance_rt.checkpoint.weights_fingerprint`). Consumers (the ONNX Runtime backend,
``check``) refuse a directory that does not match the model they are given (its shapes or its
weights), or whose files are missing or of the wrong size.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

from ..errors import EngineError

MANIFEST = "manifest.json"
FORMAT = 1
GRAPHS = ("prefill", "block_step", "head_prepare", "head_step", "decoder")


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
    return {"file": files[0], "files": {f: (out_dir / f).stat().st_size for f in files},
            "inputs": inputs, "outputs": outputs, "dynamic_axes": dynamic,
            "external_data": len(files) > 1}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(engine_dir) -> dict:
    d = Path(engine_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise EngineError(f"engine directory {d} does not exist; write one with "
                          "`bitdance-export --checkpoint CKPT --out DIR`")
    if not path.is_file():
        raise EngineError(f"{path} is missing: {d} is not a complete `bitdance-export` output "
                          "(re-run the export into it)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}); re-run the export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineError(f"{path} is not a format-{FORMAT} bitdance-rt manifest; re-run the "
                          "export with this version")
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
    a fine-tune): the manifest's weights fingerprint must match the checkpoint's. Exports made
    before the fingerprint existed carry none and are not checked."""
    from ..checkpoint import weights_fingerprint

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
    """Every graph file exists and has the size the export wrote."""
    d = Path(engine_dir)
    for name in names:
        graph = manifest["graphs"].get(name)
        if graph is None:
            raise EngineError(
                f"{d / MANIFEST} lists no {name!r} graph: {d} was written by another version "
                "of bitdance-export, whose graphs this version cannot run; re-export it with "
                f"`bitdance-export --checkpoint CKPT --out {d}`")
        for f, size in graph["files"].items():
            path = d / f
            if not path.is_file():
                raise EngineError(f"graph file {path} is missing; re-run `bitdance-export` "
                                  f"into {d}")
            if path.stat().st_size != size:
                raise EngineError(
                    f"graph file {path} is corrupt or truncated ({path.stat().st_size} bytes, "
                    f"the export wrote {size}); re-run `bitdance-export` into {d}")
