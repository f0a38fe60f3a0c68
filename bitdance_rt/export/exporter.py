"""``bitdance-export``: a checkpoint to the ONNX graphs of ``GRAPHS`` and ``manifest.json``
(and, through ``finish``, whatever else belongs in the same directory before it is put in
place: the TensorRT engines of :func:`bitdance_rt.export.build.export_with_engines`).

The export is written to a staging directory beside ``--out`` that replaces it only when
complete, so an interrupted or failed re-export leaves the previous export intact. ``--out``
must be new, empty or an earlier export: a directory of other files is refused, never mixed
into or replaced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import BitDanceModel, load_checkpoint, weights_fingerprint
from ..errors import BitDanceError
from ..limits import MAX_IMAGES
from ..files import staged_directory
from . import block_step, decoder, head_prepare, head_step, prefill
from . import qdq
from .attention import attention_opset, attention_translations, check_attention
from .. import dtypes
from .common import OPSET, check_out_dir, export_dtype, write_graphs
from ..manifest import GRAPHS
from ..manifest import export_files, tool_versions, write_manifest
from .source import identify_preset, resolve_preset

DEFAULT_MAX_BATCH = 4
# The longest image (2048x512: 4096 tokens) plus a long prompt.
DEFAULT_MAX_SEQ = 4608


def graph_defs(model: BitDanceModel, attention: str, slots: int):
    """Every graph of ``GRAPHS``, built lazily (each wraps modules of ``model``); a native
    export's caches have ``slots`` slots."""
    return {"prefill": lambda: prefill.graph_def(model, attention, slots),
            "block_step": lambda: block_step.graph_def(model, attention, slots),
            "head_prepare": lambda: head_prepare.graph_def(model),
            "head_step": lambda: head_step.graph_def(model),
            "decoder": lambda: decoder.graph_def(model)}


def check_settings(attention: str, max_batch: int, max_seq: int, spec=None,
                   tokenizer=None) -> None:
    """Every export setting, before any work: the attention form is available, the envelope
    is positive, and ``--max-seq`` holds the largest size ``spec`` declares with a prompt."""
    from ..request import shortest_context

    check_attention(attention)  # fail before any work on an unavailable choice
    if max_batch < 1 or max_seq < 1:
        raise BitDanceError("--max-batch and --max-seq must be positive")
    if max_batch > MAX_IMAGES:
        raise BitDanceError(f"--max-batch {max_batch} is more than the {MAX_IMAGES} images an "
                            f"AR run takes; pass at most {MAX_IMAGES}")
    if spec is not None and max_seq > spec.llm.max_position_embeddings:
        raise BitDanceError(
            f"--max-seq {max_seq} is more than the {spec.llm.max_position_embeddings} positions "
            f"this model has (max_position_embeddings); pass at most "
            f"{spec.llm.max_position_embeddings}")
    if spec is not None:
        need = shortest_context(spec, tokenizer)
        if max_seq < need:
            h, w = max(spec.info.sizes, key=lambda s: s[0] * s[1])
            raise BitDanceError(
                f"--max-seq {max_seq} is too small: the largest size this model declares, "
                f"{h}x{w}, needs {need} KV slots with a one-character prompt; pass --max-seq "
                f"{need} or more (longer prompts need more)")


def export_writes(engines: bool = False) -> set:
    """The names an export writes in its directory (before the work: the early check that it
    replaces no file of the user's)."""
    from ..manifest import ENGINES_SUBDIR, MANIFEST

    names = {MANIFEST} | {f"{g}.onnx" for g in GRAPHS} | {f"{g}.onnx.data" for g in GRAPHS}
    return names | ({ENGINES_SUBDIR} if engines else set())


def export_model(model: BitDanceModel, out_dir, *, preset_name: str | None = None,
                 attention: str = "standard", max_batch: int = DEFAULT_MAX_BATCH,
                 max_seq: int = DEFAULT_MAX_SEQ, opset: int = OPSET,
                 source: dict | None = None, finish: Callable[[Path], None] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Write the graphs of ``model`` (already in the export dtype, on the CPU) and the
    manifest into ``out_dir`` (staged: see the module docstring); returns the manifest.
    ``finish(stage)`` runs on the complete staging directory before it replaces ``out_dir``.
    ``progress`` gets one line per graph."""
    check_settings(attention, max_batch, max_seq, model.spec, model.tokenizer)
    out = Path(out_dir)
    check_out_dir(out, owned=export_files, writes=export_writes(finish is not None))
    with staged_directory(out, export_files, "export") as stage:
        opset = qdq.required_opset(model, attention_opset(attention, opset))
        manifest = _write_export(model, stage, preset_name, attention, max_batch, max_seq,
                                 opset, source, progress)
        if finish is not None:
            finish(stage)
    return manifest


def _write_export(model, out: Path, preset_name, attention, max_batch, max_seq, opset, source,
                  progress) -> dict:
    dtype_name = dtypes.short_name(model.dtype)
    say = progress or (lambda line: None)
    defs = graph_defs(model, attention, max_seq)
    # the attention choice's custom nodes, and the Q/DQ pairs of a quantized checkpoint
    translations = {**(attention_translations(attention) or {}), **qdq.onnx_translation_table()}
    written = write_graphs(defs, GRAPHS, out, opset, translations, say)
    spec = model.spec
    full = model.extras.get("full_spec", spec)
    manifest = {
        "preset": preset_name or identify_preset(spec) or "custom",
        "config_hash": spec.config_hash(),
        "checkpoint_config_hash": full.config_hash(),
        "weights_fingerprint": weights_fingerprint(model.path) if model.path else None,
        "num_layers": (spec.llm.num_hidden_layers
                       if spec.llm.num_hidden_layers != full.llm.num_hidden_layers else None),
        "parallel_num": spec.parallel_num,
        "gan_decoder": spec.ae.gan_decoder,
        "dtype": dtype_name,
        "opset": opset,
        "attention": attention,
        "quantization": sorted(qdq.quantized_formats(model)) or None,
        # a native graph's caches have exactly this many slots (static); else any number
        "cache_slots": max_seq if attention == "native" else None,
        "limits": {"max_batch": max_batch, "max_rows": 2 * max_batch, "max_seq": max_seq},
        "sizes": [list(s) for s in spec.info.sizes],
        "default_size": [spec.info.defaults.height, spec.info.defaults.width],
        "source": source or {},
        "tools": tool_versions(),
        "graphs": written,
    }
    write_manifest(out, manifest)
    return manifest


def export_size(ckpt: Path, dtype: torch.dtype, num_layers: int | None = None,
                engines: bool = False) -> int:
    """About the bytes an export of ``ckpt`` writes (the weights in ``dtype``; twice that
    with engines), known before the weights load."""
    from ..checkpoint import read_spec, weights_size

    share = 1.0
    if num_layers:
        share = min(1.0, num_layers / read_spec(ckpt).llm.num_hidden_layers)
    size = weights_size(ckpt, torch.empty((), dtype=dtype).element_size(), share)
    return size * (2 if engines else 1)


def export_checkpoint(checkpoint, out_dir, *, model_name: str | None = None,
                      dtype: str = "fp32", num_layers: int | None = None,
                      attention: str = "standard", max_batch: int = DEFAULT_MAX_BATCH,
                      max_seq: int = DEFAULT_MAX_SEQ, finish: Callable[[Path], None] | None = None,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Load ``checkpoint`` (only the first ``num_layers`` LLM layers when given) in ``dtype``
    and export it (see :func:`export_model`). Every setting and the output directory are
    checked before the weights load."""
    from ..checkpoint import load_tokenizer, read_spec

    ckpt = Path(checkpoint)
    torch_dtype = export_dtype(dtype)
    spec = read_spec(ckpt)
    name = resolve_preset(spec, model_name, ckpt)
    spec.truncated(num_layers)  # validate before loading
    check_settings(attention, max_batch, max_seq, spec, load_tokenizer(ckpt))
    check_out_dir(Path(out_dir), owned=export_files, writes=export_writes(finish is not None),
                  size=export_size(ckpt, torch_dtype, num_layers, engines=finish is not None))
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    model = load_checkpoint(ckpt, dtype=torch_dtype, num_layers=num_layers)
    say(f"loaded {ckpt} ({name}, {dtype}"
        + (f", first {num_layers} LLM layers" if num_layers else "")
        + f") in {time.perf_counter() - t0:.1f}s")
    with torch.no_grad():
        return export_model(model, out_dir, preset_name=name, attention=attention,
                            max_batch=max_batch, max_seq=max_seq, finish=finish,
                            source={"checkpoint": str(ckpt.resolve())}, progress=progress)
