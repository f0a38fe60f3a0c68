#!/usr/bin/env python
"""Prompt adherence of the demo model on the fixed held-out shapes prompts (a GenEval in
miniature): generate one image per held-out prompt, score it with the model-free detector
(:mod:`bitdance_rt.demo.detect`), and report the fraction of caption attributes shown, overall
and per attribute kind (colour, shape, position, background), for each guidance scale.

    python bench/adherence.py                               # built-in demo weights, defaults
    python bench/adherence.py --guidance default,1.0 --n 120 --backend torch --json adh.json
    python bench/adherence.py --checkpoint DIR --steps 25 --save-images out/ --threads 2

Each prompt k is generated with seed ``--seed + k``; the same run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bitdance_rt.demo import WEIGHTS_DIR, detect, shapes  # noqa: E402

def read_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / "bitdance_rt.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def open_session(ckpt: Path, backend: str = "torch", engine_dir: Path | None = None):
    from bitdance_rt.runtime.session import Session

    return Session.open(ckpt, backend=backend, device="cpu", engine_dir=engine_dir)


def generate_images(session, prompts: list[str], seeds: list[int], height: int | None = None,
                    width: int | None = None, steps: int | None = None,
                    guidance: float | None = None, batch: int = 1) -> list[np.ndarray]:
    """One uint8 ``[H, W, 3]`` image per prompt (``None`` settings: the model's defaults).
    ``batch`` prompts share one AR run; each still draws from its own seed."""
    from bitdance_rt.request import GenerationRequest

    out = []
    for i in range(0, len(prompts), batch):
        reqs = [GenerationRequest(prompt=p, height=height, width=width, steps=steps,
                                  guidance=guidance, seed=s)
                for p, s in zip(prompts[i:i + batch], seeds[i:i + batch])]
        out += [imgs[0].numpy() for imgs in session.generate(*reqs)]
    return out


def run(session, n: int, guidances: list[float], steps: int, seed: int, batch: int = 1,
        save_images: Path | None = None, log=print) -> dict:
    prompts = [caption for _idx, caption, _attrs in shapes.heldout(n)]
    seeds = [seed + k for k in range(len(prompts))]
    results = {}
    for g in guidances:
        t0 = time.perf_counter()
        images = generate_images(session, prompts, seeds, steps=steps, guidance=g, batch=batch)
        secs = time.perf_counter() - t0
        if save_images is not None:
            from PIL import Image

            save_images.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(images):
                Image.fromarray(img).save(save_images / f"g{g:g}_{k:03d}.png")
        res = detect.score(images, prompts)
        res["seconds_per_image"] = secs / len(prompts)
        res["guidance"] = g
        res["prompts"] = prompts
        results[f"{g:g}"] = res
        log(f"guidance {g:g}: {detect.format_score(res)} ({secs / len(prompts):.2f} s/image)")
    return results


def table(results: dict, steps: int, backend: str) -> str:
    kinds = detect.KINDS
    head = ("| guidance | overall | " + " | ".join(kinds) + " | all right | s/image |\n"
            "|---|---|" + "---|" * len(kinds) + "---|---|")
    rows = []
    for g, r in results.items():
        rows.append(f"| {g} | {r['overall']:.3f} | "
                    + " | ".join(f"{r['by_kind'][k]:.3f}" for k in kinds)
                    + f" | {r['all_right']:.3f} | {r['seconds_per_image']:.2f} |")
    n = next(iter(results.values()))["images"] if results else 0
    return (f"{n} held-out prompts, {steps} steps, backend {backend}\n\n" + head + "\n"
            + "\n".join(rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--n", type=int, default=120, help="held-out prompts (at least 100)")
    ap.add_argument("--guidance", default="default,1.0",
                    help="comma-separated scales; 'default' = the model's own")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's own")
    ap.add_argument("--backend", choices=("reference", "torch", "onnxruntime"), default="torch")
    ap.add_argument("--engine-dir", type=Path, default=None,
                    help="for --backend onnxruntime: a directory written by bitdance-export")
    ap.add_argument("--batch", type=int, default=1, help="prompts per AR run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-images", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    session = open_session(args.checkpoint, args.backend, args.engine_dir)
    d = session.spec.info.defaults
    steps = args.steps or d.steps
    guidances = [float(d.guidance) if g.strip() == "default" else float(g)
                 for g in args.guidance.split(",")]
    name = session.spec.info.name or session.spec.name
    print(f"checkpoint {args.checkpoint} ({name}), {d.height}x{d.width}, steps {steps}, "
          f"backend {args.backend}", flush=True)
    results = run(session, args.n, guidances, steps, args.seed, args.batch, args.save_images)
    print()
    print(table(results, steps, args.backend))
    if args.json:
        slim = {g: {k: v for k, v in r.items() if k != "details"} for g, r in results.items()}
        for g, r in results.items():
            slim[g]["per_image_ok"] = [all(a["ok"] for a in det) for det in r["details"]]
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "steps": steps,
                                         "height": d.height, "width": d.width,
                                         "backend": args.backend, "seed": args.seed,
                                         "results": slim}, indent=2))


if __name__ == "__main__":
    main()
