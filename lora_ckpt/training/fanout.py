"""Many adapters from one tasks file: one after another, or one Ray task each.

A tasks file is JSON, a list of tasks (or ``{"tasks": [...]}``); each task
is ``{"name", "data", "val_data"?, "overwrite"?, ...}`` plus any
:class:`~lora_ckpt.training.settings.TrainSettings` field (``epochs``,
``rank``, ...), which wins over the command line's. Relative folders are
relative to the tasks file. Every task saves into the same store (an
``s3://`` store when tasks run on several machines; their folders must be
readable where they run). A failed task is reported and the others go on.
"""

import json
import os
import time
import traceback

from ..errors import LoRAConfigError, LoRAError
from .settings import TrainSettings

__all__ = ["read_tasks", "run_tasks", "run_tasks_file", "run_tasks_on_ray", "summary_table"]


MAX_TASKS_BYTES = 4 << 20
_TASK_KEYS = {"name", "data", "val_data", "overwrite"}


def read_tasks(path: str, defaults: dict | None = None) -> list[dict]:
    """The tasks of a tasks file, each checked: ``{"name", "data", "val_data",
    "overwrite", "settings": {...}}``.

    Args:
        path: The JSON file.
        defaults: Settings for every task that does not set its own.

    Raises:
        LoRAConfigError: For a file that is not a list of tasks, a task
            without ``name`` or ``data``, a duplicate name, or an invalid setting.
    """
    try:
        if os.path.getsize(path) > MAX_TASKS_BYTES:
            raise LoRAConfigError(f"{path} is larger than {MAX_TASKS_BYTES} bytes.")
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as exc:
        raise LoRAConfigError(f"Cannot read the tasks file {path}: {exc}.") from None
    tasks = document.get("tasks") if isinstance(document, dict) else document
    if not isinstance(tasks, list) or not tasks:
        raise LoRAConfigError(
            f"{path} must hold a JSON list of tasks, e.g. "
            '[{"name": "cats", "data": "cats/train", "val_data": "cats/val"}].'
        )
    here = os.path.dirname(os.path.abspath(path))
    checked, names = [], set()
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("name"), str):
            raise LoRAConfigError(f'Task {i} of {path} needs a "name".')
        if not isinstance(task.get("data"), str):
            raise LoRAConfigError(f'Task {task["name"]} of {path} needs "data": its image folder.')
        if task["name"] in names:
            raise LoRAConfigError(f"Task name {task['name']} appears twice in {path}.")
        names.add(task["name"])
        fields = {k: v for k, v in task.items() if k not in _TASK_KEYS}
        settings = TrainSettings.from_dict({**(defaults or {}), **fields})
        val_data = task.get("val_data")
        checked.append(
            {
                "name": task["name"],
                "data": os.path.join(here, task["data"]),
                "val_data": None if val_data is None else os.path.join(here, str(val_data)),
                "overwrite": bool(task.get("overwrite", False)),
                "settings": settings.to_dict(),
            }
        )
    return checked


def _run_task(store: str, task: dict, resume: bool = False, log=None, progress=False) -> dict:
    """Trains one task; never raises for the task's own failure.

    Returns:
        A summary row: ``name``, ``status`` (``"ok"`` / ``"failed"``),
        ``epochs``, ``best_epoch``, ``val_accuracy``, ``seconds``, ``error``.
    """
    from .train import train_adapter

    started = time.monotonic()
    row = {"name": task["name"], "status": "failed", "epochs": None, "best_epoch": None}
    row.update(val_accuracy=None, error=None, host=os.uname().nodename)
    try:
        result = train_adapter(
            store,
            task["name"],
            task["data"],
            task["val_data"],
            settings=TrainSettings.from_dict(task["settings"]),
            overwrite=task["overwrite"],
            resume=resume,
            log=log,
            progress=progress,
        )
        row.update(
            status="ok",
            epochs=result.epochs,
            best_epoch=result.best_epoch,
            val_accuracy=result.val_accuracy,
        )
    except LoRAError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # one task's bug or crash must not stop the others
        row["error"] = f"{type(exc).__name__}: {exc} ({traceback.format_exc(limit=-1).strip()})"
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def _ray_worker(store: str, task: dict, resume: bool, cpus: float) -> dict:
    # A fresh worker process per task (max_calls=1): TensorFlow's thread pools
    # are sized to the task's CPUs before TensorFlow starts.
    from .._tf import tf

    threads = max(1, int(cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # already initialised in this worker: keep its pools
    return _run_task(store, task, resume=resume)


def run_tasks_on_ray(
    store: str,
    tasks: list[dict],
    *,
    address: str | None = None,
    task_cpus: float = 1.0,
    num_cpus: int | None = None,
    resume: bool = False,
    log=print,
) -> list[dict]:
    """One Ray task per adapter, on a local cluster (started and stopped here)
    or the cluster at ``address``.

    Args:
        store: The store every task saves into.
        tasks: From :func:`read_tasks`.
        address: ``auto`` or ``HOST:PORT`` of a running cluster; ``None``
            starts a local one of ``num_cpus`` CPUs (default: this machine's).
        task_cpus: Ray CPUs each task reserves (and TensorFlow threads it uses).
        resume: Continue each task from its training checkpoint.
        log: Where a line per finished task goes.

    Returns:
        One summary row per task, in the tasks' order.

    Raises:
        LoRAConfigError: If Ray is not installed or ``task_cpus`` is not positive.
    """
    try:
        import ray
    except ImportError:
        raise LoRAConfigError(
            "--ray needs Ray: install the scale extra with `pip install 'lora_ckpt[scale]'`."
        ) from None
    if not task_cpus > 0:
        raise LoRAConfigError(f"CPUs per task must be positive, got {task_cpus}.")
    from ..serving.ray_app import forwarded_environment

    env = forwarded_environment()
    if address is None:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            # Tasks pass only small rows back: a bounded object store, not 30% of RAM.
            object_store_memory=256 << 20,
            runtime_env={"env_vars": env} if env else None,
        )
    else:
        ray.init(
            address=address, log_to_driver=False, runtime_env={"env_vars": env} if env else None
        )
    try:
        remote = ray.remote(num_cpus=task_cpus, max_calls=1, max_retries=0)(_ray_worker)
        pending = {remote.remote(store, task, resume, task_cpus): task for task in tasks}
        rows = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                row = ray.get(done[0])
            except Exception as exc:  # the worker died (killed, out of memory)
                row = {"name": task["name"], "status": "failed", "epochs": None}
                row.update(best_epoch=None, val_accuracy=None, seconds=None, host=None)
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
            rows[task["name"]] = row
            if log:
                log(
                    f"  {row['name']}: {row['status']}"
                    + (f" ({row['error']})" if row["error"] else "")
                )
        return [rows[task["name"]] for task in tasks]
    finally:
        ray.shutdown()


def run_tasks(
    store: str, tasks: list[dict], *, resume: bool = False, log=print, progress=None
) -> list[dict]:
    """The tasks one after another in this process (a failed one is reported, the next runs).

    Returns:
        One summary row per task.
    """
    rows = []
    for i, task in enumerate(tasks):
        if log:
            log(f"[{i + 1}/{len(tasks)}] {task['name']}")
        rows.append(_run_task(store, task, resume=resume, log=log, progress=progress))
        if log and rows[-1]["error"]:
            log(f"  {task['name']} failed: {rows[-1]['error']}")
    return rows


def summary_table(rows: list[dict]) -> str:
    """The rows as a table: adapter, status, epochs, best epoch, validation accuracy, time."""
    lines = [
        f"{'adapter':<20} {'status':<7} {'epochs':>6} {'best':>5} {'val_acc':>8} {'time':>8}  error"
    ]
    for row in rows:
        accuracy = "" if row.get("val_accuracy") is None else f"{row['val_accuracy']:.3f}"
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f}s"
        lines.append(
            f"{row['name']:<20} {row['status']:<7} {row.get('epochs') or '':>6} "
            f"{row.get('best_epoch') or '':>5} {accuracy:>8} {seconds:>8}  {row.get('error') or ''}"
        )
    ok = sum(row["status"] == "ok" for row in rows)
    lines.append(f"{ok} of {len(rows)} adapter(s) trained.")
    return "\n".join(lines)


def run_tasks_file(
    store: str,
    path: str,
    defaults: dict,
    *,
    ray: dict | None = None,
    resume: bool = False,
    log=print,
) -> list[dict]:
    """``lora-ckpt train --tasks FILE``: reads the file, runs its tasks, logs the summary table.

    Args:
        store: The store every task saves into.
        path: The tasks file (:func:`read_tasks`).
        defaults: Settings for tasks that do not set their own.
        ray: ``None`` to run the tasks one after another here; else the
            keyword arguments of :func:`run_tasks_on_ray` (``address``,
            ``task_cpus``, ``num_cpus``).
        resume: Continue each task from its training checkpoint.
        log: Where progress lines and the table go.

    Returns:
        One summary row per task.

    Raises:
        LoRAConfigError: For a tasks file that cannot be used (nothing runs then).
    """
    tasks = read_tasks(path, defaults)
    if ray is not None:
        log(f"Training {len(tasks)} adapter(s) as Ray tasks ({ray.get('task_cpus', 1):g} CPU each)")
        rows = run_tasks_on_ray(store, tasks, resume=resume, log=log, **ray)
    else:
        rows = run_tasks(store, tasks, resume=resume, log=log)
    log(summary_table(rows))
    return rows
