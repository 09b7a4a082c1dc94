"""The ``lora-ckpt`` command: demo, serve, inspect, list, export, gc."""

import argparse
import json
import os
import sys

DEFAULT_STORE = "lora_ckpt_store"


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.store, quick=args.quick)
    return 0


def _is_url(path: str) -> bool:
    return "://" in path


def _serve_ray(args) -> int:
    from .serving.ray_app import run_ray_service

    service_options = dict(
        model_name=args.model,
        base_weights=args.base_weights,
        max_rank=args.max_rank,
        max_classes=args.max_classes,
        queue_timeout=args.queue_timeout,
        load_timeout=args.load_timeout,
    )
    limits = dict(
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        request_timeout=args.request_timeout,
        max_instances=64,
        top_k=5,
        call_timeout=args.request_timeout + args.queue_timeout + args.load_timeout,
    )
    return run_ray_service(
        args.store,
        replicas=args.replicas,
        capacity=args.capacity,
        service_options=service_options,
        limits=limits,
        host=args.host,
        port=args.port,
        address=args.address,
        num_cpus=args.num_cpus,
        replica_cpus=args.replica_cpus,
        verbose=args.log_level.lower() in ("debug", "info"),
    )


def _serve(args) -> int:
    import faulthandler
    import signal
    import socket

    if args.ray:
        return _serve_ray(args)
    import uvicorn

    # `kill -USR1 <pid>` prints every thread's stack: how to see where a stuck
    # server is stuck, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from .serving.app import create_app

    app = create_app(
        args.store,
        model_name=args.model,
        base_weights=args.base_weights,
        capacity=args.capacity,
        max_rank=args.max_rank,
        max_classes=args.max_classes,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        request_timeout=args.request_timeout,
        queue_timeout=args.queue_timeout,
        load_timeout=args.load_timeout,
        startup_delay=args.startup_delay,
    )
    # Bind first, so "Serving" is printed only once the port is ours.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"lora-ckpt serve: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
    )
    where = args.store if _is_url(args.store) else os.path.abspath(args.store)
    print(f"Serving {where} on http://{args.host}:{args.port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(size)


def _inspect(args) -> int:
    from .state import inspect_adapter

    info = inspect_adapter(args.path, verify=args.verify)  # a directory or a URL
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter       {info['path']}")
    print(f"architecture  {info['architecture']} (base {info['base_architecture']})")
    print(f"base          {info['base_fingerprint']}")
    print(
        f"format        version {info['format_version']}, written by lora_ckpt {info['library_version']} "
        f"on {info['created']}"
    )
    print(
        f"saved         LoRA A/B, biases: {info['saved']['bias']}, "
        f"extra layers: {info['saved']['extra_layers'] or 'none'}"
    )
    print(f"size          {_human_size(info['size_bytes'])}, {info['num_parameters']:,} parameters")
    ranks = sorted(set(info["ranks"].values()))
    print(f"LoRA layers   {len(info['ranks'])}, rank {ranks[0] if len(ranks) == 1 else ranks}")
    if info["metadata"]:
        print(f"metadata      {json.dumps(info['metadata'])}")
    print("variables:")
    for key, var in info["variables"].items():
        print(f"  {key:<60} {var['dtype']}{var['shape']}  {var['kind']}")
    return 0


def _list(args) -> int:
    from .state.inspect import adapters_root, list_adapters

    adapters = list_adapters(adapters_root(args.store), verify=args.verify)
    if args.json:
        print(json.dumps(adapters, indent=2))
        return 0
    for info in adapters:
        if "error" in info:
            print(f"{info['name']:<20} ERROR {info['error']}")
        else:
            print(
                f"{info['name']:<20} {_human_size(info['size_bytes']):>12}  {info['architecture'].rsplit('.', 1)[-1]}"
                f"  {json.dumps(info['metadata'])}"
            )
    return 0


def _export(args) -> int:
    from .errors import UnregisteredArchitectureError
    from .export import export_merged_savedmodel
    from .serving.store import adapter_path, build_base_model, store_base_weights
    from .state import from_adapter, load_lora_state, read_lora_state

    is_path = os.path.sep in args.adapter or os.path.isdir(args.adapter)
    path = args.adapter if is_path else adapter_path(args.store, args.adapter)
    name = os.path.basename(os.path.normpath(path))
    print(f"[1/3] reading adapter {path}", flush=True)
    config = read_lora_state(path).config
    width = (config.base_model.config or {}).get("nb_classes")
    print("[2/3] building the adapter's model and loading base and adapter", flush=True)
    try:
        # The LoRA model the adapter was trained with: its ranks, DoRA/rsLoRA, head.
        model = from_adapter(path, base_weights=store_base_weights(args.store, args.base))
    except UnregisteredArchitectureError:
        width = (config.base_model.config or {}).get("nb_classes")
        overrides = {"nb_classes": width} if width is not None else None
        model, _ = build_base_model(args.store, args.model, args.base, overrides=overrides)
        load_lora_state(model, path)
    out = os.path.join(args.out, name, str(args.version)) if args.tf_serving else args.out
    print(f"[3/3] writing the merged SavedModel to {out}", flush=True)
    labels = config.metadata.get("labels") if isinstance(config.metadata, dict) else None
    export_merged_savedmodel(model, out, args.with_preprocessing, labels)
    inputs = "image_bytes (PNG/JPEG strings)" if args.with_preprocessing else "images"
    print(f"Exported {name}: signature 'serving_default': {inputs} -> logits")
    return 0


def _gc(args) -> int:
    from .state.atomic import collect_garbage
    from .state.inspect import adapters_root

    touched = collect_garbage(adapters_root(args.store))
    for path in touched:
        print(f"cleaned {path}")
    print(f"{len(touched)} leftover(s) of interrupted saves cleaned")
    return 0


def _combine(args) -> int:
    from .state import inspect_adapter
    from .state.combine import COMBINED_KEY, combine_adapters

    out = combine_adapters(
        args.sources,
        args.weights,
        args.out,
        method=args.method,
        rank=args.rank,
        overwrite=args.overwrite,
    )
    print(f"Combined {len(args.sources)} adapter(s) ({args.method}) into {out}")
    if args.method == "svd":
        combined = inspect_adapter(out)["metadata"][COMBINED_KEY]
        error, rank = combined["max_svd_relative_error"], combined["rank"]
        print(f"rank-{rank} SVD: max relative error {error:.3g} (per layer in its metadata)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lora-ckpt``."""
    parser = argparse.ArgumentParser(
        prog="lora-ckpt", description="LoRA adapters for TensorFlow vision models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train a base and three task adapters, serve them, print a table"
    )
    demo.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help=f"where to write the store (default: {DEFAULT_STORE})",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller model and data set (seconds)")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="the HTTP inference service")
    serve.add_argument(
        "--store", default=DEFAULT_STORE, help="the adapter store to serve (a directory or s3://)"
    )
    serve.add_argument(
        "--model", default=None, help="tfimm model name (default: the store's base.json)"
    )
    serve.add_argument(
        "--base-weights", default=None, help="base weights file (default: STORE/base.h5)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind")
    serve.add_argument("--capacity", type=int, default=8, help="adapters resident at once")
    serve.add_argument("--max-rank", type=int, default=None, help="largest adapter rank served")
    serve.add_argument(
        "--max-classes", type=int, default=None, help="widest adapter head (default: the base's)"
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413"
    )
    serve.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="larger images get 413, before decoding"
    )
    serve.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds a request body may take"
    )
    serve.add_argument(
        "--queue-timeout",
        type=float,
        default=10.0,
        help="seconds a request waits for a slot when every slot is busy (then 503)",
    )
    serve.add_argument(
        "--load-timeout", type=float, default=30.0, help="seconds an adapter load may take (504)"
    )
    serve.add_argument(
        "--timeout-keep-alive", type=int, default=5, help="seconds an idle connection stays open"
    )
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        default=256,
        help="connections and tasks at once; more get 503",
    )
    serve.add_argument("--startup-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    scale = serve.add_argument_group(
        "scaling out (Ray Serve; needs the scale extra: pip install 'lora_ckpt[scale]')"
    )
    scale.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: replicas with adapters multiplexed by name",
    )
    scale.add_argument("--replicas", type=int, default=2, help="replicas with --ray (default 2)")
    scale.add_argument(
        "--address",
        default=None,
        help="a Ray cluster to join ('auto', HEAD:6379); default: start a local one",
    )
    scale.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)"
    )
    scale.add_argument(
        "--replica-cpus", type=float, default=None, help="Ray CPUs reserved per replica"
    )
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level")
    serve.set_defaults(run=_serve)

    inspect = commands.add_parser(
        "inspect", help="an adapter's config, variables, size and base identity"
    )
    inspect.add_argument("path", help="the adapter directory (or its s3:// URL)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--verify", action="store_true", help="also check every file's SHA-256 (reads them all)"
    )
    inspect.set_defaults(run=_inspect)

    listing = commands.add_parser("list", help="the adapters of a store or directory")
    listing.add_argument(
        "store",
        nargs="?",
        default=DEFAULT_STORE,
        help="a store or a directory of adapters (local or s3://)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument(
        "--verify", action="store_true", help="also check every file's SHA-256 (reads them all)"
    )
    listing.set_defaults(run=_list)

    export = commands.add_parser("export", help="base + adapter merged, as a TensorFlow SavedModel")
    export.add_argument("--store", default=DEFAULT_STORE, help="the store whose base to use")
    export.add_argument("--base", default=None, help="base weights file (default: STORE/base.h5)")
    export.add_argument(
        "--model", default=None, help="tfimm model name (default: the store's base.json)"
    )
    export.add_argument(
        "--adapter", required=True, help="an adapter name in the store, or an adapter directory"
    )
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument(
        "--tf-serving",
        action="store_true",
        help="write TF Serving's layout: OUT/NAME/VERSION/ (a model base path for TF Serving)",
    )
    export.add_argument("--version", type=int, default=1, help="the version with --tf-serving")
    export.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="the signature takes PNG/JPEG bytes and does the service's preprocessing",
    )
    export.set_defaults(run=_export)

    gc = commands.add_parser("gc", help="clean what interrupted saves left in a store")
    gc.add_argument("store", nargs="?", default=DEFAULT_STORE, help="a store or adapter directory")
    gc.set_defaults(run=_gc)

    combine = commands.add_parser(
        "combine", help="a new adapter from a weighted combination of adapters of one base"
    )
    combine.add_argument("out", help="the new adapter's directory (or its s3:// URL)")
    combine.add_argument("sources", nargs="+", help="the adapters to combine")
    combine.add_argument(
        "--weights",
        type=float,
        nargs="+",
        required=True,
        help="one weight per source adapter, in their order",
    )
    combine.add_argument(
        "--method",
        choices=("cat", "linear", "svd"),
        default="cat",
        help="cat: exact weighted sum, ranks add up (default); linear: PEFT's sum of the "
        "factors (equal ranks, adds cross terms); svd: the weighted sum truncated to --rank",
    )
    combine.add_argument("--rank", type=int, default=None, help="the rank of --method svd")
    combine.add_argument(
        "--overwrite", action="store_true", help="replace an adapter already at OUT"
    )
    combine.set_defaults(run=_combine)
    return parser


def main(argv=None) -> int:
    """Runs ``lora-ckpt``; returns the exit code (1 with a message for a LoRAError)."""
    args = build_parser().parse_args(argv)
    from .errors import LoRAError

    try:
        return args.run(args)
    except LoRAError as exc:
        print(f"lora-ckpt {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
