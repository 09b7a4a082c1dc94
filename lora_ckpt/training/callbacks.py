"""Keras callbacks of a training run: the best epoch kept, early stopping, a
training checkpoint after every epoch, and a progress bar."""

import math
import sys
import time

import numpy as np

from .._tf import tf

__all__ = ["BestEpoch", "ProgressBar", "new_progress"]


HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def new_progress() -> dict:
    """An empty progress record: what a resumed run needs besides the weights."""
    return {"history": [], "best_epoch": None, "best_loss": None, "wait": 0, "stopped": False}


class BestEpoch(tf.keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest validation loss, stops
    after ``patience`` epochs without a better one, and (with ``checkpoint``)
    commits a training checkpoint after every epoch.

    Args:
        variables: The adapter's variables by key (what is saved).
        patience: Epochs without improvement before stopping (``None``: never).
        progress: The progress record (:func:`new_progress`), updated in place.
        best: The best weights so far (a resumed run's), by key.
        checkpoint: A :class:`~lora_ckpt.state.training.StoreTrainingCheckpoint`.
        extra_state: JSON merged into every checkpoint's record (the run's
            settings and data digest, checked on resume).
    """

    def __init__(self, variables, patience, progress, best=None, checkpoint=None, extra_state=None):
        super().__init__()
        self.variables = variables
        self.patience = patience
        self.progress = progress
        self.best = best
        self.checkpoint = checkpoint
        self.extra_state = extra_state or {}
        self.improved = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1}
        row.update({key: float(logs[key]) for key in HISTORY_KEYS if key in logs})
        self.progress["history"].append(row)
        loss = row.get("val_loss", math.nan)
        best_loss = self.progress["best_loss"]
        self.improved = math.isfinite(loss) and (best_loss is None or loss < best_loss)
        if self.improved:
            self.progress.update(best_epoch=epoch + 1, best_loss=loss, wait=0)
            self.best = {key: var.numpy().copy() for key, var in self.variables.items()}
        else:
            self.progress["wait"] += 1
        if self.patience is not None and self.progress["wait"] >= self.patience:
            self.progress["stopped"] = True
            self.model.stop_training = True
        if self.checkpoint is not None:
            self.checkpoint.save(epoch + 1, {**self.extra_state, **self.progress}, self.best)

    def restore_best(self) -> None:
        """Assigns the best epoch's weights (the last epoch's if none was better)."""
        if self.best is not None:
            for key, var in self.variables.items():
                var.assign(self.best[key])


def _seconds(value: float) -> str:
    value = int(round(value))
    return f"{value // 60}:{value % 60:02d}" if value >= 60 else f"{value}s"


class ProgressBar(tf.keras.callbacks.Callback):
    """One line per epoch: a bar with loss, accuracy and ETA while it runs
    (redrawn in place on a terminal), then validation loss and accuracy.

    Args:
        steps: Batches per epoch.
        keeper: The run's :class:`BestEpoch` (marks the best epoch).
        stream: Where to write (default stdout).
        width: Characters of the bar.
    """

    def __init__(self, steps: int, keeper: BestEpoch | None = None, stream=None, width: int = 24):
        super().__init__()
        self.steps, self.keeper, self.width = steps, keeper, width
        self.stream = stream or sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = self.drawn = 0.0

    def _line(self, epoch: int, done: int, logs: dict, tail: str) -> str:
        filled = self.width * done // max(self.steps, 1)
        bar = "=" * filled + (">" if filled < self.width else "") + "." * (self.width - filled - 1)
        metrics = (
            f"loss {logs.get('loss', np.nan):.4f}  accuracy {logs.get('accuracy', np.nan):.3f}"
        )
        return f"epoch {epoch + 1}/{self.params['epochs']} [{bar[: self.width]}] {done}/{self.steps}  {metrics}  {tail}"

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if not self.live or now - self.drawn < 0.1:
            return
        self.drawn = now
        done = batch + 1
        eta = (now - self.started) / done * (self.steps - done)
        self.stream.write(
            "\r" + self._line(self.epoch, done, logs or {}, f"ETA {_seconds(eta)}") + "\x1b[K"
        )
        self.stream.flush()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        tail = (
            f"val_loss {logs.get('val_loss', np.nan):.4f}  val_accuracy "
            f"{logs.get('val_accuracy', np.nan):.3f}  {_seconds(time.monotonic() - self.started)}"
        )
        if self.keeper is not None and self.keeper.improved:
            tail += "  *best"
        prefix = "\r" if self.live else ""
        self.stream.write(
            prefix
            + self._line(epoch, self.steps, logs, tail)
            + ("\x1b[K" if self.live else "")
            + "\n"
        )
        self.stream.flush()
