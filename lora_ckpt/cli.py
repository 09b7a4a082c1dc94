"""The ``lora-ckpt`` command: demo, serve, inspect, list, export, import-peft, gc,
combine, train, evaluate.

One ``_add_<command>_parser`` function per command builds its flags, and one
function runs it. Nothing heavy is imported at module level (no TensorFlow,
tfimm, numpy-heavy serving code or web framework): each command imports what
it needs when it runs, so ``lora-ckpt --help`` answers at once.
"""

import argparse
import dataclasses
import json
import os
import sys

DEFAULT_STORE = "lora_ckpt_store"


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.store, quick=args.quick)
    return 0


def _serve(args) -> int:
    from .serving.logs import configure_logging
    from .serving.options import ServiceOptions

    options = ServiceOptions.from_namespace(args)  # a bad value fails here, before any import
    configure_logging(options.log_level, options.log_format)
    if options.ray:
        from .serving.ray_app import run_ray_service

        return run_ray_service(args.store, options)
    return _serve_uvicorn(args.store, options)


def _serve_uvicorn(store: str, options) -> int:
    import faulthandler
    import signal
    import socket

    from .serving.store import read_base_config

    if options.model_name is None:
        # A store that is missing or unreachable fails here, at once.
        read_base_config(store)
    from .serving import server
    from .serving.app import create_app

    # `kill -USR1 <pid>` prints every thread's stack: how to see where a stuck
    # server is stuck, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    app = create_app(store, options)
    # Bind first, so "Serving" is printed only once the port is ours.
    host, port = options.host, options.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"lora-ckpt serve: cannot bind {host}:{port}: {exc}", file=sys.stderr)
        return 1
    from .storage import is_url

    where = store if is_url(store) else os.path.abspath(store)
    print(f"Serving {where} on http://{host}:{port}", flush=True)
    return server.run(app, options, sock)


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(size)


def _inspect(args) -> int:
    from .state import inspect_adapter
    from .state.layout import resolve_adapter_ref

    info = inspect_adapter(resolve_adapter_ref(args.adapter, args.store), verify=args.verify)
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
    from .serving.store import build_base_model, store_base_weights
    from .state import from_adapter, load_lora_state, read_lora_state
    from .state.layout import resolve_adapter_ref

    path = resolve_adapter_ref(args.adapter, args.store)
    name = os.path.basename(os.path.normpath(path))
    if args.peft:
        return _export_peft(path, args)
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
    out = args.out
    if args.tf_serving:
        # TF Serving serves the highest version: a new export is the next one.
        version = args.version or _next_version(os.path.join(args.out, name))
        out = os.path.join(args.out, name, str(version))
        if os.path.exists(out):
            print(f"{out} exists; choose another --version.", file=sys.stderr)
            return 1
    print(f"[3/3] writing the merged SavedModel to {out}", flush=True)
    labels = config.metadata.get("labels") if isinstance(config.metadata, dict) else None
    export_merged_savedmodel(model, out, args.with_preprocessing, labels)
    inputs = "image_bytes (PNG/JPEG strings)" if args.with_preprocessing else "images"
    print(f"Exported {name}: signature 'serving_default': {inputs} -> logits")
    return 0


def _next_version(model_dir: str) -> int:
    """One above the highest numeric version directory TF Serving would see."""
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return 1
    return max((int(n) for n in names if n.isdigit()), default=0) + 1


def _export_peft(path: str, args) -> int:
    from .state.peft_export import export_peft

    out = export_peft(path, args.out, base_model_name_or_path=args.base_model_name_or_path)
    print(f"Exported {path} as a PEFT adapter in {out}: PeftModel.from_pretrained(timm_model, DIR)")
    return 0


def _import_peft(args) -> int:
    from .serving.store import adapter_path, build_base_model, validate_adapter_name
    from .state.peft_import import import_peft

    target = adapter_path(args.store, validate_adapter_name(args.name))
    print(f"[1/2] building the store's base model ({args.store})", flush=True)
    model, _ = build_base_model(args.store)
    print(f"[2/2] importing {args.peft_dir} as {target}", flush=True)
    import_peft(args.peft_dir, model, target, labels=args.labels, overwrite=args.overwrite)
    print(f"Imported {args.peft_dir} as adapter {args.name!r}")
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


def _train(args) -> int:
    from .training import TrainSettings, train_adapter
    from .training.fanout import run_tasks_file

    names = [f.name for f in dataclasses.fields(TrainSettings)]
    values = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.tasks and (args.name or args.data or args.val_data):
        print("lora-ckpt train: --tasks takes names and folders from its file", file=sys.stderr)
        return 2
    if args.tasks:
        ray = {"address": args.address, "task_cpus": args.task_cpus, "num_cpus": args.num_cpus}
        rows = run_tasks_file(
            args.store,
            args.tasks,
            values,
            ray=ray if args.ray else None,
            resume=args.resume,
            log=log,
        )
        return 0 if all(row["status"] == "ok" for row in rows) else 1
    if not args.name or not args.data:
        print("lora-ckpt train: give --name and --data (or --tasks FILE)", file=sys.stderr)
        return 2
    train_adapter(
        args.store,
        args.name,
        args.data,
        args.val_data,
        settings=TrainSettings(**values),
        overwrite=args.overwrite,
        resume=args.resume,
        tensorboard=args.tensorboard,
        log=log,
    )
    return 0


def _evaluate(args) -> int:
    from .training.evaluate import evaluate_adapter, format_evaluation

    result = evaluate_adapter(
        args.store,
        args.name,
        args.data,
        batch_size=args.batch_size,
        strict=args.strict,
        max_pixels=args.max_pixels,
    )
    print(json.dumps(result) if args.json else format_evaluation(result))
    return 0


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Parent parsers of the flags several commands share."""
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help=f"the adapter store: a directory or s3:// URL (default: {DEFAULT_STORE})",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    return {"store": store, "json": as_json}


def _add_demo_parser(commands, parents) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[parents["store"]],
        help="train a base and three task adapters, serve them, print a table",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller model and data set (seconds)")
    demo.set_defaults(run=_demo)


def _add_serve_parser(commands, parents) -> None:
    # Plain Python, no TensorFlow: the flags are the fields of the options.
    from .serving.options import add_service_arguments

    serve = commands.add_parser(
        "serve", parents=[parents["store"]], help="the HTTP inference service"
    )
    add_service_arguments(serve)
    serve.set_defaults(run=_serve)


def _add_inspect_parser(commands, parents) -> None:
    inspect = commands.add_parser(
        "inspect",
        parents=[parents["store"], parents["json"]],
        help="an adapter's config, variables, size and base identity",
    )
    inspect.add_argument(
        "adapter", help="an adapter directory or URL, or the name of an adapter of --store"
    )
    inspect.add_argument(
        "--verify", action="store_true", help="also check every file's SHA-256 (reads them all)"
    )
    inspect.set_defaults(run=_inspect)


def _add_list_parser(commands, parents) -> None:
    listing = commands.add_parser(
        "list", parents=[parents["json"]], help="the adapters of a store or directory"
    )
    listing.add_argument(
        "store",
        nargs="?",
        default=DEFAULT_STORE,
        help="a store or a directory of adapters (local or s3://)",
    )
    listing.add_argument(
        "--verify", action="store_true", help="also check every file's SHA-256 (reads them all)"
    )
    listing.set_defaults(run=_list)


def _add_export_parser(commands, parents) -> None:
    export = commands.add_parser(
        "export",
        parents=[parents["store"]],
        help="base + adapter merged, as a TensorFlow SavedModel",
    )
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
    export.add_argument(
        "--version",
        type=int,
        default=None,
        help="the version with --tf-serving (default: one above the highest exported)",
    )
    export.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="the signature takes PNG/JPEG bytes and does the service's preprocessing",
    )
    export.add_argument(
        "--peft",
        action="store_true",
        help="write PEFT's adapter_config.json and adapter_model.safetensors to OUT instead "
        "(for PeftModel.from_pretrained on the timm model)",
    )
    export.add_argument(
        "--base-model-name-or-path",
        default=None,
        help="with --peft: the timm model PEFT users load (recorded in the config)",
    )
    export.set_defaults(run=_export)


def _add_import_peft_parser(commands, parents) -> None:
    imported = commands.add_parser(
        "import-peft",
        parents=[parents["store"]],
        help="a PEFT LoRA adapter of the timm twin of the store's model, as a store adapter",
    )
    imported.add_argument(
        "peft_dir", help="the directory PeftModel.save_pretrained wrote (safetensors)"
    )
    imported.add_argument("--name", required=True, help="the adapter's name in the store")
    imported.add_argument("--labels", nargs="+", default=None, help="class names, one per output")
    imported.add_argument(
        "--overwrite", action="store_true", help="replace an adapter of that name"
    )
    imported.set_defaults(run=_import_peft)


def _add_gc_parser(commands, parents) -> None:
    gc = commands.add_parser("gc", help="clean what interrupted saves left in a store")
    gc.add_argument("store", nargs="?", default=DEFAULT_STORE, help="a store or adapter directory")
    gc.set_defaults(run=_gc)


def _add_combine_parser(commands, parents) -> None:
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


def _add_train_parser(commands, parents) -> None:
    # Plain Python, no TensorFlow: the settings flags are the fields of TrainSettings.
    from .training.settings import TrainSettings

    train = commands.add_parser(
        "train",
        parents=[parents["store"]],
        help="train an adapter on the store's base from folders of labelled images",
    )
    train.add_argument("--name", help="the adapter's name in the store")
    train.add_argument("--data", help="a folder with one folder of PNG/JPEG images per class")
    train.add_argument(
        "--val-data", help="validation images, same layout (default: --val-split of --data)"
    )
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainSettings)}
    for name, kind in (
        ("val_split", float),
        ("epochs", int),
        ("rank", int),
        ("alpha", float),
        ("learning_rate", float),
        ("batch_size", int),
        ("patience", int),
        ("seed", int),
        ("max_pixels", int),
    ):
        default = getattr(TrainSettings, name)
        help_text = helps[name] + ("" if default is None else f" (default: {default:g})")
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, help=help_text)
    for name in ("dora", "strict"):
        train.add_argument(f"--{name}", action="store_true", default=None, help=helps[name])
    train.add_argument("--targets", nargs="+", help=helps["targets"])
    train.add_argument("--overwrite", action="store_true", help="replace an adapter of that name")
    train.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last epoch"
    )
    train.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard logs to DIR")
    train.add_argument(
        "--tasks", metavar="FILE", help="train every adapter a JSON tasks file lists"
    )
    train.add_argument("--ray", action="store_true", help="with --tasks: one Ray task per adapter")
    train.add_argument(
        "--address", default=None, help="with --ray: a running cluster (auto or HOST:6379)"
    )
    train.add_argument(
        "--task-cpus", type=float, default=1.0, help="with --ray: CPUs per task (default: 1)"
    )
    train.add_argument(
        "--num-cpus", type=int, default=None, help="with --ray: a local cluster's CPUs"
    )
    train.set_defaults(run=_train)


def _add_evaluate_parser(commands, parents) -> None:
    from .training.settings import DEFAULT_MAX_PIXELS

    evaluate = commands.add_parser(
        "evaluate",
        parents=[parents["store"], parents["json"]],
        help="accuracy, per-class precision/recall and confusion of an adapter on labelled images",
    )
    evaluate.add_argument("--name", required=True, help="the adapter's name in the store")
    evaluate.add_argument(
        "--data", required=True, help="a folder with one folder of images per class (its labels)"
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    evaluate.add_argument(
        "--strict", action="store_true", help="refuse unreadable or non-image files"
    )
    evaluate.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images"
    )
    evaluate.set_defaults(run=_evaluate)


_COMMANDS = (
    _add_demo_parser,
    _add_serve_parser,
    _add_inspect_parser,
    _add_list_parser,
    _add_export_parser,
    _add_import_peft_parser,
    _add_gc_parser,
    _add_combine_parser,
    _add_train_parser,
    _add_evaluate_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lora-ckpt``: one function per command, parent
    parsers for the flags commands share.

    Returns:
        The parser; ``parse_args`` gives a namespace whose ``run(args)`` runs
        the command and returns its exit code.
    """
    parser = argparse.ArgumentParser(
        prog="lora-ckpt", description="LoRA adapters for TensorFlow vision models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parents = _parents()
    for add in _COMMANDS:
        add(commands, parents)
    return parser


def main(argv=None) -> int:
    """Runs ``lora-ckpt``.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the command's, or 1 with a message on stderr for a LoRAError.
    """
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ log lines (a failed cuInit on a machine without a GPU,
    # oneDNN notes) are not the user's business; its real errors raise in Python.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from .errors import LoRAError

    try:
        return args.run(args)
    except LoRAError as exc:
        print(f"lora-ckpt {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
