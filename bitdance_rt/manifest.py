"""Reading and verifying an export directory's ``manifest.json`` (the runtime and ``check``).

A consumer refuses a directory that does not match the model it is given (its shapes or its
weights), that another version of ``bitdance-export`` wrote, or whose files are missing or of
the wrong size, each with an :class:`~bitdance_rt.errors.EngineError` naming the fix. Writing a
manifest is :mod:`bitdance_rt.export.manifest`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EngineError

MANIFEST = "manifest.json"
FORMAT = 2  # 2: prefill without positions, head_step with the 6 step coefficients
GRAPHS = ("prefill", "block_step", "head_prepare", "head_step", "decoder")


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
