"""Command lines: ``bitdance-rt`` (generate) and ``bitdance-export`` (make-tiny, export, check).

Thin typer layers: they parse, call the library and print. A :class:`BitDanceError` is printed
as one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import BitDanceError

rt_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="Generate images with BitDance over a choice of backends.")
export_app = typer.Typer(add_completion=False, invoke_without_command=True,
                         help="Export BitDance checkpoints to deployable graphs; make test models.")

DEBUG = {"on": False}


def friendly_errors(fn):
    """Turn BitDanceError (and bad values) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BitDanceError, ValueError) as e:
            if DEBUG["on"] or os.environ.get("BITDANCE_DEBUG"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


class ProgressBar:
    """A one-line progress bar on stderr over AR steps (redrawn at most ~10 times a second;
    on a non-terminal, one line per 10%)."""

    def __init__(self, label: str, enabled: bool = True):
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = -1.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if done < total and now - self.last < 0.1:
                return
        elif done < total and (10 * done) // total == (10 * (done - 1)) // total:
            return
        self.last = now
        width = 30
        fill = int(width * done / total)
        line = (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                f"{now - self.start:6.1f}s")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitdance-rt"


def builtin_tiny_checkpoint() -> Path:
    """The built-in tiny random model, made on first use under the user's cache directory."""
    from .tiny import make_tiny

    path = default_cache_dir() / "tiny-4x-seed0"
    if not (path / "tokenizer.json").is_file():
        typer.echo(f"making the built-in tiny model in {path} (first use)", err=True)
        make_tiny(path, parallel_num=4, seed=0)
    return path


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]


def save_png(image, path: Path, meta: dict) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, pnginfo=info)


def resolve_device_dtype(device: Optional[str], dtype: Optional[str]):
    import torch

    from .checkpoint import DTYPES

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BitDanceError("--device cuda was asked for but no CUDA device is visible; "
                            "use --device cpu")
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise BitDanceError(f"--dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    return device, DTYPES[dtype], dtype


@rt_app.callback()
def rt_main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    DEBUG["on"] = debug


@rt_app.command()
@friendly_errors
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint directory (released layout). "
        "Default: a built-in tiny random model, for trying the tool."),
    height: int = typer.Option(1024, help="Image height in pixels (a supported size)."),
    width: int = typer.Option(1024, help="Image width in pixels (a supported size)."),
    steps: int = typer.Option(50, help="Head sampling steps N (25 is the fast setting)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale; 1.0 disables it."),
    seed: int = typer.Option(42, help="Random seed (same seed, same image)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)."),
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
):
    """Generate images from a text prompt and write PNG files (settings in PNG metadata)."""
    from .checkpoint import load_checkpoint
    from .pipeline import GenerationRequest
    from .runtime import StageTimer

    dev, torch_dtype, dtype_name = resolve_device_dtype(device, dtype)
    req = GenerationRequest(prompt=prompt, height=height, width=width, steps=steps,
                            guidance=guidance, seed=seed, num_images=num_images)
    req.validate()
    if checkpoint is None:
        checkpoint = builtin_tiny_checkpoint()
        typer.echo(f"no --checkpoint given: using the built-in tiny RANDOM-WEIGHT model at "
                   f"{checkpoint}; its images are noise patterns, not pictures", err=True)
    # The ONNX Runtime graphs hold the weights: read only the configs and the tokenizer.
    model = load_checkpoint(checkpoint, dtype=torch_dtype, device=dev,
                            weights=backend != "onnxruntime")
    runner = make_runner(backend, model, engine_dir, cuda_graphs, compile)
    timer = StageTimer(dev, enabled=timings)
    images = runner(req, ProgressBar("AR steps", progress), timer)
    meta = {"prompt": prompt, "seed": seed, "height": height, "width": width, "steps": steps,
            "guidance": guidance, "checkpoint": str(checkpoint), "dtype": dtype_name,
            "device": dev, "backend": backend, "model": model.spec.name,
            "software": "bitdance-rt"}
    for i, path in enumerate(output_paths(out, num_images)):
        save_png(images[i].numpy(), path, {**meta, "image_index": i})
        typer.echo(str(path))
    if timings:
        typer.echo(timer.table())


BACKENDS = ("torch", "reference", "onnxruntime")


def make_runner(backend: str, model, engine_dir, cuda_graphs: bool, compile: bool):
    """A callable ``(request, on_step, timer) -> uint8 images`` for the chosen backend."""
    from .pipeline import ReferencePipeline
    from .runtime import generate as run_loop
    from .runtime import plan_for

    if backend == "reference":
        pipe = ReferencePipeline(model)
        return lambda req, on_step, timer: pipe.generate(req, on_step, timer)
    if backend == "torch":
        from .runtime.backends.torch_backend import TorchBackend

        be = TorchBackend(model, cuda_graphs=cuda_graphs, compile=compile)
    elif backend == "onnxruntime":
        if engine_dir is None:
            raise BitDanceError("--backend onnxruntime needs --engine-dir, a directory written "
                                "by `bitdance-export`")
        from .runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        be = OnnxRuntimeBackend(model, engine_dir)
    else:
        raise BitDanceError(f"unknown --backend {backend!r}; choose one of {list(BACKENDS)}")
    return lambda req, on_step, timer: run_loop(be, plan_for(model, req), req.seed, timer, on_step)


@export_app.callback()
@friendly_errors
def export_main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
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
    DEBUG["on"] = debug
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
@friendly_errors
def check_cmd(
    engine_dir: Path = typer.Argument(..., help="Directory written by bitdance-export."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="The checkpoint it was exported from (default: the "
        "one recorded in its manifest)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random inputs (default: fresh)."),
):
    """Run every graph in ONNX Runtime (CPU) against PyTorch on fresh random inputs through
    Polygraphy; print the errors per output; exit 1 above the dtype's tolerance."""
    from .export.check import check_export, format_table
    from .export.manifest import read_manifest

    rows, used = check_export(engine_dir, checkpoint, seed)
    typer.echo(format_table(rows, read_manifest(engine_dir)["dtype"]))
    failed = [f"{r.graph}/{r.case}/{r.output}" for r in rows if not r.passed]
    typer.echo(f"seed {used}: {len(rows) - len(failed)}/{len(rows)} outputs within tolerance")
    if failed:
        typer.echo(f"FAILED: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@export_app.command("make-tiny")
@friendly_errors
def make_tiny_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    parallel_num: int = typer.Option(4, "--parallel-num", help="Tokens per AR step: 4, 16, 64."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    gan_decoder: bool = typer.Option(False, "--gan-decoder", help="Use the gan-decoder variant."),
    size: str = typer.Option("tiny", "--size", help="tiny (15 MB, for tests) or mid (the CPU "
                             "benchmark preset, about 150 MB)."),
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
