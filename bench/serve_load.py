"""A bounded load test of the images API: throughput, latency percentiles and errors per
concurrency level, for one or more servers measured side by side in one run.

    # servers already running
    python bench/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 16
    # or let the script start them (single process and Ray Serve with 2 replicas), then
    # measure them level by level, alternating, and print the ratio to the first
    python bench/serve_load.py --launch single,ray:2 --concurrency 1,4,16 --requests 16 \
        --json bench/results_serve_cpu.json

Each level sends ``--requests`` requests from ``--concurrency`` clients (each sends its next
request when its last is answered), all with the same size, steps and guidance and seeds
``base+i``; throughput is answered images per second over the level's wall time, latency is
per successful request. Only loopback addresses are allowed unless ``--any-host``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitdance_rt.serve.client import free_port, generate, wait_ready  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_level(url, concurrency, requests, fields, seed0, api_key, timeout):
    """``requests`` requests from ``concurrency`` clients; returns the level's summary."""
    lock = threading.Lock()
    next_i = [0]
    latencies, errors, batches = [], {}, []

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= requests:
                    return
                next_i[0] += 1
            try:
                r = generate(url, api_key=api_key, timeout=timeout, seed=seed0 + i, **fields)
                status = r.status
            except OSError as e:
                status = f"connection: {type(e).__name__}"
            with lock:
                if status == 200:
                    latencies.append(r.seconds)
                    batches.append(int(r.headers.get("x-batch-images", 1)))
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    images = len(latencies) * fields.get("n", 1)
    return {
        "concurrency": concurrency, "requests": requests, "ok": len(latencies),
        "errors": errors, "wall_s": wall, "images_per_s": images / wall,
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "p99_s": percentile(latencies, 99),
        "mean_batch_images": statistics.mean(batches) if batches else None,
    }


def launch(spec, args, logdir):
    """Start ``single`` or ``ray:N`` on a free loopback port; returns (name, url, process)."""
    port = free_port()
    cmd = [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "serve",
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue",
           str(args.max_queue), "--log-level", "warning"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    name = spec
    if spec.startswith("ray"):
        replicas = spec.partition(":")[2] or "1"
        cmd += ["--ray", "--replicas", replicas]
        name = f"ray x{replicas}"
    elif spec != "single":
        raise SystemExit(f"--launch takes single or ray:N, got {spec!r}")
    logfile = Path(logdir) / f"serve_{spec.replace(':', '_')}.log"
    proc = subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, args.start_timeout, proc)
    if spec.startswith("ray"):  # healthz answers once one replica is up: wait for all
        deadline = time.monotonic() + args.start_timeout
        while "serving on http" not in logfile.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{name} did not come up; see {logfile}")
            time.sleep(0.5)
    return name, url, proc


def stop(proc):
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def table(results, levels):
    names = list(results)
    head = "| concurrency | " + " | ".join(
        f"{n}: img/s | p50 s | p95 s | p99 s | errors" for n in names)
    if len(names) > 1:
        head += " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:])
    rows = [head + " |", "|" + "---|" * (1 + 5 * len(names) + max(0, len(names) - 1))]
    for i, c in enumerate(levels):
        cells = [str(c)]
        for n in names:
            r = results[n][i]
            err = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            cells += [f"{r['images_per_s']:.3f}", fmt(r["p50_s"]), fmt(r["p95_s"]),
                      fmt(r["p99_s"]), err]
        for n in names[1:]:
            base = results[names[0]][i]["images_per_s"]
            cells.append(f"{results[n][i]['images_per_s'] / base:.2f}x" if base else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--url", action="append", default=[],
                   help="A running server (repeat for several; NAME=URL to name it).")
    p.add_argument("--launch", default="", help="Servers to start: single, ray:N (comma list).")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="Requests per level.")
    p.add_argument("--prompt", default="a red circle on the left, on a white background")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="Default: the model's.")
    p.add_argument("--guidance", type=float, default=None, help="Default: the model's.")
    p.add_argument("--seed", type=int, default=1000, help="First seed (request i: seed + i).")
    p.add_argument("--api-key", default=os.environ.get("BITDANCE_API_KEY"),
                   help="the server's key (default: $BITDANCE_API_KEY, as the server reads it)")
    p.add_argument("--timeout", type=float, default=600.0, help="Per request, seconds.")
    p.add_argument("--checkpoint", default=None, help="For --launch (default: built-in).")
    p.add_argument("--max-batch", type=int, default=8, help="For --launch.")
    p.add_argument("--max-queue", type=int, default=64, help="For --launch.")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--any-host", action="store_true", help="Allow a non-loopback --url.")
    p.add_argument("--json", default=None, help="Write the results here.")
    args = p.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or any(c < 1 for c in levels):
        raise SystemExit("--requests and every --concurrency level must be 1 or more")
    servers, procs = [], []
    for u in args.url:
        name, _, url = u.rpartition("=") if "=" in u.split("//")[0] else ("", "", u)
        host = urlparse(url).hostname
        if host not in LOOPBACK and not args.any_host:
            raise SystemExit(f"{url}: this load test runs against loopback only; add "
                             "--any-host to point it elsewhere")
        servers.append((name or url, url))
    logdir = Path(args.json).parent if args.json else Path(".")
    try:
        for spec in filter(None, args.launch.split(",")):
            name, url, proc = launch(spec, args, logdir)
            procs.append(proc)
            servers.append((name, url))
            print(f"started {name} at {url}", file=sys.stderr)
        if not servers:
            raise SystemExit("give --url or --launch")
        fields = {k: v for k, v in (("prompt", args.prompt), ("size", args.size),
                                    ("steps", args.steps), ("guidance", args.guidance))
                  if v is not None}
        for name, url in servers:  # one request each: nothing below pays a first-call cost
            generate(url, api_key=args.api_key, timeout=args.timeout, seed=0, **fields)
        results = {name: [] for name, _ in servers}
        for c in levels:  # level by level, servers alternating: shared-machine drift cancels
            for name, url in servers:
                r = run_level(url, c, args.requests, fields, args.seed, args.api_key,
                              args.timeout)
                results[name].append(r)
                p50 = "-" if r["p50_s"] is None else f"{r['p50_s']:.2f} s"
                print(f"{name} c={c}: {r['images_per_s']:.3f} img/s, p50 {p50}, "
                      f"errors {r['errors']}", file=sys.stderr)
    finally:
        for proc in procs:
            stop(proc)
    print(table(results, levels))
    if args.json:
        out = {"settings": {**fields, "requests": args.requests, "levels": levels,
                            "max_batch": args.max_batch, "checkpoint": args.checkpoint},
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "servers": dict(servers), "results": results,
               "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
