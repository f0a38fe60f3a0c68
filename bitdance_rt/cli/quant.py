"""``bitdance-export calibrate``, ``bitdance-export quantize`` and ``bitdance-rt memory``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .app import DEBUG_OPTION, Command, export_app, rt_app

RECIPE_HELP = "fp8-weight, fp8, int8-weight or int8-sq (see docs/quantization.md)."


@export_app.command("calibrate", cls=Command)
def calibrate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Float checkpoint "
                                    "directory (released layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Calibration file to write "
                             "(safetensors)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="One prompt per line "
                                           "(default: the 144 shipped prompts)."),
    samples: int = typer.Option(16, "--samples", help="Prompts to run (evenly spaced over "
                                "the set); the time grows with it."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Head sampling steps per "
                                        "block (default: 25, or the model's if fewer)."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's)."),
    seed: int = typer.Option(0, help="Seed of the first prompt (the i-th uses seed + i)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if "
                                         "present)."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype (default: bfloat16 on "
                                        "cuda, float32 on cpu)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    debug: bool = DEBUG_OPTION,
):
    """Run the generation schedule over calibration prompts and record each quantizable
    layer's input statistics (absolute and per-channel maxima) for `quantize`."""
    from ..calibration.prompts import load_prompts
    from ..calibration.stats import calibrate_checkpoint
    from .generate import progress_bar

    texts = load_prompts(prompts, samples)
    t0 = time.perf_counter()

    def first_prompt(seconds: float, total: int) -> None:
        if total > 1:
            typer.echo(f"the first prompt took {seconds:.0f}s: about {_duration(seconds * total)}"
                       f" for all {total} (fewer: --samples, --steps, a smaller --height and "
                       "--width)", err=True)

    calib = calibrate_checkpoint(checkpoint, out, texts, steps=steps, height=height,
                                 width=width, seed=seed, device=device, dtype=dtype,
                                 on_step=progress_bar(f"calibrating {len(texts)} prompt"
                                                      f"{'s' if len(texts) != 1 else ''}, AR "
                                                      "blocks", progress),
                                 on_first=first_prompt)
    m = calib.meta
    typer.echo(f"wrote {out}: {len(calib.amax)} layers, {m['samples']} prompts (hash "
               f"{m['prompts_sha256']}), {m['height']}x{m['width']}, N = {m['steps']}, in "
               f"{time.perf_counter() - t0:.1f}s")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@export_app.command("quantize", cls=Command)
def quantize_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Float checkpoint "
                                    "directory (released layout)."),
    recipe: str = typer.Option(..., "--recipe", "-r", help=RECIPE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the quantized "
                             "checkpoint."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="File written by `bitdance-export calibrate` for this "
        "checkpoint (needed by fp8 and int8-sq)."),
    debug: bool = DEBUG_OPTION,
):
    """Write a quantized checkpoint (same layout; quantized weights with their scales and a
    quantization.json) that `bitdance-rt generate` and `bitdance-export` load like any
    checkpoint."""
    from ..calibration.quantize import quantize_checkpoint
    from ..checkpoint import family_of
    from ..errors import BitDanceError

    if family_of(checkpoint) == "imagenet":
        if calibration is not None:
            raise BitDanceError("--calibration: the ImageNet family takes the weight-only "
                                "recipes (fp8-weight, int8-weight), which need none; leave it out")
        from ..imagenet.quantize import quantize as quantize_imagenet

        layout = quantize_imagenet(checkpoint, recipe, out, progress=typer.echo)
    else:
        layout = quantize_checkpoint(checkpoint, recipe, out, calibration, progress=typer.echo)
    counts = ", ".join(f"{len(v)} {k} layers" for k, v in layout["modules"].items())
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    held = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    typer.echo(f"{recipe}: quantized {counts}; {out} holds {held}")


@rt_app.command("memory", cls=Command)
def memory_cmd(
    preset: str = typer.Option(..., "--preset", help="14b-64x or 14b-16x (or mid, tiny)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP + " "
                                         "Default: the float checkpoint in bf16."),
    height: Optional[int] = typer.Option(None, help="Image height (default: 1024)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: 1024)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per run."),
    steps: Optional[int] = typer.Option(None, help="Head sampling steps N (default: 50)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance scale; 1.0 halves the "
                                             "sequences (default: 7.5)."),
    prompt_tokens: int = typer.Option(256, "--prompt-tokens", help="Longest prompt "
                                      "(tokens) the KV cache makes room for."),
    debug: bool = DEBUG_OPTION,
):
    """Print the GPU memory one generation needs with the PyTorch backend on CUDA (weights per
    component, KV cache, head buffers, CUDA-graph pools, activations), computed from the
    shapes without allocating anything."""
    from ..memory import memory_budget
    from ..calibration.recipes import get_recipe
    from ..spec import preset as get_preset

    spec = get_preset(preset)
    if recipe is not None:
        get_recipe(recipe)
    typer.echo(memory_budget(spec, recipe, height, width, num_images, steps, guidance,
                             prompt_tokens).table())
