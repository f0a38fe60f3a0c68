"""What every graph exporter shares: the graph description, dynamic dims, the ONNX export call.

Exporter choice: torch 2.13's default (``dynamo=True``, torch.export + onnxscript). The older
TorchScript exporter still runs in 2.13 but is deprecated ("will be removed"); the dynamo one is
the maintained path, writes >2 GB models with external data itself, keeps named dynamic dims,
and takes custom-op translations (``custom_translation_table``) for the plugin node of issue 5.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..errors import BitDanceError
from ..files import check_output_dir
from ..manifest import MANIFEST

OPSET = 18  # standard and plugin graphs; native ones need 24 (attention.attention_opset)


def export_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``--dtype`` (fp32, fp16, bf16)."""
    return dtypes.parse(name)


def dim(name: str, min: int = 1, max: int | None = None):
    """A named dynamic dimension (the name appears in the ONNX graph and the manifest)."""
    return torch.export.Dim(name, min=min, max=max) if max else torch.export.Dim(name, min=min)


@dataclass
class GraphDef:
    """One graph: the module to export, example inputs (name -> tensor, in forward's order),
    dynamic dims per input (``{axis: Dim}``) and output names."""

    name: str
    module: torch.nn.Module
    example: dict
    dynamic: dict
    outputs: list

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


def check_out_dir(out: Path, what: str = "export", marker: str = MANIFEST, owned=None,
                  writes: set = frozenset(), size: int = 0) -> None:
    """``out`` may be written: new, empty, or an earlier output of the same kind (which is
    replaced when the new one is complete, keeping every file it did not write: see
    :func:`bitdance_rt.files.check_output_dir`); its file system has room for about ``size``
    bytes more."""
    check_output_dir(out, what, marker, owned, writes, size)


def native_cache_feeds(model, gen: torch.Generator, rows: int, slots: int) -> dict:
    """Random per-layer caches ``[rows, Hkv, slots, D]`` (model dtype) of a native LLM graph,
    named as its inputs (:func:`bitdance_rt.manifest.cache_inputs`)."""
    from ..manifest import cache_inputs

    cfg = model.spec.llm
    shape = (rows, cfg.num_key_value_heads, slots, cfg.head_dim)
    return {name: torch.randn(shape, generator=gen).to(model.dtype)
            for name in cache_inputs(cfg.num_hidden_layers)}


def write_slots(cache: torch.Tensor, new: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """A copy of ``cache [S, H, S_max, D]`` with ``new [S, H, T, D]`` written at slots
    ``[at[s], at[s] + T)`` (the expected content of a native graph's cache output), through the
    PyTorch owner of the cache write."""
    from ..attention.plain import write_at

    return write_at(cache.clone(), new, at, 2)


@contextlib.contextmanager
def _quiet():
    """The exporter prints its progress and warns about deprecated internals; keep the CLI's
    one line per graph readable (the environment variable BITDANCE_DEBUG keeps everything)."""
    if os.environ.get("BITDANCE_DEBUG"):
        yield
        return
    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript",
                                                 "torch._dynamo", "torch.fx.experimental")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _dynamic_shapes(gdef: GraphDef) -> tuple:
    """``gdef.dynamic`` in the structure of the forward's arguments (a native graph's caches
    are its ``*caches``: one entry holding a list)."""
    names = list(gdef.example)
    shapes = []
    for i, param in enumerate(inspect.signature(gdef.module.forward).parameters.values()):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes.append(tuple(gdef.dynamic.get(n) for n in names[i:]))
            break
        if i < len(names):
            shapes.append(gdef.dynamic.get(names[i]))
    return tuple(shapes)


def export_onnx(gdef: GraphDef, out_dir: Path, opset: int = OPSET,
                translations: dict | None = None) -> list[str]:
    """Export ``gdef`` to ``out_dir/<name>.onnx`` (plus ``<name>.onnx.data`` for large
    weights); returns the files written, relative to ``out_dir``. ``translations`` maps custom
    ops to onnxscript functions (the exporter's ``custom_translation_table``)."""
    path = out_dir / gdef.filename
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    gdef.module.eval()
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                gdef.module, tuple(gdef.example.values()), dynamo=True,
                input_names=list(gdef.example), output_names=list(gdef.outputs),
                dynamic_shapes=_dynamic_shapes(gdef),
                opset_version=opset, optimize=True,
                custom_translation_table=translations)
            # torch writes the weights to <name>.onnx.data when they pass 1.5 GB (protobuf
            # cannot hold 2 GB)
            program.save(str(path))
    except ImportError as e:
        raise BitDanceError(
            f"exporting {gdef.name} needs the onnxscript package ({e}); "
            "pip install onnxscript") from None
    except Exception as e:  # the exporter's own errors: a bug here, not a user mistake
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitDanceError(f"torch.onnx could not export the {gdef.name} graph ({first}); "
                            "set BITDANCE_DEBUG=1 to see the exporter's own report") from e
    del program
    files = [path.name]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data.name)
    return files


def write_graphs(defs: dict, names, out: Path, opset: int, translations: dict, say) -> dict:
    """Export each graph of ``names`` (``defs[name]()`` builds its :class:`GraphDef`) into
    ``out``, one line per graph to ``say``; returns each graph's manifest entry."""
    import gc
    import time

    from ..manifest import describe_graph

    written = {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        gdef = defs[name]()
        files = export_onnx(gdef, out, opset, translations)
        written[name] = describe_graph(out, files)
        size = sum(written[name]["files"].values())
        say(f"[{i + 1}/{len(names)}] {name}: {', '.join(files)} ({size / 1e6:.1f} MB) "
            f"in {time.perf_counter() - t0:.1f}s")
        del gdef
        gc.collect()
    return written
