"""The ``lora-ckpt`` command: demo, serve, inspect, list, export, import-peft, gc,
combine, train, evaluate.

One ``_add_<command>_parser`` function per command builds its flags, and one
function runs it. Nothing heavy is imported at module level (no TensorFlow,
tfimm, numpy-heavy serving code or web framework): each command imports what
it needs when it runs, so ``lora-ckpt --help`` answers at once.
"""

import argparse
import os
import sys

from . import cli_store, cli_train
from .state.layout import DEFAULT_STORE

__all__ = ["DEFAULT_STORE", "build_parser", "main"]


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


_COMMANDS = (
    _add_demo_parser,
    _add_serve_parser,
    cli_store.add_inspect_parser,
    cli_store.add_list_parser,
    cli_store.add_export_parser,
    cli_store.add_import_peft_parser,
    cli_store.add_gc_parser,
    cli_store.add_combine_parser,
    cli_train.add_train_parser,
    cli_train.add_evaluate_parser,
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
