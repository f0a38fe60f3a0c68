"""Block-causal KV-cache attention: our kernel vs PyTorch SDPA over a concatenated cache.

    python bench/attention.py --json attn.json          # CUDA: Triton kernel vs SDPA
    python bench/attention.py --device cpu --small      # CPU smoke run (SDPA paths only)

14b shapes by default: B = 2 (cond + uncond), Hq = 40, Hkv = 8, D = 128, T = 64 new tokens,
cache lengths 200 .. 4200 (ragged: the unconditional sequence is shorter). Reports, per cache
length, the max error of each bf16 path against fp32 SDPA and the time per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitdance_rt  # noqa: E402,F401  (before torch: sets the CPU thread and MKL policies)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitdance_rt.attention import kv_attention  # noqa: E402
from bitdance_rt.attention.sdpa import repeat_kv  # noqa: E402


def sdpa_concat(q, k_new, v_new, caches, lens):
    """What an eager pipeline does: per sequence, concatenate the cache and the new block,
    then SDPA with an all-true mask (block mode)."""
    outs = []
    for b, n in enumerate(lens):
        k = torch.cat([caches[0][b:b + 1, :, :n], k_new[b:b + 1]], dim=2)
        v = torch.cat([caches[1][b:b + 1, :, :n], v_new[b:b + 1]], dim=2)
        rep = q.shape[1] // k.shape[1]
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], repeat_kv(k, rep), repeat_kv(v, rep)))
    return torch.cat(outs)


def timed(fn, device, iters):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
         for m, n, w, st in [(64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 128, 8, 2),
                             (32, 64, 4, 3), (32, 128, 4, 2), (128, 64, 8, 2), (16, 64, 4, 3)]]


def config_sweep(dev, dtype, hq, hkv, d, t, n, iters) -> list[dict]:
    """The Triton kernel at one cache length under several block sizes: time per call and
    error against fp32 SDPA, so one GPU session gathers the data for tuning ``pick_config``
    (the first row is its current choice for the 14b shapes)."""
    from bitdance_rt.attention.triton_attention import kv_attention_triton, pick_config

    gen = torch.Generator(dev).manual_seed(1)
    lens = [n, max(1, n - 37)]
    s_max = n + t
    q, kn, vn = (torch.randn(2, h, t, d, device=dev, generator=gen) for h in (hq, hkv, hkv))
    kc, vc = (torch.randn(2, hkv, s_max, d, device=dev, generator=gen) for _ in range(2))
    ref = sdpa_concat(q, kn, vn, (kc, vc), lens)
    low = [x.to(dtype) for x in (q, kn, vn, kc, vc)]
    lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
    print(f"\nkernel block sizes at cache length {n} (current choice: "
          f"{pick_config(hq // hkv * t, d, dtype)})")
    print(f"{'BLOCK_M':>8}{'BLOCK_N':>8}{'warps':>6}{'stages':>7}{'ms':>9}{'rel err':>10}")
    rows = []
    for cfg in SWEEP:
        try:
            out = kv_attention_triton(*low, lens_t, "block", config=cfg).float()
            err = (out - ref).abs().max().item() / ref.abs().max().item()
            ms = timed(lambda: kv_attention_triton(*low, lens_t, "block", config=cfg), dev,
                       iters) * 1e3
        except Exception as e:  # e.g. out of shared memory for this tile size
            print(f"{cfg['BLOCK_M']:>8}{cfg['BLOCK_N']:>8}{cfg['num_warps']:>6}"
                  f"{cfg['num_stages']:>7}  failed: {type(e).__name__}: {str(e)[:80]}")
            rows.append(dict(cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        print(f"{cfg['BLOCK_M']:>8}{cfg['BLOCK_N']:>8}{cfg['num_warps']:>6}{cfg['num_stages']:>7}"
              f"{ms:>9.3f}{err:>10.2e}")
        rows.append(dict(cfg, ms=ms, rel_err=err))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip the kernel block-size sweep (CUDA only) at the longest cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.small:
        hq, hkv, d, t, lens_list = 8, 2, 64, 16, [40, 200]
    else:
        hq, hkv, d, t, lens_list = 40, 8, 128, 64, [200, 1000, 2200, 3200, 4200]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    path = ("the Triton kernel, bf16" if dev.type == "cuda" else
            "the op's CPU path (SDPA over the cache in place, no Triton kernel), float32")
    print(f"'ours' is bitdance::kv_attention on {dev.type}: {path}.")
    if dev.type != "cuda":
        print("On the CPU both paths are SDPA in float32, as the reference is (errors near 0 "
              "say nothing of the kernel);\nthe kernel's times and bf16 errors need a CUDA GPU "
              "(--device cuda).")
    gen = torch.Generator(dev).manual_seed(0)
    rows = []
    print(f"{'cache len':>10}{'ours ms':>10}{'sdpa+cat ms':>13}{'speedup':>9}{'ours err':>10}{'sdpa err':>10}")
    for n in lens_list:
        lens = [n, max(1, n - 37)]  # cond longer than uncond
        s_max = n + t
        q = torch.randn(2, hq, t, d, device=dev, generator=gen)
        kn = torch.randn(2, hkv, t, d, device=dev, generator=gen)
        vn = torch.randn(2, hkv, t, d, device=dev, generator=gen)
        kc = torch.randn(2, hkv, s_max, d, device=dev, generator=gen)
        vc = torch.randn(2, hkv, s_max, d, device=dev, generator=gen)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        ref = sdpa_concat(q, kn, vn, (kc, vc), lens)  # fp32 reference
        low = [x.to(dtype) for x in (q, kn, vn, kc, vc)]
        ours = kv_attention(*low, lens_t, "block").float()
        theirs = sdpa_concat(low[0], low[1], low[2], (low[3], low[4]), lens).float()
        scale = ref.abs().max().item()
        err_ours = (ours - ref).abs().max().item() / scale
        err_sdpa = (theirs - ref).abs().max().item() / scale
        t_ours = timed(lambda: kv_attention(*low, lens_t, "block"), dev, args.iters)
        t_sdpa = timed(lambda: sdpa_concat(low[0], low[1], low[2], (low[3], low[4]), lens), dev,
                       args.iters)
        rows.append(dict(cache_len=n, ours_ms=t_ours * 1e3, sdpa_concat_ms=t_sdpa * 1e3,
                         ours_rel_err=err_ours, sdpa_rel_err=err_sdpa))
        print(f"{n:>10}{t_ours * 1e3:>10.3f}{t_sdpa * 1e3:>13.3f}{t_sdpa / t_ours:>8.2f}x"
              f"{err_ours:>10.2e}{err_sdpa:>10.2e}")
    sweep = config_sweep(dev, dtype, hq, hkv, d, t, lens_list[-1], args.iters) \
        if dev.type == "cuda" and not args.no_sweep else []
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "dtype": str(dtype), "path": path, "shapes": dict(B=2, Hq=hq, Hkv=hkv, D=d, T=t), "rows": rows,
           "sweep": sweep}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
