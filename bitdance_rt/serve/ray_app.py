"""Scale-out on Ray Serve: the same FastAPI app (``app.py``) as the ingress of a deployment with
one replica per GPU (each replica loads the model once, warms it up and runs its own
scheduler), behind Ray's HTTP proxy and its load balancing.

On one machine ``bitdance-rt serve --ray`` starts a local Ray instance; on a cluster start
Ray on every node first (``ray start --head`` on one, ``ray start --address HEAD:6379`` on the
others) and pass ``--ray-address auto``. The checkpoint directory must exist at the same path
on every node (the built-in model is made on each node on first use).
"""

from __future__ import annotations

import logging
import threading

from ..errors import BitDanceError
from .config import ServeConfig

log = logging.getLogger("bitdance_rt.serve")

APP_NAME = "bitdance-rt"


def deployment(config: ServeConfig, replicas: int = 1, gpus_per_replica: float = 1,
               cpus_per_replica: float = 1, max_replicas: int | None = None):
    """The Ray Serve deployment (unbound). ``max_replicas`` turns on autoscaling between
    ``replicas`` and it, aiming at one full batch in flight per replica."""
    from ray import serve

    def build_app():  # runs in each replica: the app and its model live there
        from bitdance_rt.serve.app import create_app
        from bitdance_rt.serve.service import ImageService

        logging.getLogger("bitdance_rt.serve").setLevel(logging.INFO)
        return create_app(ImageService(config), load="startup")

    @serve.ingress(build_app)
    class BitDance:
        """One replica: a Session, its scheduler and metrics (see ``ImageService``)."""

    options = dict(
        name="BitDance",
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        # Let a replica hold a full batch plus its own queue, so requests batch there and
        # its own bounded queue (429) is what pushes back.
        max_ongoing_requests=config.max_batch + config.max_queue + 1,
        graceful_shutdown_timeout_s=config.drain_seconds + 10,
        graceful_shutdown_wait_loop_s=1,
    )
    if max_replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": config.max_batch}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(**options)(BitDance)


def check_replicas(replicas: int, max_replicas: int | None, gpus_per_replica: float | None):
    if replicas < 1:
        raise BitDanceError(f"--replicas must be 1 or more, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise BitDanceError(f"--max-replicas ({max_replicas}) must be at least --replicas "
                            f"({replicas})")
    if gpus_per_replica is not None and gpus_per_replica < 0:
        raise BitDanceError(f"--gpus-per-replica must be 0 or more, got {gpus_per_replica}")


def serve_on_ray(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                 replicas: int = 1, gpus_per_replica: float | None = None,
                 max_replicas: int | None = None, address: str | None = None,
                 say=print) -> int:
    """Deploy on Ray Serve (``address`` None: a local Ray instance) and serve until SIGTERM
    or Ctrl-C; then delete the application (replicas finish their requests) and stop."""
    check_replicas(replicas, max_replicas, gpus_per_replica)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise BitDanceError("--ray needs Ray Serve: pip install 'bitdance-rt[ray]'") from None
    import signal

    from .run import check_port

    if address is None:
        check_port(host, port)
        ray.init(include_dashboard=False, object_store_memory=256 * 2**20,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
        if gpus_per_replica is None:
            gpus_per_replica = 1 if gpus else 0
        if gpus_per_replica and gpus_per_replica * replicas > gpus:
            raise BitDanceError(f"{replicas} replica(s) x {gpus_per_replica:g} GPU need more "
                                f"than the {gpus:g} GPU(s) of this Ray cluster; use fewer "
                                "--replicas, or --gpus-per-replica 0 for CPU replicas")
        # GPU replicas need a CPU each; CPU replicas share the cluster's cores.
        cpus_per_replica = 1 if gpus_per_replica else max(1, int(cpus // replicas))
        serve.start(http_options={"host": host, "port": port})
        app = deployment(config, replicas, gpus_per_replica, cpus_per_replica,
                         max_replicas).bind()
        say(f"deploying {replicas} replica(s) on Ray Serve ({gpus_per_replica:g} GPU, "
            f"{cpus_per_replica:g} CPU each); loading the model in each")
        try:  # returns once every replica has loaded and warmed up
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # a replica could not start: its log is above
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise BitDanceError(f"the Ray Serve deployment did not start ({type(e).__name__}: "
                                f"{first}); the replica logs above say why") from None
        say(f"serving on http://{host}:{port} through Ray Serve; SIGTERM or Ctrl-C to stop")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        say("stopping: replicas finish the requests they hold")
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
