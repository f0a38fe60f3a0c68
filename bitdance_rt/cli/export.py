"""``bitdance-export``: export (the app's own command), ``check``, ``make-tiny``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import BitDanceError
from .app import DEBUG_OPTION, export_app


@export_app.callback()
def export_main(
    ctx: typer.Context,
    debug: bool = DEBUG_OPTION,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="14b, 14b-64x or 14b-16x (or another preset); optional "
        "when the checkpoint's configs identify the model (they are checked against it)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint directory (released layout) to export."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for the "
                                       "ONNX graphs and manifest.json."),
    dtype: str = typer.Option("fp32", help="Weight and KV dtype of the graphs: fp32, fp16 or "
                              "bf16 (bf16 runs on CUDA only in ONNX Runtime)."),
    max_batch: int = typer.Option(4, "--max-batch", help="Most images per call the graphs "
                                  "are meant for (recorded in the manifest; the runtime "
                                  "checks it)."),
    max_seq: int = typer.Option(4608, "--max-seq", help="Most KV slots per sequence (prompt + "
                                "image tokens; recorded and checked)."),
    num_layers: Optional[int] = typer.Option(
        None, "--num-layers", help="Keep only the first K LLM layers (full-width test "
        "exports); such a directory is refused for generation."),
    attention: str = typer.Option("standard", help="standard (ONNX operators; runs in ONNX "
                                  "Runtime) or plugin (custom bitdance::kv_attention node for the TensorRT plugin)."),
):
    """Export a checkpoint to ONNX graphs (prefill, block_step, head_prepare, head_step,
    decoder) and a manifest: `bitdance-export --checkpoint DIR --out DIR`. Subcommands below."""
    if ctx.invoked_subcommand is not None:
        return
    if checkpoint is None and out is None:
        typer.echo(ctx.get_help())
        return
    if checkpoint is None or out is None:
        raise BitDanceError("exporting needs both --checkpoint DIR and --out DIR")
    from ..export import export_checkpoint

    start = time.perf_counter()
    manifest = export_checkpoint(checkpoint, out, model_name=model, dtype=dtype,
                                 num_layers=num_layers, attention=attention,
                                 max_batch=max_batch, max_seq=max_seq, progress=typer.echo)
    size = sum(sum(g["files"].values()) for g in manifest["graphs"].values())
    typer.echo(f"wrote {out / 'manifest.json'} ({manifest['preset']}, {manifest['dtype']}, "
               f"{size / 1e9:.2f} GB in all) in {time.perf_counter() - start:.1f}s")


@export_app.command("check")
def check_cmd(
    engine_dir: Path = typer.Argument(..., help="Directory written by bitdance-export."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="The checkpoint it was exported from (default: the "
        "one recorded in its manifest)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random inputs (default: fresh)."),
    debug: bool = DEBUG_OPTION,
):
    """Run every graph in ONNX Runtime (CPU) against PyTorch on fresh random inputs through
    Polygraphy; print the errors per output; exit 1 above the dtype's tolerance."""
    from ..export.check import check_export, format_table
    from ..manifest import read_manifest

    rows, used = check_export(engine_dir, checkpoint, seed)
    typer.echo(format_table(rows, read_manifest(engine_dir)["dtype"]))
    failed = [f"{r.graph}/{r.case}/{r.output}" for r in rows if not r.passed]
    typer.echo(f"seed {used}: {len(rows) - len(failed)}/{len(rows)} outputs within tolerance")
    if failed:
        typer.echo(f"FAILED: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@export_app.command("make-tiny")
def make_tiny_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    parallel_num: int = typer.Option(4, "--parallel-num", help="Tokens per AR step: 4, 16, 64."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    gan_decoder: bool = typer.Option(False, "--gan-decoder", help="Use the gan-decoder variant."),
    size: str = typer.Option("tiny", "--size", help="tiny (15 MB, for tests) or mid (the CPU "
                             "benchmark preset, about 150 MB)."),
    debug: bool = DEBUG_OPTION,
):
    """Write a small random-weight checkpoint in exactly the released layout (float32)."""
    from ..tiny import make_tiny

    path = make_tiny(out_dir, parallel_num=parallel_num, seed=seed, gan_decoder=gan_decoder,
                     size=size)
    nbytes = sum(f.stat().st_size for f in path.iterdir())
    typer.echo(f"wrote {path} ({nbytes / 1e6:.1f} MB, {size}, P = {parallel_num})")


