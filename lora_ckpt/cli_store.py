"""``lora-ckpt`` commands over a store's adapters: inspect, list, export,
import-peft, gc, combine (each imports what it needs when it runs)."""

import json
import os
import sys

from .state.layout import DEFAULT_STORE

__all__ = [
    "add_combine_parser",
    "add_export_parser",
    "add_gc_parser",
    "add_import_peft_parser",
    "add_inspect_parser",
    "add_list_parser",
]


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


def add_inspect_parser(commands, parents) -> None:
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


def add_list_parser(commands, parents) -> None:
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


def add_export_parser(commands, parents) -> None:
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


def add_import_peft_parser(commands, parents) -> None:
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


def add_gc_parser(commands, parents) -> None:
    gc = commands.add_parser("gc", help="clean what interrupted saves left in a store")
    gc.add_argument("store", nargs="?", default=DEFAULT_STORE, help="a store or adapter directory")
    gc.set_defaults(run=_gc)


def add_combine_parser(commands, parents) -> None:
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
