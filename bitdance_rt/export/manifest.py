"""Writing ``manifest.json`` (what an export directory holds and which model it belongs to);
reading and verifying one is :mod:`bitdance_rt.manifest`, which the runtime uses too.

It records the preset, the config hash of the exported model (``ModelSpec.config_hash()``, of
the truncated model when ``--num-layers`` was given, with the checkpoint's own hash beside it),
the dtype, opset, attention, the supported envelope (``max_batch``, ``max_seq``), tool versions,
and per graph its files with their sizes and content hashes (sha256: the runtime refuses a
file that changed) and every input and output with shape, dtype and dynamic axes, and a
fingerprint of the checkpoint's weights (:func:`~bitdance_rt.checkpoint.weights_fingerprint`).
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

from ..manifest import FORMAT, MANIFEST, remember_hashes, sha256_file


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
