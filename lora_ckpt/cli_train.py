"""``lora-ckpt train`` and ``evaluate``: adapters from image folders (each
imports what it needs when it runs)."""

import dataclasses
import json
import sys

__all__ = ["add_evaluate_parser", "add_train_parser"]


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


def add_train_parser(commands, parents) -> None:
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


def add_evaluate_parser(commands, parents) -> None:
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
