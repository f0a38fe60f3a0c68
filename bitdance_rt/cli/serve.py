"""``bitdance-rt serve``: the images API over HTTP, in this process or on Ray Serve."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import BitDanceError
from ..limits import (SERVE_CLIENT_TIMEOUT_S, SERVE_HOST, SERVE_MAX_BATCH, SERVE_MAX_QUEUE,
                      SERVE_PORT, SERVE_TIMEOUT_S)
from .app import DEBUG_OPTION, Command, rt_app


@rt_app.command(cls=Command)
def serve(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint directory (released layout). "
        "Default: the built-in demo model."),
    backend: str = typer.Option("torch", help="torch, reference, or a graph backend "
                                "(onnxruntime, tensorrt) with --export-dir."),
    engine_dir: Optional[Path] = typer.Option(None, "--export-dir", "--engine-dir",
                                              help="Directory written by bitdance-export "
                                              "(--engine-dir: the old name, kept for this "
                                              "release)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if "
                                         "present)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: "
                                        "bfloat16 on cuda, float32 on cpu)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs"),
    host: str = typer.Option(SERVE_HOST, help="Address to listen on (loopback by default; "
                             "0.0.0.0 to accept other machines)."),
    port: int = typer.Option(SERVE_PORT, help="Port to listen on."),
    max_batch: int = typer.Option(SERVE_MAX_BATCH, "--max-batch", help="Most images in one AR run (requests "
                                  "with the same size, steps and guidance share a run)."),
    max_queue: int = typer.Option(SERVE_MAX_QUEUE, "--max-queue", help="Most requests waiting; more are "
                                  "answered 429 with Retry-After."),
    timeout: float = typer.Option(SERVE_TIMEOUT_S, help="Seconds a request may take from arrival to "
                                  "answer; then 504 (its rows are dropped at the next block)."),
    client_timeout: float = typer.Option(SERVE_CLIENT_TIMEOUT_S, "--client-timeout",
                                         help="Seconds a client may take to send a request's "
                                         "head, then its body, and to take each piece of an "
                                         "answer; then 408 and the connection is closed."),
    drain_timeout: Optional[float] = typer.Option(
        None, "--drain-timeout", help="Most seconds SIGTERM's drain lasts; then what is left "
        "is answered 503 or closed, and the process exits 0 (default: the --timeout)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="BITDANCE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every "
                                          "route but /healthz (env: BITDANCE_API_KEY; unset: "
                                          "no key; empty, padded with white space or not "
                                          "printable ASCII: refused)."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One small generation "
                                "before /healthz reports ready."),
    ray: bool = typer.Option(False, "--ray", help="Deploy on Ray Serve (local Ray instance "
                             "unless --ray-address)."),
    replicas: int = typer.Option(1, help="--ray: replicas (one per GPU)."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="--ray: autoscale "
                                               "between --replicas and this."),
    gpus_per_replica: Optional[float] = typer.Option(
        None, "--gpus-per-replica", help="--ray: GPUs per replica (default 1 when the cluster "
        "has GPUs, else 0)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--ray: an existing "
                                              "cluster ('auto' or HOST:6379)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
    debug: bool = DEBUG_OPTION,
):
    """Serve the OpenAI Images API (POST /v1/images/generations), /v1/models, /healthz,
    /metrics and a web page at /, batching compatible requests; SIGTERM drains."""
    from ..serve.config import API_KEY_ENV, ServeConfig

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise BitDanceError(f"bitdance-rt serve needs {e.name}: pip install "
                            "'bitdance-rt[serve]'") from None
    if log_level not in ("debug", "info", "warning", "error"):
        raise BitDanceError(f"--log-level must be debug, info, warning or error, got "
                            f"{log_level!r}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    # the server's log, not its libraries' (torch reports its caches at exit at INFO)
    logging.getLogger("torch").setLevel(max(logging.WARNING, logging.getLogger().level))
    if not ray and (replicas != 1 or max_replicas is not None or gpus_per_replica is not None
                    or ray_address is not None):
        raise BitDanceError("--replicas, --max-replicas, --gpus-per-replica and --ray-address "
                            "are for --ray; add --ray or leave them out")
    if api_key is None and API_KEY_ENV in os.environ:
        api_key = os.environ[API_KEY_ENV]  # set but empty: refused by the check below
    from ..runtime.session import resolve_device

    if device is not None and not ray:
        resolve_device(device)  # a missing CUDA device fails here, before anything loads
    config = ServeConfig(checkpoint=checkpoint.resolve() if checkpoint else None,
                         backend=backend, device=device, dtype=dtype,
                         engine_dir=engine_dir.resolve() if engine_dir else None,
                         cuda_graphs=cuda_graphs, max_batch=max_batch, max_queue=max_queue,
                         timeout=timeout, api_key=api_key, warmup=warmup,
                         client_timeout=client_timeout, drain_timeout=drain_timeout).check()
    if ray:
        from ..serve.ray_app import serve_on_ray

        return serve_on_ray(config, host, port, replicas, gpus_per_replica, max_replicas,
                            ray_address, say=lambda m: typer.echo(m, err=True))
    from ..serve.run import serve_forever

    return serve_forever(config, host, port, log_level)
