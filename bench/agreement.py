"""How often the torch backend picks the same tokens and pixels as the eager reference.

    python bench/agreement.py --json agreement.json            # CUDA: fp32 and bf16
    python bench/agreement.py --device cpu --dtypes float32    # CPU (expect 100%)

On make-tiny checkpoints (P = 4, 16, 64, with guidance) both pipelines run from the same seed;
the table gives the fraction of identical tokens (all 32 bits of a token equal) and of identical
pixels. On the CPU in float32 the two are the same computation and agree exactly; on a GPU the
torch backend uses its own attention kernel and CUDA graphs, so low-precision rounding can flip
a token's sign bit, and the autoregression carries such a flip into the blocks after it.

Each pipeline runs once per configuration (its tokens, then their decoded image: what
``generate`` returns for the seed), and ``--json`` is rewritten after every configuration
(``"complete": false`` until the last), so a run stopped by a time limit keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitdance_rt  # noqa: E402,F401  (before torch: sets the CPU thread and MKL policies)
import torch  # noqa: E402

from bitdance_rt import dtypes  # noqa: E402
from bitdance_rt.checkpoint import load_checkpoint  # noqa: E402
from bitdance_rt.request import GenerationRequest, plan_for  # noqa: E402
from bitdance_rt.files import atomic_path  # noqa: E402
from bitdance_rt.runtime import generate_tokens  # noqa: E402
from bitdance_rt.runtime.loop import noise_source  # noqa: E402
from bitdance_rt.runtime.backends.reference import ReferenceBackend  # noqa: E402
from bitdance_rt.runtime.backends.torch_backend import TorchBackend  # noqa: E402
from bitdance_rt.tiny import make_tiny  # noqa: E402

CASES = [(4, 512, 512), (16, 256, 1024), (64, 512, 512)]  # (P, height, width)


def tokens_and_image(backend, plan, seed):
    """One AR run: its tokens ``[B, h*w, 32]`` and their image, the image ``generate`` gives
    for ``seed`` (a gan-decoder's noise drawn after the AR steps, from the same source)."""
    noise = noise_source(seed, backend.device)
    tokens = generate_tokens(backend, plan, None, noise=noise)
    decoder_noise = None
    if backend.gan_decoder:
        decoder_noise = noise.decoder(plan.images, backend.ch_target, plan.h, plan.w,
                                      backend.device)
    with torch.no_grad():
        return tokens, backend.decode(tokens, decoder_noise).cpu()


def write_json(path, out) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(out, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="default: float32,bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--cases", default=None,
                    help="P:HxW,... (default: " + ",".join(f"{p}:{h}x{w}" for p, h, w in CASES) + ")")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cases = CASES
    if args.cases:
        cases = [(int(c.split(":")[0]), *map(int, c.split(":")[1].split("x")))
                 for c in args.cases.split(",")]
    names = (args.dtypes or ("float32,bfloat16" if args.device.startswith("cuda") else "float32"))
    rows = []
    out = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
           else "cpu", "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
           "configurations": len(cases) * len(names.split(",")), "complete": False,
           "rows": rows}
    if args.json:
        write_json(args.json, out)
    print(f"{'P':>3}{'size':>10}{'dtype':>10}{'tokens':>9}{'pixels':>9}{'seconds':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for p, height, width in cases:
            ckpt = make_tiny(Path(tmp) / f"tiny{p}", parallel_num=p, seed=p)
            for dtype in names.split(","):
                t0 = time.perf_counter()
                model = load_checkpoint(ckpt, dtype=dtypes.parse(dtype), device=args.device)
                req = GenerationRequest("agreement", height, width, args.steps, args.guidance,
                                        args.seed)
                plan = plan_for(model, req)
                ref_tokens, ref_image = tokens_and_image(ReferenceBackend(model), plan, req.seed)
                be = TorchBackend(model)
                tokens, image = tokens_and_image(be, plan, req.seed)
                same_tok = (tokens == ref_tokens).all(-1).float().mean().item()
                same_px = (image == ref_image).all(-1).float().mean().item()
                sec = time.perf_counter() - t0
                rows.append(dict(parallel_num=p, height=height, width=width, dtype=dtype,
                                 identical_tokens=same_tok, identical_pixels=same_px,
                                 cuda_graphs=be.graphs, seconds=round(sec, 2)))
                print(f"{p:>3}{f'{height}x{width}':>10}{dtype:>10}{same_tok:>8.2%}{same_px:>8.2%}"
                      f"{sec:>9.1f}", flush=True)
                if args.json:  # after every configuration: a stopped run keeps its rows
                    write_json(args.json, out)
                del model, be
    out["complete"] = True
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
