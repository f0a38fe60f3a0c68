"""How much a recipe changes a model's output (the measurements behind the recipes' tables).

- :func:`layer_sqnr`: per Linear layer, the signal-to-quantization-noise ratio of its output,
  ``10 log10(sum y^2 / sum (y - y_q)^2)``, on inputs captured from a real generation (the
  float model's), for every layer, including those the recipes keep in high precision (what
  quantizing them would cost).
- :func:`compare_run`: end to end, the tokens and the decoded image of a quantized checkpoint
  against the float one for the same prompt and seed: token agreement when each model runs
  free (an AR model drifts once a token differs), token agreement with teacher forcing (each
  block conditioned on the float model's tokens: the error of one block, without drift) and
  the PSNR of the decoded image.

``python -m bitdance_rt.calibration.evaluate --checkpoint DIR --calibration FILE --work DIR``
quantizes the checkpoint with every recipe and prints both tables (Markdown).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.quant import QuantLinear
from .recipes import HEAD, LLM, PROJECTOR, RECIPES, choose, get_recipe


# ----------------------------------------------------------------------------------------------
# Running a model: tokens and image


class _Forced:
    """A backend whose block steps take given tokens instead of the sampled ones (teacher
    forcing); everything else is the wrapped backend's."""

    def __init__(self, backend, tokens: torch.Tensor):
        self._backend, self._tokens = backend, tokens

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def block_step(self, tokens, block):
        p = self._backend.parallel_num
        return self._backend.block_step(self._tokens[:, block * p:(block + 1) * p], block)


def run_tokens(model, request, forced: torch.Tensor | None = None):
    """Tokens ``[B, hw, 32]`` and uint8 images of ``request`` through the PyTorch backend (the
    runtime's own loop); with ``forced``, block k + 1 is conditioned on ``forced``'s block k."""
    from ..request import plan_for
    from ..runtime.backends.torch_backend import TorchBackend
    from ..runtime.loop import generate_tokens, noise_source

    backend = TorchBackend(model, cuda_graphs=False)
    plan = plan_for(model, request)
    noise = noise_source(request.seed, backend.device)
    tokens = generate_tokens(backend if forced is None else _Forced(backend, forced), plan, None,
                             noise=noise)
    dec_noise = (noise.decoder(plan.images, backend.ch_target, plan.h, plan.w, backend.device)
                 if backend.gan_decoder else None)
    return tokens, backend.decode(tokens, dec_noise)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@dataclass
class RunComparison:
    name: str
    agreement: float         # free-running token agreement with the reference
    forced_agreement: float  # teacher-forced
    psnr: float
    seconds: float


def compare_run(name: str, model, reference: tuple, request) -> RunComparison:
    """``model`` against ``reference`` = (tokens, images) of the float model."""
    t0 = time.perf_counter()
    tokens, images = run_tokens(model, request)
    forced, _ = run_tokens(model, request, forced=reference[0])
    return RunComparison(name, (tokens == reference[0]).float().mean().item(),
                         (forced == reference[0]).float().mean().item(),
                         psnr(images, reference[1]), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Per-layer SQNR


def _linears(model) -> dict:
    """(component, name) -> Linear of every float Linear layer (LLM, head, projector)."""
    out = {}
    for comp, module in ((LLM, model.llm), (HEAD, model.head), (PROJECTOR, model.projector)):
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                out[(comp, name)] = m
    return out


def capture_inputs(model, request, rows_per_call: int = 8, max_rows: int = 1024,
                   seed: int = 0) -> dict:
    """Inputs of every Linear layer during one generation: ``rows_per_call`` random rows of
    each call, at most ``max_rows`` per layer (random subset), float32 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    seen: dict = {}
    handles = []
    for key, m in _linears(model).items():
        def hook(module, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            pick = torch.randperm(x.shape[0], generator=gen)[:rows_per_call]
            seen.setdefault(key, []).append(x[pick.to(x.device)].float().cpu())
        handles.append(m.register_forward_pre_hook(hook))
    try:
        run_tokens(model, request)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, parts in seen.items():
        x = torch.cat(parts)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
        out[key] = x
    return out


def sqnr(y: torch.Tensor, y_q: torch.Tensor) -> float:
    noise = ((y.double() - y_q.double()) ** 2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10((y.double() ** 2).sum().item() / noise)


def quantized_copy(linear: nn.Linear, recipe, stats) -> QuantLinear:
    """``linear`` as a QuantLinear under ``recipe`` (the same math as ``quantize``)."""
    from .quantize import quantize_linear

    q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                    recipe.fmt, recipe.activation, recipe.smooth)
    state = quantize_linear(linear.weight.detach(), recipe, stats)
    if linear.bias is not None:
        state["bias"] = linear.bias.detach().float()
    q.load_state_dict({k: (v if v.dtype in (torch.int8, torch.float8_e4m3fn) else v.float())
                       for k, v in state.items()}, assign=True)
    return q.eval()


@dataclass
class LayerRow:
    component: str
    name: str
    quantized: bool     # by the recipes (False: kept in high precision)
    params: int
    sqnr: dict          # recipe -> dB


def layer_sqnr(model, inputs: dict, calibration, recipes=tuple(RECIPES)) -> list[LayerRow]:
    """SQNR of every Linear layer's output under each recipe, on captured ``inputs``. The
    statistics of a static or smoothed recipe come from ``calibration``; layers it has none
    for (the projector) use the captured inputs' own maxima."""
    rows = []
    for (comp, name), lin in _linears(model).items():
        x = inputs.get((comp, name))
        if x is None:
            continue
        with torch.no_grad():
            y = nn.functional.linear(x, lin.weight.float(), None if lin.bias is None
                                     else lin.bias.float())
            key = f"{comp}/{name}"
            if calibration is not None and key in calibration.amax:
                stats = calibration.layer(comp, name)
            else:
                stats = (x.abs().max(), x.abs().amax(dim=0))
            values = {}
            for r in recipes:
                values[r] = sqnr(y, quantized_copy(lin, get_recipe(r), stats)(x))
        quantized = comp != PROJECTOR and choose(comp, name).quantized
        rows.append(LayerRow(comp, name, quantized, lin.weight.numel(), values))
    return rows


# ----------------------------------------------------------------------------------------------
# Tables


def _kind(name: str) -> str:
    """A layer's kind without its index: ``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    for prefix in (["model", "layers"], ["net", "res_blocks"], ["net"]):
        if parts[:len(prefix)] == prefix:
            parts = parts[len(prefix):]
            break
    return ".".join(parts)


def sqnr_summary(rows: list[LayerRow], recipes=tuple(RECIPES)) -> str:
    """Per component and layer kind: the lowest SQNR over its layers, per recipe (dB)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.component, _kind(r.name), r.quantized), []).append(r)
    head = ("| component | layers | n | quantized | "
            + " | ".join(f"{r} (min dB)" for r in recipes) + " |")
    out = [head, "|" + "---|" * (4 + len(recipes))]
    for (comp, kind, q), rs in groups.items():
        cells = [f"{min(x.sqnr[r] for x in rs):.1f}" for r in recipes]
        out.append(f"| {comp} | {kind} | {len(rs)} | {'yes' if q else 'no'} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def sqnr_table(rows: list[LayerRow], recipes=tuple(RECIPES)) -> str:
    out = ["| component | layer | params | quantized | " + " | ".join(recipes) + " |",
           "|" + "---|" * (4 + len(recipes))]
    for r in rows:
        out.append(f"| {r.component} | {r.name} | {r.params} | {'yes' if r.quantized else 'no'}"
                   " | " + " | ".join(f"{r.sqnr[x]:.1f}" for x in recipes) + " |")
    return "\n".join(out)


def runs_table(runs: list[RunComparison]) -> str:
    out = ["| model | token agreement (free) | token agreement (teacher-forced) | PSNR dB | s |",
           "|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r.name} | {100 * r.agreement:.2f}% | {100 * r.forced_agreement:.2f}% | "
                   f"{r.psnr:.2f} | {r.seconds:.0f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    from ..checkpoint import load_checkpoint
    from ..request import GenerationRequest
    from .quantize import quantize_checkpoint
    from .stats import Calibration

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--calibration", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path, help="where the quantized checkpoints go")
    ap.add_argument("--prompt", default="a lighthouse on a rocky coast at sunset")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--bf16", action="store_true", help="also run the float checkpoint in "
                    "bfloat16 (the noise floor of a lower-precision run; slow on a CPU)")
    ap.add_argument("--layers", type=Path, help="write the full per-layer table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [r for r in args.recipes.split(",") if r]
    for r in recipes:
        get_recipe(r)
    req = GenerationRequest(args.prompt, height=args.height, width=args.width, steps=args.steps,
                            seed=args.seed)
    calib = Calibration.load(args.calibration)
    model = load_checkpoint(args.checkpoint)
    req = req.resolved(model.spec)
    t0 = time.perf_counter()
    reference = run_tokens(model, req)
    print(f"float32 reference: {time.perf_counter() - t0:.0f}s", flush=True)
    inputs = capture_inputs(model, req)
    rows = layer_sqnr(model, inputs, calib, recipes)
    del inputs
    runs = []
    if args.bf16:
        runs.append(compare_run("float checkpoint, bfloat16", load_checkpoint(
            args.checkpoint, dtype=torch.bfloat16), reference, req))
    for r in recipes:
        out = args.work / f"{args.checkpoint.name}-{r}"
        quantize_checkpoint(args.checkpoint, r, out, calib if get_recipe(r).needs_calibration
                            else None)
        qmodel = load_checkpoint(out)
        runs.append(compare_run(r, qmodel, reference, req))
        print(runs_table(runs[-1:]).splitlines()[-1], flush=True)
        if get_recipe(r).fmt == "fp8" and get_recipe(r).activation is None:
            QuantLinear.emulate_fp8_gemm = True  # the FP8 GPU path: per-token E4M3 activations
            try:
                runs.append(compare_run(f"{r} (FP8 GPU path, emulated)", qmodel, reference, req))
            finally:
                QuantLinear.emulate_fp8_gemm = False
            print(runs_table(runs[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.checkpoint} ({model.spec.name}), prompt {args.prompt!r}, seed {req.seed}, "
          f"{req.height}x{req.width}, N = {req.steps}, guidance {req.guidance}\n")
    print(runs_table(runs))
    print()
    print(sqnr_summary(rows, recipes))
    if args.layers:
        args.layers.write_text(sqnr_table(rows, recipes) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
