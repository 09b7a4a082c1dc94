"""``lora-ckpt serve --ray``: the service as a Ray Serve application.

Three deployments, bound into one application:

- ``LoRAIngress`` (1 replica): the HTTP API (:mod:`lora_ckpt.serving.ray_ingress`);
- ``AdapterReplica`` (``replicas`` replicas): base model + AdapterPool +
  batcher each, adapters multiplexed by name (:mod:`lora_ckpt.serving.ray_replica`);
- ``ReplicaDirectory`` (1 replica): where replicas report, for ``/replicas``.

:func:`run_ray_service` starts a local Ray cluster (or joins one at
``address``), runs the application behind Ray Serve's HTTP proxy on
``host:port``, and on SIGTERM or SIGINT removes it (and stops the local
cluster it started).
"""

import os
import signal
import socket
import sys
import threading

from .options import ServiceOptions
from .store import read_base_config

__all__ = ["forwarded_environment", "run_ray_service"]


APP_NAME = "lora_ckpt"
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "LORA_CKPT_CACHE_DIR",
    "LORA_CKPT_CACHE_MAX_BYTES",
    "TF_CPP_MIN_LOG_LEVEL",
)
"""Variables the replicas get from the serving command (the store's endpoint and
credentials): on a cluster, workers do not share the command's environment."""


def _require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        from ..errors import LoRAConfigError

        raise LoRAConfigError(
            "--ray needs Ray Serve: install the scale extra with `pip install 'lora_ckpt[scale]'`."
        ) from None
    return ray, serve


def _build_application(
    store: str, options: ServiceOptions, *, replica_cpus: float, env: dict | None = None
):
    """The bound Ray Serve application (see the module docstring).

    Args:
        store: The adapter store every replica reads (``s3://`` on a cluster).
        options: The service's options: ``replicas`` AdapterReplica replicas
            of ``capacity`` adapters each (pool slots and Ray's
            ``max_num_models_per_replica``); the same object reaches the
            ingress and every replica.
        replica_cpus: Ray CPUs reserved per replica.
        env: Environment variables for every deployment's processes.

    Returns:
        The application to pass to ``serve.run``.

    Raises:
        LoRAConfigError: If Ray Serve is not installed.
    """
    _, serve = _require_ray()
    from .ray_ingress import LoRAIngress
    from .ray_replica import AdapterReplica, ReplicaDirectory

    actor = {"runtime_env": {"env_vars": env}} if env else {}
    directory = serve.deployment(
        ReplicaDirectory,
        name="ReplicaDirectory",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, **actor},
    ).bind()
    replica = serve.deployment(
        AdapterReplica,
        name="AdapterReplica",
        num_replicas=options.replicas,
        # Enough requests per replica for its batcher to fill batches.
        max_ongoing_requests=max(16, 4 * options.max_batch),
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
        ray_actor_options={"num_cpus": replica_cpus, **actor},
    ).bind(store, options, directory)
    return serve.deployment(
        LoRAIngress,
        name="LoRAIngress",
        num_replicas=1,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 0, **actor},
    ).bind(store, replica, directory, options)


def forwarded_environment() -> dict:
    """The variables of :data:`FORWARDED_ENV` that are set here."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def _port_free(host: str, port: int) -> str | None:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        return str(exc)
    finally:
        sock.close()
    return None


def run_ray_service(
    store: str, options: ServiceOptions, log=lambda line: print(line, flush=True)
) -> int:
    """Runs the service on Ray Serve until SIGTERM or SIGINT.

    Args:
        store: The adapter store.
        options: The service's options; besides those of
            :func:`_build_application`: ``host`` and ``port`` (where Ray
            Serve's HTTP proxy listens), ``address`` (a Ray cluster to join,
            ``auto`` or ``HOST:6379``; ``None`` starts a local one with
            ``num_cpus`` CPUs, default this machine's, stopped on exit),
            ``replica_cpus`` (default: a local cluster's CPUs shared among
            the replicas, at most 1; 1 on a joined cluster), and
            ``log_level`` (``info`` or ``debug`` show the workers' logs).
        log: Where the "Serving" line goes (printed once the replicas are up).

    Returns:
        The exit code.

    Raises:
        LoRAConfigError: If Ray Serve is not installed.
        StoreError: If ``store`` is not a store (no ``base.json``) or cannot be reached.
    """
    ray, serve = _require_ray()
    if options.model_name is None:
        # A missing store fails here, at once, not in every replica's retries.
        read_base_config(store)
    host, port, address, replicas = options.host, options.port, options.address, options.replicas
    problem = _port_free(host, port)
    if problem is not None:
        print(f"lora-ckpt serve: cannot bind {host}:{port}: {problem}", file=sys.stderr)
        return 1
    local = address is None
    cpus = options.num_cpus or os.cpu_count() or 1
    replica_cpus = options.replica_cpus
    if replica_cpus is None:
        replica_cpus = min(1.0, cpus / replicas) if local else 1.0
    stop = threading.Event()
    env = forwarded_environment()
    if local:
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=options.verbose,
            # Requests and answers are small: a bounded object store, not 30% of RAM.
            object_store_memory=256 << 20,
        )
    else:
        ray.init(address=address, log_to_driver=options.verbose)
    # Installed after ray.init, so they replace Ray's own handlers.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app = _build_application(store, options, replica_cpus=replica_cpus, env=env)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a replica could not start (its log says why)
            print(f"lora-ckpt serve: the application did not start: {exc}", file=sys.stderr)
            return 1
        where = "a local Ray cluster" if local else f"the Ray cluster at {address}"
        log(
            f"Serving {store} on http://{host}:{port} with Ray Serve: {replicas} replica(s) "
            f"on {where}"
        )
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # other applications of the cluster keep running
        finally:
            ray.shutdown()
