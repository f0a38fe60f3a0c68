"""Images per second of the class-conditional ImageNet family, side by side in one process on
the same weights: the authors' sampler against our ``reference`` and ``torch`` backends.

    python bench/throughput.py --preset tiny --batch 16 --steps 4 --repeats 3 \\
        --authors /path/to/imagenet_gen --json out.json
    python bench/throughput.py --preset imagenet-b-16x,imagenet-b-4x --batch 64 \\
        --device cuda --dtype bfloat16 --runners torch,reference --json out.json

Runners (``--runners``; default: ``authors`` when ``--authors`` is given, then ``reference``
and ``torch``):

- ``authors``: ``torch.manual_seed(S); model.sample(labels, sample_steps, cfg_scale)`` of their
  code, imported at run time from ``--authors`` (the directory holding their ``src/``), then
  their sampling script's uint8 conversion. Their model is built and loaded as their sampling
  script does (``BitDance(...)`` in channels_last, ``load_state_dict(ckpt["ema"],
  strict=True)``, ``load_vae_weight()``), from ``.pt`` files that hold the same weights as
  ours. As in ``tests/data/imagenet_golden/make_golden.py``: their ``@torch.compile`` is off
  (both sides run eagerly), ``flash_attn`` (never called when sampling) is a stub, their
  ``VQModel`` gets the model's autoencoder config, and their ``nn.Linear`` computes through
  ``bitdance_rt.models.linear.linear`` while they run (on the CPU in float32 it tiles rows so
  that a row's product does not depend on the batch: what makes bit-for-bit equality possible;
  elsewhere it is ``F.linear``). With ``--dtype bfloat16`` their fp32 weights run under
  ``torch.autocast(bf16)``, and on CUDA with ``set_float32_matmul_precision("high")`` and
  deterministic cuDNN, as their ``sample_ddp.py`` does.
- ``reference``, ``torch``, ``onnxruntime``, ``tensorrt``:
  ``bitdance_rt.imagenet.sample.generate(model, labels, steps, guidance, seed, runner)`` (the
  model's weights in ``--dtype``; onnxruntime: the graphs of ``--export-dir``, an export of
  ``--checkpoint``; tensorrt: that export's engines, on a GPU; loaded before the runs).

Weights: ``--preset NAME[,NAME...]`` builds random weights, a pure function of ``--weights-seed``
(drawn on the run's device): ``tiny``, ``tiny-4x``, ``tiny-16x`` are make-tiny's checkpoints
(``bitdance-export make-tiny --family imagenet``, bit for bit), the other names are the presets
of ``bitdance_rt/imagenet/spec.py`` (random values scaled as make-tiny's). With ``--authors``
their ``.pt`` files are written to a temporary directory first. ``--checkpoint DIR`` loads a
converted directory instead, and the authors read the ``.pt`` files in ``DIR/pt`` (make-tiny's
layout; the file names are those of ``DIR/bitdance_rt.json``'s ``source``).

Each runner first makes ``--warmup`` untimed runs (at the measured batch, with ``--warmup-steps``
head steps: every kernel the timed runs use, for a fraction of their time), then the runners
take turns, ``--repeats`` timed runs each (A B C A B C ...). A run is timed from the labels to
the uint8 images on the CPU (CUDA synchronized). The table gives per runner the median seconds
of a run and ``batch / median`` images per second, and the ratio of that to the authors' and
to the reference's. The images of the first timed run of each runner are compared with the
authors' (and with the reference's): on the CPU in float32 they must be equal bit for bit (the
exit status is 1 if not), elsewhere the fraction of identical uint8 values is reported.
``--json`` is rewritten after every timed run (``"complete": false`` until the end), so a run
stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitdance_rt  # noqa: E402,F401  (before torch: sets the CPU thread and MKL policies)
import torch  # noqa: E402

from bitdance_rt import dtypes  # noqa: E402
from bitdance_rt.files import atomic_path  # noqa: E402
from bitdance_rt.imagenet import checkpoint, sample, tiny  # noqa: E402
from bitdance_rt.imagenet.spec import PRESETS, check, defaults_for  # noqa: E402
from bitdance_rt.imagenet.transformer import ClassConditionalTransformer, rope_table  # noqa: E402
from bitdance_rt.models.autoencoder import BinaryAutoencoder  # noqa: E402

TINY = {"tiny": 1, "tiny-1x": 1, "tiny-4x": 4, "tiny-16x": 16}
OURS = sample.BACKENDS  # ("torch", "reference", "onnxruntime", "tensorrt")
GRAPH_RUNNERS = sample.GRAPH_BACKENDS  # held to parity, not to bit equality
ORT_PARITY = 0.999


# -- weights ---------------------------------------------------------------------------------------


def random_states(name: str, seed: int, device, encoder: bool):
    """``(spec, model_state, ae_state)`` of a preset with random weights. ``ae_state`` holds
    the encoder only when ``encoder`` (the authors' strict load needs it; we never run it): it
    is drawn last, so the other weights do not depend on it."""
    if name in TINY:
        p = TINY[name]
        _, ema, ae_state = tiny.tiny_states(p, seed)  # make-tiny's weights, bit for bit
        model_state = {k: v for k, v in ema.items() if not k.startswith("vae.")}
        if not encoder:
            ae_state = {k: v for k, v in ae_state.items() if not k.startswith("encoder.")}
        return tiny.tiny_spec(p), model_state, ae_state
    spec = PRESETS[name].spec
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        transformer, ae = ClassConditionalTransformer(spec), BinaryAutoencoder(spec.ae)
    with torch.device(device):  # make-tiny's value rules, drawn where they are used
        model_state = tiny._random_state(transformer, gen)
        ae_state = {f"decoder.{k}": v for k, v in tiny._random_state(ae.decoder, gen).items()}
        ae_state["decoder.conv_out.weight"] *= 0.3
        if encoder:
            ae_state.update({f"encoder.{k}": v
                             for k, v in tiny._random_state(ae.encoder, gen).items()})
    return spec, model_state, ae_state


def model_from_states(spec, name, model_state, ae_state, dtype, device):
    """An :class:`ImageNetModel` as :func:`checkpoint.load` makes one from a converted
    directory holding these states (no encoder; the autoencoder in channels_last)."""
    device = torch.device(device)
    with torch.device("meta"):
        transformer, ae = ClassConditionalTransformer(spec), BinaryAutoencoder(spec.ae)
    transformer.load_state_dict({k: v.to(device=device, dtype=dtype)
                                 for k, v in model_state.items()}, strict=True, assign=True)
    decoder = {k: v.to(device=device, dtype=dtype) for k, v in ae_state.items()
               if not k.startswith("encoder.")}
    missing = [k for k in ae.load_state_dict(decoder, strict=False, assign=True).missing_keys
               if not k.startswith("encoder.")]
    assert not missing, missing
    ae.encoder = None
    transformer.rope = rope_table(spec).to(device)
    return checkpoint.ImageNetModel(
        spec, name, defaults_for(spec), transformer.eval().requires_grad_(False),
        ae.to(memory_format=torch.channels_last).eval().requires_grad_(False), dtype, device)


def write_authors_pt(d: Path, name: str, seed: int, model_state, ae_state):
    """The authors' two files (their training script's ``ema`` entry, with the autoencoder's
    copy ``vae.*``, and the autoencoder's ``state_dict``) for these weights."""
    if name in TINY:
        return tiny.write_pt_files(d, TINY[name], seed)
    d.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.cpu() for k, v in ae_state.items()}
    model_pt, ae_pt = d / f"BitDance_{name}_random.pt", d / "ae_random.pt"
    torch.save({"ema": {**{k: v.cpu() for k, v in model_state.items()},
                        **{f"vae.{k}": v for k, v in cpu.items()}}}, model_pt)
    torch.save({"state_dict": cpu}, ae_pt)
    return model_pt, ae_pt


def checkpoint_pt(d: Path, model) -> tuple[Path, Path | None, str]:
    """The authors' files of a converted directory: ``DIR/pt/`` and the names its JSON
    records (``weights``: which entry of the model file was converted)."""
    src = model.source or {}
    pt = d / tiny.PT_DIR
    model_pt = pt / str(src.get("model"))
    if not src.get("model") or not model_pt.is_file():
        raise SystemExit(f"error: --authors needs the authors' .pt files of {d} in {pt}/ "
                         f"(the model file {src.get('model')!r} named in "
                         f"{d / checkpoint.INFO_FILE}); none there")
    ae_pt = pt / src["autoencoder"] if src.get("autoencoder") else None
    if ae_pt is not None and not ae_pt.is_file():
        raise SystemExit(f"error: {ae_pt} is missing (the autoencoder file named in "
                         f"{d / checkpoint.INFO_FILE})")
    return model_pt, ae_pt, src.get("weights", "ema")


# -- the authors' sampler ------------------------------------------------------------------------


def import_authors(root: Path, parallel: bool):
    """Their ``src.model`` (one token per step) or ``src.model_parallel``, imported from
    ``root`` with ``@torch.compile`` a no-op and a stub ``flash_attn``."""
    if not (root / "src" / "model.py").is_file():
        raise SystemExit(f"error: --authors {root} holds no src/model.py (give the directory "
                         "of their ImageNet code, imagenet_gen/)")
    if "flash_attn" not in sys.modules:
        stub = types.ModuleType("flash_attn")

        def flash_attn_func(*a, **k):
            raise RuntimeError("flash_attn is not used when sampling")

        stub.flash_attn_func = flash_attn_func
        sys.modules["flash_attn"] = stub
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # read when a function is decorated: their @torch.compile() returns it unchanged
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        qae = importlib.import_module("src.qae")
        mod = importlib.import_module("src.model_parallel" if parallel else "src.model")
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before
    return qae, mod


@contextlib.contextmanager
def our_linear():
    """Their ``nn.Linear`` layers compute through our ``linear`` (see the module docstring)."""
    from bitdance_rt.models.linear import linear

    plain = torch.nn.Linear.forward
    torch.nn.Linear.forward = lambda self, x: linear(x, self.weight, self.bias)
    try:
        yield
    finally:
        torch.nn.Linear.forward = plain


@contextlib.contextmanager
def authors_settings(device: torch.device, dtype: torch.dtype):
    """Their sampling script's numeric settings (CUDA) and autocast for bf16."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(our_linear())
        if device.type == "cuda":
            precision = torch.get_float32_matmul_precision()
            flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            stack.callback(torch.set_float32_matmul_precision, precision)
            stack.callback(lambda: setattr(torch.backends.cudnn, "deterministic", flags[0]))
            stack.callback(lambda: setattr(torch.backends.cudnn, "benchmark", flags[1]))
        if dtype != torch.float32:
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        yield


def authors_model(root: Path, spec, model_pt: Path, ae_pt: Path | None, weights: str, device):
    qae, mod = import_authors(root, spec.parallel_num > 1)
    ddconfig = spec.ae.to_json_dict()["ddconfig"]
    mod.VQModel = lambda _ddconfig, num_codebooks: qae.VQModel(ddconfig, num_codebooks)
    kwargs = dict(dim=spec.dim, n_layer=spec.n_layer, n_head=spec.n_head,
                  diff_layers=spec.head_layers, diff_dim=spec.head_dim,
                  diff_adanln_layers=spec.head_adaln, latent_dim=spec.latent_dim, down_size=16,
                  patch_size=1, resolution=spec.image_size, diff_batch_mul=4,
                  cls_token_num=spec.cls_token_num, num_classes=spec.num_classes,
                  trained_vae=str(ae_pt or ""), time_shift=spec.time_shift)
    if spec.parallel_num > 1:
        kwargs.update(parallel_num=spec.parallel_num, parallel_mode="patch")
    model = mod.BitDance(**kwargs).to(device, memory_format=torch.channels_last)
    ckpt = torch.load(model_pt, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt[weights if weights in ckpt else "model"], strict=True)
    del ckpt
    if ae_pt is not None:
        model.load_vae_weight()
    return model.eval()


# -- runs ------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runners(names, model, authors, labels, guidance, seed, device, dtype, export_dir=None):
    """name -> run(steps) giving uint8 images ``[B, H, W, 3]`` on the CPU."""
    runners = {}
    for name in names:
        if name == "authors":
            def run(steps, m=authors):
                with torch.no_grad(), authors_settings(device, dtype):
                    torch.manual_seed(seed)
                    samples = m.sample(labels, sample_steps=steps, cfg_scale=guidance)
                # their sampling script's conversion
                return (torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1)
                        .to("cpu", dtype=torch.uint8))
        else:
            runner = sample.steps_for(model, name, export_dir)  # loaded once, outside the runs

            def run(steps, runner=runner):
                return sample.generate(model, labels, steps, guidance, seed, runner)
        runners[name] = run
    return runners


def timed(run, steps, device):
    sync(device)
    t0 = time.perf_counter()
    images = run(steps)
    sync(device)
    return images, time.perf_counter() - t0


def identical(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = a == b
    return {"values": same.float().mean().item(),
            "images": int(same.reshape(same.shape[0], -1).all(dim=1).sum()),
            "of": int(a.shape[0])}


def summarize(rows: dict) -> None:
    """Each timed row's runs, images, median and img/s, then its ratios to the baselines."""
    timed_rows = [r for r in rows.values() if r["seconds"]]
    for row in timed_rows:
        sec = row["seconds"]
        row["runs"] = len(sec)
        row["images"] = row["batch"] * len(sec)
        row["median_s"] = statistics.median(sec)
        row["img_per_s"] = row["batch"] / row["median_s"]
    for row in timed_rows:
        for base in ("authors", "reference"):
            b = rows.get(base)
            row[f"ratio_to_{base}"] = (row["img_per_s"] / b["img_per_s"]
                                       if b and b["seconds"] else None)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device)}
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        info["cpu"] = names[0] if names else None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path, out) -> None:
    if path:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(result: dict) -> None:
    print(f"\n{result['preset']}: batch {result['batch']}, {result['steps']} head steps, "
          f"guidance {result['guidance']}, {result['device']} {result['dtype']}")
    head = (f"{'runner':<10}{'batch':>6}{'images':>8}{'runs':>6}{'median s':>10}{'img/s':>10}"
            f"{'/ authors':>11}{'/ reference':>13}")
    print(head)
    print("-" * len(head))
    for name, r in result["rows"].items():
        print(f"{name:<10}{r['batch']:>6}{r['images']:>8}{r['runs']:>6}{r['median_s']:>10.3f}"
              f"{r['img_per_s']:>10.3f}{fmt_ratio(r['ratio_to_authors']):>11}"
              f"{fmt_ratio(r['ratio_to_reference']):>13}")
    for name, r in result["rows"].items():
        print(f"{name} runs (s): " + ", ".join(f"{s:.3f}" for s in r["seconds"])
              + ("" if r["same_every_run"] else "  (the runs' images differ)"))
    for name, r in result["rows"].items():
        for base in ("authors", "reference"):
            same = r.get(f"identical_to_{base}")
            if same is not None:
                print(f"{name} vs {base}: {same['images']}/{same['of']} images identical, "
                      f"{100 * same['values']:.4f}% of uint8 values")


def run_preset(args, label, device, dtype, out, tmp: Path) -> dict:
    """Build the weights and runners of one preset (or the checkpoint), time them; the result
    is appended to ``out["results"]`` and the JSON rewritten after every timed run."""
    names = args.runners
    with_authors = "authors" in names
    t0 = time.perf_counter()
    authors = None
    if args.checkpoint:
        model = checkpoint.load(args.checkpoint, dtype, device)
        spec = model.spec
        if with_authors:
            model_pt, ae_pt, weights = checkpoint_pt(Path(args.checkpoint), model)
            authors = authors_model(args.authors, spec, model_pt, ae_pt, weights, device)
    else:
        spec, model_state, ae_state = random_states(label, args.weights_seed, device,
                                                    encoder=with_authors)
        check(spec, label)
        if with_authors:
            model_pt, ae_pt = write_authors_pt(tmp / label, label, args.weights_seed,
                                               model_state, ae_state)
        model = model_from_states(spec, label, model_state, ae_state, dtype, device)
        del model_state, ae_state
        if with_authors:
            authors = authors_model(args.authors, spec, model_pt, ae_pt, "ema", device)
    steps = args.steps if args.steps is not None else model.defaults["steps"]
    guidance = args.guidance if args.guidance is not None else model.defaults["guidance"]
    labels = torch.arange(args.batch, device=device) % spec.num_classes
    print(f"{label}: {spec.dim} x {spec.n_layer}, {spec.parallel_num} tokens per step, "
          f"{spec.num_blocks} AR steps, {spec.image_size}px; ready in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    runners = make_runners(names, model, authors, labels, guidance, args.seed, device, dtype,
                           args.export_dir)
    rows = {n: {"runner": n, "batch": args.batch, "seconds": [], "same_every_run": True}
            for n in names}
    result = {"preset": label, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
              "architecture": spec.architecture(), "batch": args.batch, "steps": steps,
              "guidance": guidance, "seed": args.seed, "weights_seed": args.weights_seed,
              "device": str(device), "dtype": dtypes.LONG[dtype], "rows": rows,
              "complete": False}
    out["results"].append(result)
    for _ in range(args.warmup):
        for name, run in runners.items():
            _, sec = timed(run, min(steps, args.warmup_steps), device)
            print(f"  {name} warmup ({min(steps, args.warmup_steps)} head steps): {sec:.2f} s",
                  flush=True)
    first = {}
    for rep in range(args.repeats):
        for name, run in runners.items():
            images, sec = timed(run, steps, device)
            row = rows[name]
            row["seconds"].append(sec)
            if rep == 0:
                first[name] = images
            else:
                row["same_every_run"] &= torch.equal(images, first[name])
            if rep == 0 and len(first) == len(runners):  # the first round's images compared
                for n in names:  # ours against the authors', torch against the reference
                    for base in ("authors", "reference"):
                        if base in first and n not in (base, "authors"):
                            rows[n][f"identical_to_{base}"] = identical(first[n], first[base])
            summarize(rows)
            print(f"  {name} run {rep + 1}/{args.repeats}: {sec:.3f} s "
                  f"({args.batch / sec:.3f} img/s)", flush=True)
            write_json(args.json, out)
    exact = device.type == "cpu" and dtype == torch.float32
    result["exact_expected"] = exact
    # the PyTorch runners are held to bit-for-bit equality; ONNX Runtime's own kernels to its
    # parity: >= 99.9% of the uint8 values identical (as `bitdance-export check` requires)
    result["exact"] = all(r.get(f"identical_to_{b}") is None
                          or r[f"identical_to_{b}"]["images"] == r[f"identical_to_{b}"]["of"]
                          for r in rows.values() if r["runner"] not in GRAPH_RUNNERS
                          for b in ("authors", "reference"))
    result["parity"] = all(r.get(f"identical_to_{b}") is None
                           or r[f"identical_to_{b}"]["values"] >= ORT_PARITY
                           for r in rows.values() if r["runner"] in GRAPH_RUNNERS
                           for b in ("authors", "reference"))
    result["complete"] = True
    print_table(result)
    if exact:
        print("bit for bit (CPU, float32; PyTorch runners): "
              + ("every image identical" if result["exact"] else "NOT IDENTICAL"))
        for name in (n for n in GRAPH_RUNNERS if n in rows):
            print(f"{name}: >= {100 * ORT_PARITY:g}% of uint8 values identical: "
                  + ("yes" if result["parity"] else "NO"))
    write_json(args.json, out)
    del runners, model, authors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help="random weights: tiny, tiny-4x, tiny-16x or presets of "
                     f"bitdance_rt/imagenet/spec.py ({', '.join(PRESETS)}); comma-separated "
                     "for several (default: tiny)")
    src.add_argument("--checkpoint", type=Path, default=None,
                     help="a converted directory (the authors read the .pt files in DIR/pt)")
    ap.add_argument("--authors", type=Path, default=None,
                    help="the authors' imagenet_gen directory (holding src/): adds their runner")
    ap.add_argument("--runners", default=None,
                    help="comma-separated: authors, reference, torch, onnxruntime, tensorrt "
                    "(default: "
                    "authors when --authors is given, reference, torch)")
    ap.add_argument("--export-dir", type=Path, default=None,
                    help="for the onnxruntime and tensorrt runners: `bitdance-export "
                    "--checkpoint DIR --out EXPORT` of the --checkpoint (tensorrt: with "
                    "--engines, on a GPU)")
    ap.add_argument("--batch", type=int, default=16, help="images per run")
    ap.add_argument("--steps", type=int, default=None, help="head steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--weights-seed", type=int, default=0, help="random weights' seed")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per runner, alternating")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per runner first")
    ap.add_argument("--warmup-steps", type=int, default=1, help="head steps of a warmup run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None,
                    help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.runners is None:
        args.runners = (["authors"] if args.authors else []) + ["reference", "torch"]
    else:
        args.runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    bad = [r for r in args.runners if r not in ("authors", *OURS)]
    if bad or not args.runners or len(set(args.runners)) != len(args.runners):
        ap.error(f"--runners takes distinct names of authors, {', '.join(OURS)}; "
                 f"got {','.join(args.runners)}")
    graph = [r for r in args.runners if r in GRAPH_RUNNERS]
    if graph and (args.export_dir is None or args.checkpoint is None):
        ap.error(f"the {graph[0]} runner needs --checkpoint DIR and --export-dir EXPORT (its "
                 "export: bitdance-export --checkpoint DIR --out EXPORT; tensorrt: with "
                 "--engines)")
    if "authors" in args.runners and args.authors is None:
        ap.error("the authors runner needs --authors PATH (the directory holding their src/)")
    if args.authors is not None:
        args.authors = args.authors.resolve()
    args.presets = [] if args.checkpoint else (args.preset or "tiny").split(",")
    unknown = [p for p in args.presets if p not in TINY and p not in PRESETS]
    if unknown:
        ap.error(f"unknown preset {unknown[0]!r}; choose from {', '.join([*TINY, *PRESETS])}")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.warmup_steps < 1:
        ap.error("--batch, --repeats and --warmup-steps must be >= 1, --warmup >= 0")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = dtypes.parse(dtype_name)
    if dtype not in (torch.float32, torch.bfloat16):
        raise SystemExit("error: --dtype must be float32 or bfloat16")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out = {"config": {"presets": args.presets,
                      "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                      "authors": str(args.authors) if args.authors else None,
                      "runners": args.runners, "batch": args.batch, "steps": args.steps,
                      "guidance": args.guidance, "seed": args.seed,
                      "weights_seed": args.weights_seed, "repeats": args.repeats,
                      "warmup": args.warmup, "warmup_steps": args.warmup_steps,
                      "device": str(device), "dtype": dtypes.LONG[dtype]},
           "machine": machine_info(device), "results": [], "complete": False}
    print(f"{', '.join(args.runners)} on {device} {dtypes.LONG[dtype]}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="bitdance-throughput-") as tmp:
        for label in args.presets or [Path(args.checkpoint).name]:
            result = run_preset(args, label, device, dtype, out, Path(tmp))
            ok &= (result["exact"] and result["parity"]) or not result["exact_expected"]
    out["complete"] = True
    write_json(args.json, out)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
