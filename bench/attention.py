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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitdance_rt.plugins import kv_attention  # noqa: E402
from bitdance_rt.plugins.sdpa import repeat_kv  # noqa: E402


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.small:
        hq, hkv, d, t, lens_list = 8, 2, 64, 16, [40, 200]
    else:
        hq, hkv, d, t, lens_list = 40, 8, 128, 64, [200, 1000, 2200, 3200, 4200]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
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
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "dtype": str(dtype), "shapes": dict(B=2, Hq=hq, Hkv=hkv, D=d, T=t), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
