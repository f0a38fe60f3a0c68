"""Golden images of the ImageNet family, made by the authors' own code, for
tests/test_imagenet.py.

Rerun from the repository root, with the authors' ImageNet code (the ``imagenet_gen/``
directory of their release, holding ``src/model.py``; it needs ``einops``) beside it:

    TORCH_COMPILE_DISABLE=1 python tests/data/imagenet_golden/make_golden.py \\
        --authors /path/to/imagenet_gen

For each number of tokens per step p in (1, 4, 16) it writes ``golden_p{p}.npz``:

1. the tiny checkpoint of ``bitdance-export make-tiny --family imagenet --parallel-num p
   --seed SEEDS[p]``: its ``.pt`` files (the authors' format) are written to a temporary
   directory, and the sha256 of its weights (``bitdance_rt.imagenet.tiny.digest``) is stored,
   so that a changed make-tiny fails the test instead of silently comparing other weights;
2. the authors' model is built as their sampling script builds it (``BitDance(...)`` with the
   tiny sizes, moved to channels_last, ``load_state_dict(checkpoint["ema"], strict=True)``,
   ``load_vae_weight()``, ``eval()``), from ``src/model.py`` for p = 1 and
   ``src/model_parallel.py`` (``parallel_mode="patch"``) otherwise;
3. for each case: ``torch.manual_seed(seed); model.sample(labels, sample_steps=steps,
   cfg_scale=cfg)`` and the uint8 conversion of their sampling script
   (``clamp(127.5 x + 128, 0, 255)``, channels last, ``uint8``). The +-1 tokens of every AR
   step are recorded too (packed bits, token order), to tell a sampling difference from a
   decoding one.

Changes to their code, all outside what is compared:

- their ``BitDance`` builds its autoencoder with a fixed full-size config (ch 256, 4 residual
  blocks per level); the tiny checkpoint's autoencoder is smaller, so ``VQModel`` is called
  with the tiny config (``bitdance_rt.imagenet.tiny.TINY_AE``) instead;
- ``src/layers.py`` imports ``flash_attn``, which sampling never calls (it attends through the
  KV cache); a stub module stands in for it;
- ``@torch.compile`` is switched off (``TORCH_COMPILE_DISABLE=1``, also set below): the
  contract is the eager computation, and compiled kernels may fuse and round differently;
- no autocast and no ``torch.set_float32_matmul_precision("high")`` (both CUDA settings of
  their script): the contract is float32 at full precision on the CPU;
- every ``nn.Linear`` computes through ``bitdance_rt.models.linear.linear``. Why: a float32
  product on the CPU rounds a row differently depending on how many rows are computed with it
  (oneMKL runs 1 to 3 rows with another kernel), and the two sides batch rows differently
  (the first AR step with guidance has 2B rows, later ones B; the time embedding is one row
  per image). Our Linear computes every product in tiles of 48 rows, which makes a row's
  result independent of the batch on every processor. Without the substitution the goldens
  would record the rounding of oneMKL's kernel choice for their row counts rather than the
  algorithm (measured when these files were made: ``unpatched_differing_images`` in each
  file's ``meta``, per case the number of images that differ when their code runs with plain
  ``nn.Linear``).
  Everything else (attention products, norms, convolutions, the sampler's arithmetic, the
  random numbers) is theirs.

The goldens are made with one CPU thread (``THREADS``), and the test runs with one: their
autoencoder holds its weights, and so its activations, in channels_last, and the CPU's
GroupNorm over channels_last activations sums in an order that depends on the number of
threads. The tokens do not depend on it; the decoded pixels do, slightly (made with two
threads, 1 or 2 of the 147456 values of each case differ, by one), for their code and ours
alike.

The npz files also hold ``platform``: a fingerprint of the machine's float32 kernels
(:func:`platform_fingerprint`); exact goldens only hold where the kernels round the same
(the test names the difference when they do not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # this repository's bitdance_rt
SEEDS = {1: 11, 4: 14, 16: 26}  # make-tiny seeds
THREADS = 1  # torch's CPU threads (the decoded pixels depend on it: see the docstring)
# (labels, sampling seed, head steps, guidance)
CASES = [
    ([3, 207, 980], 5, 4, 1.0),
    ([1, 1, 812], 7, 3, 4.0),
]


def platform_fingerprint() -> dict:
    """sha256 (16 hex digits) of a few float32 CPU kernels on fixed inputs: the random
    normal stream, products (our tiled Linear, batched matmul), softmax, the norms, a
    convolution and the transcendental functions. Two machines with equal fingerprints round
    these the same."""
    import torch
    import torch.nn.functional as F

    from bitdance_rt.models.linear import linear

    g = torch.Generator().manual_seed(0)
    u = torch.rand(4, 40, 96, generator=g) * 4 - 2
    w = torch.rand(64, 96, generator=g) - 0.5
    probes = {
        "randn": torch.randn(1000, generator=torch.Generator().manual_seed(1)),
        "linear": linear(u, w),
        "bmm": u @ u.transpose(-1, -2),
        "softmax": torch.softmax(u, -1),
        "layer_norm": F.layer_norm(u, (96,), eps=1e-6),
        "rms_norm": F.rms_norm(u, (96,), eps=1e-6),
        "group_norm": F.group_norm(u.reshape(2, 64, 30, 4), 32, eps=1e-6),
        "conv2d": F.conv2d(u.reshape(2, 64, 30, 4), torch.rand(64, 64, 3, 3, generator=g) - 0.5,
                           padding=1),
        "transcendental": torch.cat([torch.exp(u), torch.sin(u * 100), torch.cos(u * 100),
                                     F.silu(u), torch.sigmoid(u)]),
    }
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]
            for k, v in probes.items()}


def _import_authors(root: Path, parallel: bool, tiny_ae: dict):
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    import torch

    stub = types.ModuleType("flash_attn")

    def flash_attn_func(*a, **k):
        raise RuntimeError("flash_attn is not used when sampling")

    stub.flash_attn_func = flash_attn_func
    sys.modules.setdefault("flash_attn", stub)
    sys.path.insert(0, str(root))
    import importlib

    qae = importlib.import_module("src.qae")
    mod = importlib.import_module("src.model_parallel" if parallel else "src.model")
    mod.VQModel = lambda ddconfig, num_codebooks: qae.VQModel(tiny_ae, num_codebooks)
    return torch, mod


def _patch_linear(torch, on: bool):
    from bitdance_rt.models.linear import linear

    if not hasattr(torch.nn.Linear, "_plain_forward"):
        torch.nn.Linear._plain_forward = torch.nn.Linear.forward
    torch.nn.Linear.forward = ((lambda self, x: linear(x, self.weight, self.bias)) if on
                               else torch.nn.Linear._plain_forward)


def _authors_model(torch, mod, spec, model_pt: Path, ae_pt: Path):
    kwargs = dict(dim=spec.dim, n_layer=spec.n_layer, n_head=spec.n_head,
                  diff_layers=spec.head_layers, diff_dim=spec.head_dim,
                  diff_adanln_layers=spec.head_adaln, latent_dim=spec.latent_dim, down_size=16,
                  patch_size=1, resolution=spec.image_size, diff_batch_mul=4,
                  cls_token_num=spec.cls_token_num, num_classes=spec.num_classes,
                  trained_vae=str(ae_pt), time_shift=spec.time_shift)
    if spec.parallel_num > 1:
        kwargs.update(parallel_num=spec.parallel_num, parallel_mode="patch")
    model = mod.BitDance(**kwargs).to("cpu", memory_format=torch.channels_last)
    checkpoint = torch.load(model_pt, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["ema"], strict=True)
    model.load_vae_weight()
    return model.eval()


def _run_case(torch, model, labels, seed, steps, cfg):
    preds = []
    head_sample = model.head_sample

    def recording(*a, **k):
        out = head_sample(*a, **k)
        preds.append(out[: len(labels)].reshape(len(labels), -1, out.shape[-1]))
        return out

    model.head_sample = recording
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            samples = model.sample(torch.tensor(labels), sample_steps=steps, cfg_scale=cfg)
    finally:
        del model.head_sample
    images = (torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1)
              .to("cpu", dtype=torch.uint8).numpy())
    tokens = torch.cat(preds, dim=1)  # [B, h*w, 32] in token order
    return images, np.packbits(tokens.numpy() > 0, axis=-1)


def make(root: Path, p: int, out: Path) -> Path:
    import bitdance_rt  # noqa: F401  (its CPU settings before torch's first product)
    from bitdance_rt.imagenet import tiny

    spec = tiny.tiny_spec(p)
    torch, mod = _import_authors(root, p > 1, spec.ae.to_json_dict()["ddconfig"])
    torch.set_num_threads(THREADS)
    seed = SEEDS[p]
    with tempfile.TemporaryDirectory() as tmp:
        model_pt, ae_pt = tiny.write_pt_files(Path(tmp), p, seed)
        _patch_linear(torch, True)
        model = _authors_model(torch, mod, spec, model_pt, ae_pt)
        results = [_run_case(torch, model, *case) for case in CASES]
        _patch_linear(torch, False)
        plain = _authors_model(torch, mod, spec, model_pt, ae_pt)
        unpatched = [int(sum((a != b).any() for a, b in zip(_run_case(torch, plain, *case)[0],
                                                             images)))
                     for case, (images, _) in zip(CASES, results)]
        _patch_linear(torch, True)
    arrays = {}
    for i, (images, bits) in enumerate(results):
        arrays[f"images_{i}"] = images
        arrays[f"tokens_{i}"] = bits
    meta = {"parallel_num": p, "make_tiny_seed": seed,
            "weights_sha256": tiny.digest(*tiny.tiny_states(p, seed)),
            "cases": [{"labels": c[0], "seed": c[1], "steps": c[2], "guidance": c[3]}
                      for c in CASES],
            "platform": platform_fingerprint(), "unpatched_differing_images": unpatched,
            "threads": THREADS, "torch": torch.__version__}
    path = out / f"golden_p{p}.npz"
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", type=Path, required=True,
                    help="the authors' imagenet_gen directory (holding src/model.py)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--parallel", type=int, nargs="*", default=[1, 4, 16])
    args = ap.parse_args()
    for p in args.parallel:
        print(make(args.authors.resolve(), p, args.out))


if __name__ == "__main__":
    main()
