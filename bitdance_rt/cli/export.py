"""``bitdance-export``: export (the app's own command), ``build``, ``check``, ``make-tiny``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import BitDanceError
from .app import DEBUG_OPTION, Command, export_app


EXPORT_HELP = """Export a BitDance checkpoint to ONNX graphs (prefill, block_step,
head_prepare, head_step, decoder) and a manifest; optionally build TensorRT engines from them.

\b
Usage:
  bitdance-export --checkpoint CKPT --out DIR             ONNX graphs + manifest.json
  bitdance-export --checkpoint CKPT --out DIR --engines   ... and TensorRT engines
  bitdance-export build DIR [--target sm89]               engines for an existing export
  bitdance-export check DIR                               compare every graph with PyTorch
  bitdance-export make-tiny DIR                           a small random test checkpoint
  bitdance-export convert MODEL.pt --autoencoder AE.pt --out DIR   an ImageNet .pt, converted
  bitdance-export calibrate --checkpoint CKPT --out F     activation statistics for quantize
  bitdance-export quantize --checkpoint CKPT --recipe R --out DIR  a quantized checkpoint

\b
Then: bitdance-rt generate --backend onnxruntime --export-dir DIR ...
      bitdance-rt generate --backend tensorrt --export-dir DIR ...  (CUDA GPU)
"""


@export_app.callback(help=EXPORT_HELP, invoke_without_command=True)
def export_main(
    ctx: typer.Context,
    debug: bool = DEBUG_OPTION,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="14b, 14b-64x or 14b-16x (or another preset); optional "
        "when the checkpoint's configs identify the model (they are checked against it)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint directory (released layout) to export."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for the "
                                       "ONNX graphs and manifest.json: new, empty or an "
                                       "earlier export (replaced only when the new one is "
                                       "complete)."),
    dtype: str = typer.Option("fp32", help="Weight and KV dtype of the graphs: fp32, fp16 or "
                              "bf16 (bf16 runs on CUDA only in ONNX Runtime)."),
    max_batch: int = typer.Option(4, "--max-batch", help="Most images per call the graphs "
                                  "are meant for (recorded in the manifest; the runtime "
                                  "checks it)."),
    max_seq: int = typer.Option(4608, "--max-seq", help="Most KV slots per sequence (prompt + "
                                "image tokens; recorded and checked; the static cache length "
                                "of --attention native graphs). Default: 4608, or the model's "
                                "positions when it has fewer."),
    num_layers: Optional[int] = typer.Option(
        None, "--num-layers", help="Keep only the first K LLM layers (full-width test "
        "exports); such a directory is refused for generation."),
    attention: Optional[str] = typer.Option(
        None, help="standard (plain ONNX operators), native (ONNX Attention + TensorScatter, "
        "the cache written in place: TensorRT's own layers; runs in ONNX Runtime too) or "
        "plugin (the bitdance::kv_attend node for datacenter TensorRT's plugin). Default: "
        "native with --engines, else standard."),
    engines: bool = typer.Option(False, "--engines", help="Also build TensorRT engines into "
                                 "OUT/engines (see `bitdance-export build --help`)."),
    target: str = typer.Option("auto", help="With --engines: GPU target of the engines."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache",
                                                help="With --engines: TensorRT timing cache "
                                                "file (read and updated)."),
    opt_size: Optional[str] = typer.Option(None, "--opt-size", help="With --engines: image "
                                           "size HxW the engines are tuned for."),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="With --engines: "
                                            "images per call the engines are tuned for."),
    trt: Optional[str] = typer.Option(None, "--trt", help="With --engines: tensorrt or "
                                      "tensorrt_rtx (default: whichever imports; env "
                                      "BITDANCE_TRT)."),
):
    if ctx.invoked_subcommand is not None:
        return
    if checkpoint is None and out is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)
    if checkpoint is None or out is None:
        raise BitDanceError("exporting needs both --checkpoint DIR and --out DIR")
    from ..imagenet.checkpoint import family_of

    if family_of(checkpoint) is not None:
        return _export_imagenet(ctx, checkpoint, out, dtype=dtype, model=model,
                                max_batch=max_batch, num_layers=num_layers, attention=attention,
                                engines=engines, build={"target": target,
                                                        "timing_cache": timing_cache,
                                                        "opt_size": opt_size,
                                                        "opt_batch": opt_batch, "flavor": trt})
    from ..export import export_checkpoint
    from ..export.build import export_with_engines

    if dtype.lower() in ("bf16", "bfloat16") and not engines:
        import torch

        if not torch.cuda.is_available():
            typer.echo("warning: bf16 graphs are for TensorRT or ONNX Runtime's CUDA provider; "
                       "ONNX Runtime on this CPU cannot run them (export --dtype fp32 to run "
                       "them here)", err=True)
    if getattr(ctx.get_parameter_source("max_seq"), "name", "") != "COMMANDLINE":
        from ..checkpoint import read_spec

        # the default, or all the positions of a model that has fewer (the demo model: 4096)
        max_seq = min(max_seq, read_spec(checkpoint).llm.max_position_embeddings)
    settings = dict(model_name=model, dtype=dtype, num_layers=num_layers, max_batch=max_batch,
                    max_seq=max_seq, progress=typer.echo)
    start = time.perf_counter()
    if engines:
        build = {"target": target, "timing_cache": timing_cache, "opt_size": opt_size,
                 "opt_batch": opt_batch, "flavor": trt}
        manifest = export_with_engines(checkpoint, out, build=build,
                                       attention=attention or "native", **settings)
    else:
        manifest = export_checkpoint(checkpoint, out, attention=attention or "standard",
                                     **settings)
    size = sum(sum(g["files"].values()) for g in manifest["graphs"].values())
    typer.echo(f"wrote {out / 'manifest.json'} ({manifest['preset']}, {manifest['dtype']}, "
               f"--attention {manifest['attention']}, {size / 1e9:.2f} GB in all"
               + (", engines in " + str(out / "engines") if engines else "")
               + f") in {time.perf_counter() - start:.1f}s")


def _export_imagenet(ctx, checkpoint: Path, out: Path, *, dtype, model, max_batch, num_layers,
                     attention, engines, build) -> None:
    """``bitdance-export --checkpoint DIR`` of a class-conditional ImageNet checkpoint."""
    from ..export import imagenet as imagenet_export

    def given_here(name: str) -> bool:  # on the command line (not a default)
        return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"

    given = [f"--{n.replace('_', '-')}" for n in ("model", "num_layers", "attention", "max_seq")
             if given_here(n)]
    if given:
        raise BitDanceError(f"{', '.join(given)}: not for a class-conditional ImageNet "
                            "checkpoint (its graphs keep the cache in the runtime, the standard "
                            "form, with the model's own sequence length); leave "
                            f"{'it' if len(given) == 1 else 'them'} out")
    if not given_here("max_batch"):
        max_batch = imagenet_export.DEFAULT_MAX_BATCH
    start = time.perf_counter()
    finish = None
    if engines:
        from ..export.build import build_engines

        def finish(stage: Path) -> None:
            build_engines(stage, progress=typer.echo, **build)
    manifest = imagenet_export.export_checkpoint(checkpoint, out, dtype=dtype,
                                                 max_batch=max_batch, progress=typer.echo,
                                                 finish=finish)
    size = sum(sum(g["files"].values()) for g in manifest["graphs"].values())
    typer.echo(f"wrote {out / 'manifest.json'} (imagenet, {manifest['preset']}, "
               f"{manifest['dtype']}, up to {manifest['limits']['max_batch']} images per call, "
               f"{size / 1e9:.2f} GB in all"
               + (", engines in " + str(out / "engines") if engines else "")
               + f") in {time.perf_counter() - start:.1f}s")


@export_app.command("build", cls=Command)
def build_cmd(
    export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="Directory written by bitdance-export."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Engine directory (default: "
                                       "EXPORT_DIR/engines; replaced only when complete)."),
    target: str = typer.Option("auto", help="auto, sm75, sm80, sm86, sm89, sm90, sm100, sm120 "
                               "or sm121. auto: TensorRT-RTX's portable engines (sm80 and "
                               "later RTX cards) or datacenter TensorRT's visible GPU."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="TensorRT timing "
                                                "cache file (read if present, then updated)."),
    opt_size: Optional[str] = typer.Option(None, "--opt-size", help="Image size HxW in pixels "
                                           "the engines are tuned for (default: the model's)."),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="Images per call the "
                                            "engines are tuned for (default 1)."),
    trt: Optional[str] = typer.Option(None, "--trt", help="tensorrt (datacenter: H100/H200/"
                                      "B200, plugins) or tensorrt_rtx (GeForce/RTX PRO, builds "
                                      "without a GPU); default: whichever imports, or env "
                                      "BITDANCE_TRT."),
    debug: bool = DEBUG_OPTION,
):
    """Build one TensorRT engine per graph of an export (optimization profiles from its
    manifest, strongly typed: the graphs' dtype), and engines.json."""
    from ..export.build import build_engines

    start = time.perf_counter()
    info = build_engines(export_dir, out, target=target, timing_cache=timing_cache,
                         opt_size=opt_size, opt_batch=opt_batch, flavor=trt,
                         progress=typer.echo)
    size = sum(e["bytes"] for e in info["engines"].values())
    where = out or export_dir / "engines"
    typer.echo(f"wrote {where / 'engines.json'} ({info['flavor']} {info['version']}, "
               f"{', '.join(info['targets'])}, {size / 1e6:.1f} MB in all) in "
               f"{time.perf_counter() - start:.1f}s")


@export_app.command("check", cls=Command)
def check_cmd(
    engine_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="Directory written by bitdance-export."),
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
    typer.echo(format_table(rows, read_manifest(engine_dir)))
    failed = [f"{r.graph}/{r.case}/{r.output}" for r in rows if not r.passed]
    typer.echo(f"seed {used}: {len(rows) - len(failed)}/{len(rows)} outputs within tolerance")
    if failed:
        typer.echo(f"FAILED: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@export_app.command("make-tiny", cls=Command)
def make_tiny_cmd(
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT_DIR", help="Directory to write the checkpoint "
                                             "into (or --out)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The same as OUT_DIR."),
    family: str = typer.Option("t2i", "--family", help="t2i (text-to-image, the released "
                               "layout) or imagenet (class-conditional: the authors' .pt "
                               "files in pt/, and the converted directory)."),
    parallel_num: Optional[int] = typer.Option(None, "--parallel-num", help="Tokens per AR "
                                               "step: 4 (default), 16, 64; imagenet: 1 "
                                               "(default), 4, 16."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    gan_decoder: bool = typer.Option(False, "--gan-decoder", help="Use the gan-decoder variant."),
    size: str = typer.Option("tiny", "--size", help="tiny (15 MB, for tests) or mid (the CPU "
                             "benchmark preset, about 150 MB)."),
    debug: bool = DEBUG_OPTION,
):
    """Write a small random-weight checkpoint in exactly the released layout (float32)."""
    out_dir = _tiny_out(out_dir, out)
    if family != "t2i":
        return _make_tiny_imagenet(out_dir, family, parallel_num, seed, gan_decoder, size)
    from ..tiny import make_tiny

    parallel_num = 4 if parallel_num is None else parallel_num
    path = make_tiny(out_dir, parallel_num=parallel_num, seed=seed, gan_decoder=gan_decoder,
                     size=size)
    nbytes = sum(f.stat().st_size for f in path.iterdir())
    typer.echo(f"wrote {path} ({nbytes / 1e6:.1f} MB, {size}, P = {parallel_num})")


# -- the class-conditional ImageNet family ------------------------------------------------------


def _tiny_out(out_dir: Optional[Path], out: Optional[Path]) -> Path:
    if out_dir is not None and out is not None and out_dir != out:
        raise BitDanceError(f"make-tiny got two directories ({out_dir} and --out {out}); "
                            "give one")
    if out_dir is None and out is None:
        import click

        raise click.UsageError("Missing argument 'OUT_DIR' (or --out DIR).")
    return out_dir or out


def _make_tiny_imagenet(out_dir: Path, family: str, parallel_num, seed, gan_decoder, size):
    from ..imagenet.tiny import make_tiny
    from ..limits import MAX_SEED

    if family != "imagenet":
        raise BitDanceError(f"--family must be t2i or imagenet, got {family!r}")
    if gan_decoder or size != "tiny":
        raise BitDanceError("--gan-decoder and --size are for the t2i family; leave them out "
                            "with --family imagenet")
    if not 0 <= seed <= MAX_SEED:
        raise BitDanceError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}")
    parallel_num = 1 if parallel_num is None else parallel_num
    path = make_tiny(out_dir, parallel_num=parallel_num, seed=seed)
    nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    typer.echo(f"wrote {path} ({nbytes / 1e6:.1f} MB, imagenet tiny, {parallel_num} tokens per "
               "step; the authors' .pt files in pt/)")


@export_app.command("convert", cls=Command)
def convert_cmd(
    model_pt: Path = typer.Argument(..., metavar="MODEL_PT", help="A released ImageNet model checkpoint "
                                    "(BitDance_B_1x.pt, ...)."),
    autoencoder: Optional[Path] = typer.Option(
        None, "--autoencoder", "-a", help="The released autoencoder (ae_d16c32.pt), loaded "
        "over the model's own copy as the authors' sampler does (default: the model's copy)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: new, empty or an "
                             "earlier output of convert (replaced only when complete)."),
    weights: str = typer.Option("ema", "--weights", help="ema (the default, as the authors "
                                "sample) or model (the trained weights)."),
    debug: bool = DEBUG_OPTION,
):
    """Convert a class-conditional ImageNet checkpoint (the authors' .pt files, read without
    running any code they may hold) to a checkpoint directory; prints the architecture found
    and the released preset it matches."""
    from ..imagenet.checkpoint import convert

    start = time.perf_counter()
    result = convert(model_pt, out, autoencoder, weights)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    sp = result.spec
    typer.echo(f"architecture: width {sp.dim}, {sp.n_layer} layers, {sp.n_head} heads, "
               f"{sp.parallel_num} tokens per step, {sp.cls_token_num} class tokens, "
               f"{sp.num_classes} classes, head {sp.head_layers} x {sp.head_dim} "
               f"({sp.head_adaln} adaLN), {sp.image_size}x{sp.image_size} images; "
               f"autoencoder ch {sp.ae.ch}, ch_mult {list(sp.ae.ch_mult)}, "
               f"{sp.ae.num_res_blocks} res blocks")
    typer.echo(f"preset: {result.name}")
    typer.echo(f"wrote {out} in {time.perf_counter() - start:.1f}s")
