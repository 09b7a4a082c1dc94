"""The end-to-end demo: one base, three task adapters, served from one pool.

1. Trains a small tfimm ConvNeXt base on a generated pretext task.
2. Trains one LoRA adapter per task (colour, stripes, size) on that base,
   with a classifier head of the task's own width trained in full, saving
   each (head and class names included) as an adapter directory in the store.
3. Loads the adapters into an AdapterPool and answers requests for each,
   comparing with the base alone, and prints a table.

Nothing is downloaded: the images are generated (lora_ckpt.synthetic).
"""

import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from ._tf import tf
from .serving.pool import AdapterPool
from .serving.store import BASE_WEIGHTS, adapter_path, build_base_model, write_base
from .state import save_lora_state
from .state.inspect import inspect_adapter
from .synthetic import TASKS, make_task_dataset

__all__ = ["ADAPTER_TASKS", "LORA", "run_demo"]


MODEL = "convnext_tiny"
PRETEXT_TASK = "quadrant"
ADAPTER_TASKS = ("color", "stripes", "size")
LORA = {
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "lora_layer_groups": ["mlp"],
    "lora_train_bias": "lora_only",
    # Each task has a head of its own width (3 classes on the 4-class base),
    # trained in full and saved with the adapter; the pool serves it per slot.
    "lora_train_classifier": True,
}
LABELS = {
    "color": ["red", "green", "blue"],
    "stripes": ["horizontal", "vertical", "none"],
    "size": ["small", "medium", "large"],
}


def _settings(quick: bool) -> dict:
    if quick:
        return dict(
            config=dict(embed_dim=[8, 16], nb_blocks=[1, 1]),
            base_n=512,
            base_epochs=2,
            task_n=384,
            task_epochs=3,
            test_n=256,
        )
    return dict(
        config=dict(embed_dim=[32, 64, 128], nb_blocks=[1, 1, 2]),
        base_n=3072,
        base_epochs=4,
        task_n=1536,
        task_epochs=5,
        test_n=512,
    )


class _Progress(tf.keras.callbacks.Callback):
    def __init__(self, what: str, log: Callable[[str], None]):
        super().__init__()
        self.what, self.log = what, log

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.log(
            f"  {self.what}: epoch {epoch + 1}/{self.params['epochs']}  "
            f"loss {logs.get('loss', float('nan')):.3f}  accuracy {logs.get('accuracy', float('nan')):.3f}"
        )


def _compile(model, learning_rate):
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _accuracy(logits: np.ndarray, labels: np.ndarray, classes: int) -> float:
    # The base's own head has the pretext task's width: its first classes stand in.
    return float(np.mean(logits[:, :classes].argmax(-1) == labels))


def run_demo(store: str, quick: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Runs the demo and writes its store.

    Args:
        store: Directory for the base and the adapters (replaced adapters are
            overwritten).
        quick: A smaller model and data set, for tests (seconds, not minutes).
        log: Where progress and the table go.

    Returns:
        One row per adapter: ``task``, ``classes``, ``adapter_accuracy``,
        ``base_accuracy``, ``adapter_bytes``, ``base_bytes``, ``load_ms``,
        ``switch_us``.
    """
    import tfimm

    started = time.perf_counter()
    settings = _settings(quick)
    size = 32
    config = dict(
        settings["config"],
        input_size=[size, size],
        nb_classes=max(TASKS.values()),
        init_scale=1.0,
        drop_path_rate=0.0,
    )
    tf.keras.utils.set_random_seed(0)

    log(
        f"[1/3] Training the base {MODEL} (embed_dim={config['embed_dim']}) on the '{PRETEXT_TASK}' task"
    )
    base = tfimm.create_model(
        MODEL, **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    )
    x, y = make_task_dataset(PRETEXT_TASK, settings["base_n"], size, seed=1)
    _compile(base, 3e-3).fit(
        x,
        y,
        batch_size=64,
        epochs=settings["base_epochs"],
        verbose=0,
        callbacks=[_Progress("base", log)],
    )
    write_base(store, MODEL, config, LORA, base)

    log(f"[2/3] Training one LoRA adapter per task: {', '.join(ADAPTER_TASKS)}")
    for i, task in enumerate(ADAPTER_TASKS):
        model, _ = build_base_model(store, overrides={"nb_classes": TASKS[task]})
        x, y = make_task_dataset(task, settings["task_n"], size, seed=10 + i)
        _compile(model, 1e-2).fit(
            x,
            y,
            batch_size=32,
            epochs=settings["task_epochs"],
            verbose=0,
            callbacks=[_Progress(task, log)],
        )
        save_lora_state(
            model,
            adapter_path(store, task),
            overwrite=True,
            metadata={"task": task, "classes": TASKS[task]},
            labels=LABELS[task],
        )

    log("[3/3] Serving every adapter from one AdapterPool on one base model")
    model, _ = build_base_model(store)
    pool = AdapterPool(
        model,
        capacity=len(ADAPTER_TASKS),
        max_rank=LORA["lora_rank"],
        max_classes=max(TASKS[task] for task in (PRETEXT_TASK, *ADAPTER_TASKS)),
    )
    base_bytes = os.path.getsize(os.path.join(store, BASE_WEIGHTS))
    rows = []
    for i, task in enumerate(ADAPTER_TASKS):
        path = adapter_path(store, task)
        start = time.perf_counter()
        pool.load(task, path)
        load_ms = (time.perf_counter() - start) * 1e3
        x, y = make_task_dataset(task, settings["test_n"], size, seed=100 + i)
        switch = []
        for _ in range(200):
            start = time.perf_counter()
            pool.activate(task)
            switch.append(time.perf_counter() - start)
        rows.append(
            {
                "task": task,
                "classes": pool.classes(task),  # the width of the head it serves
                "adapter_accuracy": _accuracy(pool.predict(x), y, TASKS[task]),
                "base_accuracy": _accuracy(pool.predict(x, adapter="off"), y, TASKS[task]),
                "adapter_bytes": inspect_adapter(path)["size_bytes"],
                "base_bytes": base_bytes,
                "load_ms": load_ms,
                "switch_us": statistics.median(switch) * 1e6,
            }
        )

    log("")
    log(
        f"{'adapter':<9} {'classes':>7} {'accuracy':>9} {'base only':>9} {'adapter size':>13} "
        f"{'vs full model':>13} {'load':>9} {'switch':>9}"
    )
    for row in rows:
        log(
            f"{row['task']:<9} {row['classes']:>7} {row['adapter_accuracy']:>9.3f} {row['base_accuracy']:>9.3f} "
            f"{row['adapter_bytes']:>11,} B {100 * row['adapter_bytes'] / row['base_bytes']:>12.1f}% "
            f"{row['load_ms']:>6.1f} ms {row['switch_us']:>6.1f} us"
        )
    log("")
    log(
        f"Store: {os.path.abspath(store)} (base {base_bytes:,} B + {len(rows)} adapters). "
        f"Done in {time.perf_counter() - started:.0f} s."
    )
    log(f"Serve it: lora-ckpt serve --store {store}")
    return rows
