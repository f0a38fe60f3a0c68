"""Per-stage latency of the AR loop, side by side across backends, in one run.

    python bench/latency.py --preset mid --weights random --backends reference,torch \
        --height 512 --width 512 --steps 10 --guidance 7.5 --repeats 2 --json out.json

Prints, per stage, seconds, calls and weight bytes read for each backend and the ratio to the
first backend (the baseline), plus the growth of the LLM block step from the first block to the
last, measured twice: within the timed runs, and by replaying the first and the last block step
in alternation (`--replay`, backends with a static KV cache), which cancels machine drift. Random
weights (`--weights random`) let any preset be timed without its checkpoint; the prompt is then
a fixed synthetic token sequence (about as long as a real prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitdance_rt  # noqa: E402,F401  (before torch: sets the CPU thread and MKL policies)
import torch  # noqa: E402

from bitdance_rt import dtypes  # noqa: E402
from bitdance_rt.checkpoint import load_checkpoint  # noqa: E402
from bitdance_rt.request import GenerationRequest, ImagePlan, plan_for  # noqa: E402
from bitdance_rt.runtime import StageTimer, generate  # noqa: E402
from bitdance_rt.runtime.session import make_backend  # noqa: E402
from bitdance_rt.runtime.timing import STAGES  # noqa: E402
from bitdance_rt.spec import check_size, preset  # noqa: E402
from bitdance_rt.tiny import random_model  # noqa: E402

PROMPT = "A lighthouse on a rocky coast at dusk, waves crashing, warm light in the windows"


def synthetic_plan(spec, h, w, images, steps, guidance) -> ImagePlan:
    """Token ids for a model without a tokenizer: a 32-token prompt, a 5-token unconditional
    prompt, and P + 2 image tokens (any valid ids: the weights are random anyway)."""
    vocab, p = spec.llm.vocab_size, spec.parallel_num
    image = tuple((7919 * i + 13) % vocab for i in range(p + 2))
    cond = tuple((104729 * i + 1) % vocab for i in range(32)) + image
    uncond = tuple((15485863 * i + 5) % vocab for i in range(5)) + image
    return ImagePlan(h=h, w=w, cond_ids=(cond,) * images,
                     uncond_ids=uncond if guidance > 1.0 else None, steps=steps,
                     guidance=guidance)


def make_runner(name, model, args):
    engine_dir = args.engine_dir if name in ("onnxruntime", "tensorrt") else None
    be = make_backend(name, model, engine_dir, args.cuda_graphs, args.compile)
    run = lambda plan, timer: generate(be, plan, args.seed, timer)  # noqa: E731
    run.backend = be
    return run


def block_growth(timers: list[StageTimer]) -> dict:
    """Per block, the fastest of the timed runs; then the medians of the first and the last
    eighth of the blocks."""
    calls = [min(ts) for ts in zip(*(t.stats["block_step"].per_call for t in timers))]
    k = max(1, min(8, len(calls) // 8))
    first, last = statistics.median(calls[:k]), statistics.median(calls[-k:])
    return {"block_step_first_s": first, "block_step_last_s": last, "growth": last / first}


def replay_block_growth(be, plan: ImagePlan, reps: int) -> dict | None:
    """The block step at the first and at the last cache length, timed in alternation.

    A run's first and last blocks are seconds apart, and on a shared machine the clock speed and
    the neighbours change in between; alternating the two cache lengths (rewinding the static
    cache's lengths between calls: the step rewrites the same slots) cancels that drift and
    leaves what the longer cache costs. Needs a backend with a static KV cache."""
    cache = getattr(be, "cache", None)
    if not hasattr(cache, "set_lens"):
        return None
    num_blocks = plan.h * plan.w // be.parallel_num
    if num_blocks < 3:
        return None
    gen = torch.Generator(be.device).manual_seed(1)
    tokens = torch.randint(0, 2, (plan.images, be.parallel_num, be.ch_target), generator=gen,
                           device=be.device).float() * 2 - 1
    sync = torch.cuda.synchronize if torch.device(be.device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        be.begin(plan)
        be.prefill()
        first = list(cache.lens_host)
        for k in range(num_blocks - 2):  # fill the cache up to the last block step
            be.block_step(tokens, k)
        last = list(cache.lens_host)
        times = {"first": [], "last": []}
        for _ in range(reps):
            for which, lens, block in (("first", first, 0), ("last", last, num_blocks - 2)):
                cache.set_lens(lens)
                sync()
                t0 = time.perf_counter()
                be.block_step(tokens, block)
                sync()
                times[which].append(time.perf_counter() - t0)
    a, b = statistics.median(times["first"]), statistics.median(times["last"])
    return {"replay_first_s": a, "replay_last_s": b, "replay_growth": b / a, "replay_reps": reps,
            "replay_cache_lens": [first, last]}


def copy_bandwidth(device, nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3)


def weight_floor(model, plan: ImagePlan, bandwidth: float) -> dict:
    """The weight-read floor: every weight read once per call at the copy bandwidth, for one
    batched LLM call per block (layers only), the whole head per evaluation and the decoder."""
    from bitdance_rt.runtime.timing import module_bytes

    blocks = plan.h * plan.w // model.spec.parallel_num
    llm = module_bytes(model.llm.model.layers) * blocks
    head = module_bytes(model.head) * blocks * (plan.steps + 1)
    decoder = module_bytes(model.ae.decoder)
    return {"bandwidth_Bps": bandwidth, "llm_s": llm / bandwidth, "head_s": head / bandwidth,
            "decoder_s": decoder / bandwidth, "total_s": (llm + head + decoder) / bandwidth}


def machine_info(device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="mid", help="tiny, mid, 14b-64x, 14b-16x")
    ap.add_argument("--weights", default="random", help="'random' or a checkpoint directory")
    ap.add_argument("--backends", default="reference,torch",
                    help="comma-separated: reference, torch, onnxruntime, tensorrt")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per backend first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--recipe", default=None,
                    help="quantize the model first (fp8-weight, fp8, int8-weight, int8-sq; "
                    "random weights get placeholder activation scales: for timing only)")
    ap.add_argument("--export-dir", "--engine-dir", dest="engine_dir", default=None,
                    help="onnxruntime and tensorrt: an export directory (bitdance-export; with "
                    "the engines of `bitdance-export build` in its engines/ for tensorrt)")
    ap.add_argument("--replay", type=int, default=20,
                    help="alternating first/last block-step pairs for the growth check (0: off)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = dtypes.parse(dtype_name)
    t0 = time.perf_counter()
    if args.weights == "random":
        h, w = check_size(args.height, args.width)  # a checkpoint checks its own sizes
        model = random_model(preset(args.preset), dtype=dtype, device=args.device, seed=args.seed)
        if args.recipe:
            from bitdance_rt.calibration.quantize import quantize_model

            quantize_model(model, args.recipe, placeholder_stats=True)
        plan = synthetic_plan(model.spec, h, w, args.num_images, args.steps, args.guidance)
    else:
        model = load_checkpoint(args.weights, dtype=dtype, device=args.device)
        plan = plan_for(model, GenerationRequest(PROMPT, args.height, args.width, args.steps,
                                                 args.guidance, args.seed, args.num_images))
    print(f"model {model.spec.name} ({args.weights}) on {args.device} {dtype_name}, "
          f"ready in {time.perf_counter() - t0:.1f}s; {args.height}x{args.width}, N={args.steps}, "
          f"g={args.guidance}, B={args.num_images}", flush=True)

    results = {}
    for name in args.backends.split(","):
        if args.recipe:
            from bitdance_rt.models.quant import QuantLinear

            QuantLinear.reset_fp8_paths()
        run = make_runner(name, model, args)
        for _ in range(args.warmup):
            run(plan, StageTimer(args.device, enabled=False))
        timers = []
        for _ in range(args.repeats):
            timers.append(StageTimer(args.device))
            run(plan, timers[-1])
        best = min(timers, key=lambda t: t.total)
        results[name] = {**best.as_dict(), **block_growth(timers)}
        if args.recipe:  # which path the E4M3 layers took (before the replay's calls)
            results[name]["fp8_path"] = QuantLinear.fp8_path_record()
        be = getattr(run, "backend", None)
        if args.replay and be is not None:
            results[name].update(replay_block_growth(be, plan, args.replay) or {})
        print(f"{name}: {best.total:.3f}s", flush=True)

    names = list(results)
    base = names[0]
    print()
    header = f"{'stage':<12}" + "".join(f"{n + ' s':>14}{'calls':>7}{'GB':>8}" for n in names)
    header += "".join(f"{base + '/' + n:>20}" for n in names[1:])
    print(header)
    for stage in list(STAGES) + ["total"]:
        row = f"{stage:<12}"
        vals = []
        for n in names:
            r = results[n]
            sec = r["total_s"] if stage == "total" else r["stages"].get(stage, 0.0)
            calls = "" if stage == "total" else r["calls"].get(stage, 0)
            gb = "" if stage == "total" else f"{r['weight_bytes'].get(stage, 0) / 1e9:.2f}"
            row += f"{sec:>14.3f}{calls:>7}{gb:>8}"
            vals.append(sec)
        row += "".join(f"{vals[0] / v if v else float('nan'):>19.2f}x" for v in vals[1:])
        print(row)
    print()
    for n in names:
        r = results[n]
        print(f"{n}: LLM block step first {r['block_step_first_s'] * 1e3:.2f} ms, last "
              f"{r['block_step_last_s'] * 1e3:.2f} ms (x{r['growth']:.2f}; per block the fastest of "
              f"{args.repeats} runs, medians of the first and last eighth)")
        if "replay_growth" in r:
            print(f"{n}: LLM block step replayed in alternation ({r['replay_reps']} pairs): first "
                  f"{r['replay_first_s'] * 1e3:.2f} ms, last {r['replay_last_s'] * 1e3:.2f} ms "
                  f"(x{r['replay_growth']:.2f})")
    for n in names:
        if "fp8_path" in results[n]:
            fp = results[n]["fp8_path"]
            print(f"{n}: E4M3 layers ran {fp['path']} (Python-side forward calls: torch._scaled_mm "
                  f"{fp['scaled_mm']}, dequantize fallback {fp['dequantize']}; CUDA-graph "
                  "replays not counted)")
    floor = None
    if torch.device(args.device).type == "cuda":
        floor = weight_floor(model, plan, copy_bandwidth(args.device))
        print(f"floor (weights read once per call at the measured copy rate of "
              f"{floor['bandwidth_Bps'] / 1e12:.2f} TB/s): {floor['total_s']:.3f} s (LLM "
              f"{floor['llm_s']:.3f}, head {floor['head_s']:.3f}, decoder {floor['decoder_s']:.3f})")
        for n in names:
            print(f"{n}: {results[n]['total_s'] / floor['total_s']:.2f}x the floor")
    out = {"results": results,
           "config": {"preset": args.preset, "weights": args.weights, "height": args.height,
                      "width": args.width, "steps": args.steps, "guidance": args.guidance,
                      "num_images": args.num_images, "repeats": args.repeats,
                      "dtype": dtype_name, "cuda_graphs": args.cuda_graphs,
                      "compile": args.compile, "recipe": args.recipe, "model": model.spec.name},
           "machine": {**machine_info(args.device),
                       **({"weight_floor": floor} if floor else {})}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
