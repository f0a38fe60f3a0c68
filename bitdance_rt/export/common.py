"""What every graph exporter shares: the graph description, dynamic dims, the ONNX export call.

Exporter choice: torch 2.13's default (``dynamo=True``, torch.export + onnxscript). The older
TorchScript exporter still runs in 2.13 but is deprecated ("will be removed"); the dynamo one is
the maintained path, writes >2 GB models with external data itself, keeps named dynamic dims,
and takes custom-op translations (``custom_translation_table``) for the plugin node of issue 5.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..errors import BitDanceError

OPSET = 18

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
                dynamic_shapes=gdef.dynamic, opset_version=opset, optimize=True,
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
