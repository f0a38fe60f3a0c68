"""``bitdance-rt generate``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..limits import DEFAULT_SEED
from .app import DEBUG_OPTION, Command, rt_app


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
                spent = time.perf_counter() - state["t0"]
                # the time left once a tenth is done (the first steps include warm-up)
                left = f", about {spent * (total - done) / done:.0f}s left" \
                    if total <= 10 * done < 10 * total else ""
                print(f"{label} {done}/{total} {spent:.1f}s{left}", file=sys.stderr, flush=True)
        return plain

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    task = {}

    def update(done, total):
        if not task:
            bar.start()
            task["id"] = bar.add_task(label, total=total)
        bar.update(task["id"], completed=done)
        if done >= total:
            bar.stop()
    return update




@rt_app.command(cls=Command)
def generate(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to draw "
                                         "(text-to-image checkpoints)."),
    label: Optional[str] = typer.Option(
        None, "--class", help="Class-conditional ImageNet checkpoints: the class to draw, an "
        "index 0..999 or an ImageNet class name (e.g. 'golden retriever')."),
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
                                             "disables it (default: the model's: 7.5 for the "
                                             "released models, 4.0 for the demo model)."),
    seed: int = typer.Option(DEFAULT_SEED, help="Random seed (same seed, same image)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if "
                                         "present)."),
    dtype: Optional[str] = typer.Option(
        None, help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)."),
    out: Path = typer.Option(Path("bitdance.png"), "--out", "-o",
                             help="Output PNG; with several images _0, _1, ... are appended."),
    backend: str = typer.Option("torch", help="torch (fast loop), reference (the eager "
                                "baseline), onnxruntime or tensorrt (both need --export-dir)."),
    engine_dir: Optional[Path] = typer.Option(
        None, "--export-dir", "--engine-dir", help="onnxruntime: a directory written by "
        "bitdance-export; "
        "tensorrt: the same directory (or its engines/) after `bitdance-export build` "
        "(--engine-dir: the old name, kept for this release)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs",
                                     help="Replay the head loop and block step as CUDA graphs."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the head (torch)."),
    timings: bool = typer.Option(False, "--timings", help="Print a per-stage timing table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    debug: bool = DEBUG_OPTION,
):
    """Generate images from a text prompt (or, with an ImageNet checkpoint, of a class) and
    write PNG files (settings in PNG metadata)."""
    if checkpoint is not None and _is_imagenet(checkpoint):
        return _generate_imagenet(
            checkpoint, label, prompt, height=height, width=width, steps=steps,
            guidance=guidance, seed=seed, num_images=num_images, device=device, dtype=dtype,
            out=out, backend=backend, engine_dir=engine_dir, compile=compile, timings=timings,
            progress=progress)
    _check_text_to_image(ctx, checkpoint, prompt, label)
    from ..request import GenerationRequest, unknown_words
    from ..runtime.images import check_output, save_pngs
    from ..runtime.session import (Session, builtin_checkpoint, check_backend, export_source,
                                   preflight, resolve_device, resolve_dtype)
    from ..runtime.timing import StageTimer

    req = GenerationRequest(prompt=prompt, height=height, width=width, steps=steps,
                            guidance=guidance, seed=seed, num_images=num_images)
    # Everything checkable is checked before the weights load: the settings, the output, the
    # request against the model's configs and tokenizer.
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)
    check_backend(backend, engine_dir)
    paths = check_output(out, num_images)
    if checkpoint is None and engine_dir is not None:  # the one the export was made from
        checkpoint = export_source(engine_dir, say=lambda m: typer.echo(m, err=True))
    if checkpoint is None:
        checkpoint = builtin_checkpoint(say=lambda m: typer.echo(m, err=True))
    plan, configs = preflight(checkpoint, req)  # the request planned (and tokenized) once
    check_output(out, num_images, (plan.request.height, plan.request.width))  # and room
    session = Session.open(checkpoint, backend=backend, device=str(dev), dtype=dtype,
                           engine_dir=engine_dir, cuda_graphs=cuda_graphs, compile=compile,
                           warn=lambda m: typer.echo(f"warning: {m}", err=True),
                           configs=configs)
    unknown = unknown_words(session.spec, prompt)
    if unknown:
        typer.echo(f"warning: this model was trained on a small vocabulary and never saw "
                   f"{', '.join(repr(w) for w in unknown)}; the image will not show "
                   f"{'them' if len(unknown) > 1 else 'it'} "
                   f"(its words: {' '.join(session.spec.info.vocabulary)})", err=True)
    timer = StageTimer(dev, enabled=timings)
    images = session.generate(plan, on_step=progress_bar("AR steps", progress), timer=timer)[0]
    save_pngs(images.numpy(), paths, session.metadata(plan))
    for path in paths:
        typer.echo(str(path))
    if timings:
        typer.echo(timer.table())


# -- class-conditional ImageNet checkpoints ---------------------------------------------------


def _is_imagenet(checkpoint: Path) -> bool:
    from ..imagenet.checkpoint import family_of

    return family_of(checkpoint) is not None


def _check_text_to_image(ctx, checkpoint, prompt, label) -> None:
    """A text-to-image model takes --prompt, never --class."""
    from ..errors import BitDanceError

    if label is not None:
        if checkpoint is not None and not Path(checkpoint).is_dir():
            raise BitDanceError(f"checkpoint directory {checkpoint} does not exist; --class "
                                "needs an ImageNet checkpoint (`bitdance-export convert` makes "
                                "one from the released .pt files)")
        which = "the built-in demo model" if checkpoint is None else str(checkpoint)
        raise BitDanceError(f"--class is for class-conditional ImageNet checkpoints; {which} "
                            "is a text-to-image model: describe the image with --prompt")
    if prompt is None:
        import click

        raise click.UsageError("Missing option '--prompt' (or --class, with an ImageNet "
                               "checkpoint).", ctx=ctx)


def _generate_imagenet(checkpoint, label, prompt, *, height, width, steps, guidance, seed,
                       num_images, device, dtype, out, backend, engine_dir, compile, timings,
                       progress):
    """``generate --class`` with an ImageNet checkpoint: checked, then loaded and run."""
    from ..errors import BitDanceError
    from ..imagenet import checkpoint as imagenet_checkpoint
    from ..imagenet import sample
    from ..imagenet.request import ClassRequest
    from ..runtime.images import check_output, save_pngs
    from ..runtime.session import resolve_device, resolve_dtype

    if prompt is not None:
        raise BitDanceError(f"{checkpoint} is a class-conditional ImageNet checkpoint: it takes "
                            "--class (an index 0..999 or a class name), not --prompt")
    if label is None:
        raise BitDanceError(f"{checkpoint} is a class-conditional ImageNet checkpoint: give "
                            "--class, an index 0..999 or an ImageNet class name")
    if backend not in sample.BACKENDS:
        raise BitDanceError(f"--backend {backend}: ImageNet checkpoints run with --backend "
                            f"{', '.join(sample.BACKENDS)}")
    if (backend in sample.GRAPH_BACKENDS) != (engine_dir is not None):
        raise BitDanceError("--backend onnxruntime or tensorrt and --export-dir go together for "
                            "ImageNet checkpoints (the graphs of `bitdance-export --checkpoint "
                            "DIR --out EXPORT`, and for tensorrt their engines)")
    if compile:
        raise BitDanceError("--compile is not available for ImageNet checkpoints; leave it out")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    paths = check_output(out, num_images)
    configs = imagenet_checkpoint.load(checkpoint, weights=False)
    req = ClassRequest(label, num_images, seed, steps, guidance).resolved(configs, height, width)
    check_output(out, num_images, (configs.spec.image_size,) * 2)  # and room for them
    graphs = backend in sample.GRAPH_BACKENDS  # the graphs hold the weights
    model = imagenet_checkpoint.load(checkpoint, dt, dev, weights=not graphs)
    runner = sample.steps_for(model, backend, engine_dir)
    timer = None
    if timings:
        from ..runtime.timing import StageTimer

        timer = StageTimer(dev)
        if getattr(runner, "graphs", False):  # a replayed graph runs no Python to count
            runner.graphs = False
    images = sample.generate(model, req.labels, req.steps, req.guidance, req.seed, runner,
                             on_step=progress_bar("AR steps", progress), timer=timer)
    save_pngs(images.cpu().numpy(), paths, req.metadata(model, backend))
    for path in paths:
        typer.echo(str(path))
    if timer is not None:
        typer.echo(timer.table())
