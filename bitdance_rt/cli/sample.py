"""``bitdance-rt sample``: many images of a class-conditional ImageNet checkpoint into one
``.npz`` for the ADM evaluation suite (see :mod:`bitdance_rt.imagenet.npz_run`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..limits import DEFAULT_SEED
from .app import DEBUG_OPTION, Command, rt_app


def images_progress(label: str, enabled: bool = True):
    """A progress bar over images with img/s and the time left, as ``progress(done, total,
    seconds)``; one line per 10% when stderr is not a terminal."""
    if not enabled:
        return None

    def rate(done, seconds):
        return done / seconds if seconds > 0 else 0.0

    if not sys.stderr.isatty():
        state = {"last": -1}

        def plain(done, total, seconds):
            tenth = 10 * done // max(total, 1)
            if tenth != state["last"]:
                state["last"] = tenth
                r = rate(done, seconds)
                left = f", {(total - done) / r:.0f}s left" if r > 0 and done < total else ""
                print(f"{label} {done}/{total} images, {r:.2f} img/s{left}", file=sys.stderr,
                      flush=True)
        return plain

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.2f} img/s"), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True))
    task = {}

    def update(done, total, seconds):
        if not task:
            bar.start()
            task["id"] = bar.add_task(label, total=total, rate=0.0)
        bar.update(task["id"], completed=done, rate=rate(done, seconds))
        if done >= total:
            bar.stop()
    return update


def _fingerprint(checkpoint: Path) -> str:
    """The sha256 of the checkpoint's info and weight files (a run's chunks belong to them)."""
    import hashlib

    from ..imagenet.checkpoint import OUTPUTS
    from ..manifest import sha256_file

    h = hashlib.sha256()
    for name in OUTPUTS:
        h.update(f"{name}:{sha256_file(checkpoint / name)}\n".encode())
    return h.hexdigest()


@rt_app.command(cls=Command)
def sample(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A class-conditional "
                                    "ImageNet checkpoint (bitdance-export convert)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .npz to write (arr_0: uint8 "
                             "[N, H, W, 3], the ADM evaluation suite's format)."),
    num: int = typer.Option(50000, "--num", help="Images in all."),
    per_class: Optional[int] = typer.Option(
        None, "--per-class", help="Images per class, class by class in the authors' order "
        "(default: --num / the number of classes, rounded up)."),
    batch: int = typer.Option(64, "--batch", help="Images per chunk: one sampler call, one "
                              "file kept on disk, one unit of resuming."),
    seed: int = typer.Option(DEFAULT_SEED, help="The run's seed (chunk k draws from a seed "
                             "made of it and k)."),
    steps: Optional[int] = typer.Option(None, help="Head sampling steps (default: the "
                                        "model's)."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale, on the authors' linear "
                                             "schedule over AR steps (default: the model's)."),
    backend: str = typer.Option("torch", help="torch, reference, onnxruntime or tensorrt (both "
                                "with --export-dir)."),
    engine_dir: Optional[Path] = typer.Option(
        None, "--export-dir", "--engine-dir", help="With --backend onnxruntime: the graphs of "
        "`bitdance-export --checkpoint DIR --out EXPORT` (they hold the weights); tensorrt: the "
        "same directory (or its engines/) after `bitdance-export build`."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if "
                                         "present; under torchrun: cuda:LOCAL_RANK)."),
    dtype: Optional[str] = typer.Option(None, help="float32 or bfloat16 (default: bfloat16 "
                                        "on cuda, float32 on cpu)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N: this process makes chunks k whose remainder mod N is I (default: "
        "torchrun's RANK/WORLD_SIZE, else all). Shards on one disk share the run."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    debug: bool = DEBUG_OPTION,
):
    """Sample many images of a class-conditional ImageNet checkpoint into one .npz,
    resumably: finished chunks stay on disk, a rerun continues, a finished run is not redone,
    and the result does not depend on how many processes share it."""
    import os

    from ..errors import BitDanceError
    from ..imagenet import checkpoint as imagenet_checkpoint
    from ..imagenet import sample as imagenet_sample
    from ..imagenet.npz_run import (SampleRun, check_out, check_room_for, run_sample,
                                      shard_from_env)
    from ..imagenet.request import ClassRequest
    from ..runtime.session import resolve_device, resolve_dtype

    if backend not in imagenet_sample.BACKENDS:
        raise BitDanceError(f"--backend {backend}: sample runs with --backend "
                            f"{', '.join(imagenet_sample.BACKENDS)}")
    if (backend in imagenet_sample.GRAPH_BACKENDS) != (engine_dir is not None):
        raise BitDanceError("--backend onnxruntime or tensorrt and --export-dir go together (the "
                            "graphs of `bitdance-export --checkpoint DIR --out EXPORT`, and for "
                            "tensorrt their engines)")
    out = check_out(out)  # before anything is loaded
    rank, world = shard_from_env(shard)
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    configs = imagenet_checkpoint.load(checkpoint, weights=False)
    spec = configs.spec
    # the steps and guidance checked and defaulted as `generate --class` does
    req = ClassRequest("0", 1, seed, steps, guidance).resolved(configs, None, None)
    if per_class is None:
        per_class = -(-num // spec.num_classes)
    run = SampleRun(num=num, per_class=per_class, num_classes=spec.num_classes, batch=batch,
                    seed=req.seed, steps=req.steps, guidance=req.guidance,
                    model=_fingerprint(Path(checkpoint)))
    check_room_for(out, run, 3 * spec.image_size ** 2)
    model = imagenet_checkpoint.load(checkpoint, dt, dev,
                                     weights=backend not in imagenet_sample.GRAPH_BACKENDS)
    runner = imagenet_sample.steps_for(model, backend, engine_dir)

    def generate_chunk(labels, chunk_seed):
        images = imagenet_sample.generate(model, labels.tolist(), run.steps, run.guidance,
                                          chunk_seed, runner)
        return images.cpu().numpy()

    t0 = time.perf_counter()
    label = f"shard {rank}/{world}" if world > 1 else "images"
    bar = images_progress(label, progress)
    made = {"todo": 0}

    def on_progress(done, total, seconds):
        made["todo"] = total
        if bar:
            bar(done, total, seconds)

    state = run_sample(out, run, generate_chunk, rank=rank, world=world, progress=on_progress)
    seconds = time.perf_counter() - t0
    mine = sum(len(run.chunk_labels(k)) for k in range(rank, run.chunks, world))
    kept = f"; {mine - made['todo']} kept from an earlier run" if made["todo"] < mine else ""
    if state == "finished":
        typer.echo(f"{out} is already complete ({num} images); nothing to do")
    elif state == "waiting":
        typer.echo(f"shard {rank}/{world}: made {made['todo']} images in {seconds:.1f}s{kept}; "
                   f"{out} is written by the shard that finishes last")
    else:
        typer.echo(f"{out}: {num} images; made {made['todo']} in {seconds:.1f}s{kept}")
