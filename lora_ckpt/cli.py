"""The ``lora-ckpt`` command: demo, serve, inspect, list, export."""

import argparse
import json
import os
import sys

DEFAULT_STORE = "lora_ckpt_store"


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.store, quick=args.quick)
    return 0


def _serve(args) -> int:
    import uvicorn

    from .serving.app import create_app

    app = create_app(
        args.store,
        model_name=args.model,
        base_weights=args.base_weights,
        capacity=args.capacity,
        max_rank=args.max_rank,
        max_body_bytes=args.max_body_bytes,
        startup_delay=args.startup_delay,
    )
    print(f"Serving {os.path.abspath(args.store)} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(size)


def _inspect(args) -> int:
    from .state import inspect_adapter

    info = inspect_adapter(args.path)
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
    from .state import list_adapters

    root = (
        os.path.join(args.store, "adapters")
        if os.path.isdir(os.path.join(args.store, "adapters"))
        else args.store
    )
    adapters = list_adapters(root)
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
    from .export import export_merged_savedmodel
    from .serving.store import build_base_model
    from .state import load_lora_state

    model, _ = build_base_model(args.store, args.model, args.base)
    load_lora_state(model, args.adapter)
    export_merged_savedmodel(model, args.out)
    print(
        f"Exported {args.adapter} merged into the base as a SavedModel: {args.out} "
        "(signature 'serving_default': images -> logits)"
    )
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
    serve.add_argument("--store", default=DEFAULT_STORE)
    serve.add_argument(
        "--model", default=None, help="tfimm model name (default: the store's base.json)"
    )
    serve.add_argument(
        "--base-weights", default=None, help="base weights file (default: STORE/base.h5)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--capacity", type=int, default=8, help="adapters resident at once")
    serve.add_argument("--max-rank", type=int, default=None)
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20)
    serve.add_argument("--startup-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(run=_serve)

    inspect = commands.add_parser(
        "inspect", help="an adapter's config, variables, size and base identity"
    )
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=_inspect)

    listing = commands.add_parser("list", help="the adapters of a store or directory")
    listing.add_argument("store", nargs="?", default=DEFAULT_STORE)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)

    export = commands.add_parser("export", help="base + adapter merged, as a TensorFlow SavedModel")
    export.add_argument("--store", default=DEFAULT_STORE, help="the store whose base to use")
    export.add_argument("--base", default=None, help="base weights file (default: STORE/base.h5)")
    export.add_argument(
        "--model", default=None, help="tfimm model name (default: the store's base.json)"
    )
    export.add_argument("--adapter", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)
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
