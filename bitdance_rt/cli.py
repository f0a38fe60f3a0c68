"""Command lines: ``bitdance-rt`` (generate) and ``bitdance-export`` (export, check, make-tiny).

Thin typer layers over the library: they parse, call :mod:`bitdance_rt.runtime` and
:mod:`bitdance_rt.export`, and print. Every error a user can cause is one line on stderr and
exit status 2; Ctrl-C is one line and 130; a traceback only with ``--debug`` (anywhere on the
command line) or ``BITDANCE_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from .errors import BitDanceError

DEBUG = {"on": False}


class Commands(TyperGroup):
    """The CLI's error policy (see the module docstring), wrapped around every command."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        DEBUG["on"] = bool(os.environ.get("BITDANCE_DEBUG"))
        try:
            result = super().main(*args, **kwargs)
        except BitDanceError as e:
            if DEBUG["on"]:
                raise
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, click.exceptions.Abort):
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except Exception as e:  # a bug: one line unless --debug
            if DEBUG["on"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            typer.echo(f"internal error: {type(e).__name__}: {first[:300]} (a bug in "
                       "bitdance-rt; rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


rt_app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True,
                     rich_markup_mode=None,
                     help="Generate images with BitDance over a choice of backends.")
export_app = typer.Typer(cls=Commands, add_completion=False, invoke_without_command=True,
                         rich_markup_mode=None,
                         help="Export BitDance checkpoints to deployable graphs; make test models.")


def _debug_option(value: bool):
    if value:
        DEBUG["on"] = True


DEBUG_OPTION = typer.Option(False, "--debug", help="Show tracebacks.", callback=_debug_option,
                            is_eager=True)


def progress_bar(label: str, enabled: bool = True):
    """A ``rich`` progress bar over AR blocks on stderr, as an ``on_step(done, total)``
    callback; a no-op when disabled or when stderr is not a terminal (one line per 10% then)."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        state = {"last": -1, "t0": time.perf_counter()}

        def plain(done, total):
            tenth = 10 * done // total
            if tenth != state["last"]:
                state["last"] = tenth
                print(f"{label} {done}/{total} {time.perf_counter() - state['t0']:.1f}s",
                      file=sys.stderr, flush=True)
        return plain

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=False)
    task = {}

    def update(done, total):
        if not task:
            bar.start()
            task["id"] = bar.add_task(label, total=total)
        bar.update(task["id"], completed=done)
        if done >= total:
            bar.stop()
    return update


@rt_app.callback()
def rt_main(debug: bool = DEBUG_OPTION):
    """Generate images with BitDance over a choice of backends."""


@rt_app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint directory (released layout). "
        "Default: the built-in demo model."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels, a size the model "
                                         "supports (default: the model's; 1024 for the "
                                         "released models)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the "
                                        "model's)."),
    steps: Optional[int] = typer.Option(None, help="Head sampling steps N (default: the "
                                        "model's; 50 for the released models, 25 is fast)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale, 1.0 "
                                             "disables it (default: the model's; 7.5)."),
    seed: int = typer.Option(42, help="Random seed (same seed, same image)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if "
                                         "present)."),
    dtype: Optional[str] = typer.Option(
        None, help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)."),
    out: Path = typer.Option(Path("bitdance.png"), "--out", "-o",
                             help="Output PNG; with several images _0, _1, ... are appended."),
    backend: str = typer.Option("torch", help="torch (fast loop), reference (the eager "
                                "baseline) or onnxruntime (needs --engine-dir)."),
    engine_dir: Optional[Path] = typer.Option(
        None, "--engine-dir", help="Directory written by bitdance-export (onnxruntime)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs",
                                     help="Replay the head loop and block step as CUDA graphs."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the head (torch)."),
    timings: bool = typer.Option(False, "--timings", help="Print a per-stage timing table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    debug: bool = DEBUG_OPTION,
):
    """Generate images from a text prompt and write PNG files (settings in PNG metadata)."""
    from .request import GenerationRequest
    from .runtime.images import check_output, save_png
    from .runtime.session import Session, builtin_checkpoint, check_backend, resolve_device
    from .runtime.timing import StageTimer

    req = GenerationRequest(prompt=prompt, height=height, width=width, steps=steps,
                            guidance=guidance, seed=seed, num_images=num_images)
    # Everything checkable is checked before the weights load.
    dev = resolve_device(device)
    check_backend(backend, engine_dir)
    paths = check_output(out, num_images)
    if checkpoint is None:
        checkpoint = builtin_checkpoint(say=lambda m: typer.echo(m, err=True))
    session = Session.open(checkpoint, backend=backend, device=str(dev), dtype=dtype,
                           engine_dir=engine_dir, cuda_graphs=cuda_graphs, compile=compile,
                           warn=lambda m: typer.echo(f"warning: {m}", err=True))
    session.plan(req)  # sizes, prompt length, numbers: before any work
    timer = StageTimer(dev, enabled=timings)
    images = session.generate(req, on_step=progress_bar("AR steps", progress), timer=timer)[0]
    meta = session.metadata(req)
    for i, path in enumerate(paths):
        save_png(images[i].numpy(), path, {**meta, "image_index": i})
        typer.echo(str(path))
    if timings:
        typer.echo(timer.table())


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
    from .export import export_checkpoint

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
    from .export.check import check_export, format_table
    from .manifest import read_manifest

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
    from .tiny import make_tiny

    path = make_tiny(out_dir, parallel_num=parallel_num, seed=seed, gan_decoder=gan_decoder,
                     size=size)
    nbytes = sum(f.stat().st_size for f in path.iterdir())
    typer.echo(f"wrote {path} ({nbytes / 1e6:.1f} MB, {size}, P = {parallel_num})")


def rt_entry():
    rt_app()


def export_entry():
    export_app()
