"""The quantization gate of the ImageNet family: teacher-forced token agreement.

A model with random weights (every checkpoint here; the released ones cannot be downloaded)
reacts to any perturbation chaotically: a free-running sample drifts away from the float32
one after a few AR steps whatever changed, so image PSNR says nothing about a recipe. Teacher
forcing does: the candidate model runs the float32 model's AR loop with the float32 tokens fed
back at every step (:func:`~bitdance_rt.imagenet.sample.generate_tokens` with ``forced``) and
the same noise, so each step's prediction starts from the same context; the fraction of its
sampled bits equal to the float32 model's is the agreement. The float32 model computed in
bfloat16 is the floor that costs nothing: a recipe passes when its agreement is within its
weight format's margin (:data:`MARGINS`) of that floor.

The margins: INT8 with per-channel scales rounds weights more finely than bfloat16 does (its
agreement is at or above the floor); E4M3 keeps 3 mantissa bits to bfloat16's 7, and on the
random-weight tiny models its agreement is 5 to 10 points below the floor (P = 1, 4, 16: 92.4,
81.1, 76.9% against 97.6, 91.3, 86.5%; 16 labels, 8 steps). A scale 10% off in every
transformer layer, the smallest error the gate is meant to catch, gives 74, 68 and 67%: below
both margins (tests/test_imagenet_quant.py checks that the gate fails it).

    python -m bitdance_rt.imagenet.quality --checkpoint DIR [--labels 16] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from . import checkpoint, sample

# how far a recipe's agreement may lie below the bfloat16 floor, per weight format
MARGINS = {"int8": 0.05, "fp8": 0.15}
RECIPES = ("fp8-weight", "int8-weight")


@dataclass
class Row:
    name: str
    agreement: float    # teacher-forced, fraction of bits equal to the float32 model's
    seconds: float


def forced_agreement(reference: tuple, model, labels, steps: int, guidance: float,
                     seed: int) -> float:
    """``reference``: (tokens, fed tokens) of the float32 run."""
    tokens, fed = reference
    got = sample.generate_tokens(model, labels, steps, guidance, seed, forced=fed)
    return (got == tokens).float().mean().item()


def evaluate(ckpt, labels, steps: int, guidance: float, seed: int = 0,
             recipes=RECIPES) -> list[Row]:
    """The float32 model's tokens, then the teacher-forced agreement of: the float32 model
    itself (1.0: the check of the method), the model in bfloat16 (the floor), and each recipe
    applied to the float32 weights (in memory, the arithmetic of ``bitdance-export
    quantize``)."""
    from ..calibration.quantize import quantize_model

    ref = checkpoint.load(ckpt)
    fed = []
    tokens = sample.generate_tokens(ref, labels, steps, guidance, seed, fed=fed)
    reference = (tokens, torch.cat(fed, dim=1))
    candidates = [("float32", lambda: ref),
                  ("bfloat16", lambda: checkpoint.load(ckpt, dtype=torch.bfloat16))]
    candidates += [(r, lambda r=r: quantize_model(checkpoint.load(ckpt), r)) for r in recipes]
    rows = []
    for name, make in candidates:
        t0 = time.perf_counter()
        rows.append(Row(name, forced_agreement(reference, make(), labels, steps, guidance, seed),
                        time.perf_counter() - t0))
    return rows


def verdicts(rows: list[Row]) -> dict:
    """recipe -> passes the gate (agreement >= bfloat16's - its format's margin)."""
    from ..calibration.recipes import get_recipe

    floor = next(r.agreement for r in rows if r.name == "bfloat16")
    return {r.name: r.agreement >= floor - MARGINS[get_recipe(r.name).fmt] for r in rows
            if r.name not in ("float32", "bfloat16")}


def table(rows: list[Row]) -> str:
    ok = verdicts(rows)
    out = ["| model | teacher-forced bit agreement with float32 | gate | s |", "|---|---|---|---|"]
    for r in rows:
        gate = "" if r.name not in ok else ("pass" if ok[r.name] else "FAIL")
        out.append(f"| {r.name} | {100 * r.agreement:.2f}% | {gate} | {r.seconds:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a converted ImageNet directory")
    ap.add_argument("--labels", type=int, default=16, help="images (labels 0, 1, ...)")
    ap.add_argument("--steps", type=int, default=8, help="head sampling steps")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = checkpoint.load(args.checkpoint, weights=False)
    guidance = args.guidance if args.guidance is not None else info.defaults["guidance"]
    labels = [i % info.spec.num_classes for i in range(args.labels)]
    rows = evaluate(args.checkpoint, labels, args.steps, guidance, args.seed)
    print(table(rows))
    ok = verdicts(rows)
    print(f"gate: within {MARGINS} of the bfloat16 floor: "
          + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in ok.items()))
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
