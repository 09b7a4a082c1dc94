"""Training checkpoints of the adapter alone: resume LoRA training where it stopped.

A training checkpoint holds the adapter variables, the optimizer state of
those variables (the optimizer only ever tracks what it trains) and the
epoch. :class:`AdapterCheckpointManager` keeps the last N in a directory
TensorFlow writes to (``tf.train.CheckpointManager``);
:class:`StoreTrainingCheckpoint` keeps the latest one in any store of
:mod:`lora_ckpt.storage` (``s3://``, ``memory://``, local), with the best
weights so far and the caller's progress record. Export the finished
adapter with :func:`save_lora_state`.
"""

import contextlib
import hashlib
import io
import json
import uuid
from collections.abc import Iterable

import numpy as np

from .._tf import tf
from ..errors import StoreError, TrainingCheckpointError
from ..selection import select_state
from ..storage import UnsafeFileError, open_store
from ..storage.base import new_tag
from .format import CHECKPOINT_ROOT, checkpoint_files, nest_variables

__all__ = [
    "AdapterCheckpoint",
    "AdapterCheckpointManager",
    "StoreTrainingCheckpoint",
    "restore_training_checkpoint",
]


class AdapterCheckpointManager:
    """Keeps the last ``max_to_keep`` training checkpoints of a LoRA model.

    Args:
        model: The LoRA model being trained.
        directory: Where checkpoints are written (``ckpt-<epoch>`` files).
        optimizer: The optimizer whose state to keep; defaults to
            ``model.optimizer`` (compile the model first).
        max_to_keep: How many checkpoints to keep.
        include_bias, extra_layers: As for :func:`save_lora_state`.
    """

    def __init__(
        self,
        model: tf.keras.Model,
        directory: str,
        optimizer=None,
        max_to_keep: int = 3,
        include_bias: str | None = None,
        extra_layers: Iterable[str] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        selection = select_state(model, include_bias, extra_layers)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        parts = {CHECKPOINT_ROOT: nest_variables(selection.variables), "epoch": self.epoch}
        if self.optimizer is not None:
            parts["optimizer"] = self.optimizer
        self.checkpoint = tf.train.Checkpoint(**parts)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(directory), max_to_keep=max_to_keep
        )

    @property
    def checkpoints(self):
        """Paths of the kept checkpoints, oldest first."""
        return list(self.manager.checkpoints)

    def save(self, epoch: int) -> str:
        """Writes a checkpoint for the end of ``epoch`` (1-based); returns its path."""
        self.epoch.assign(epoch)
        return self.manager.save(checkpoint_number=epoch)

    def restore(self, path: str | None = None) -> int:
        """Restores the latest (or the given) checkpoint.

        Args:
            path: A checkpoint path; defaults to the latest one.

        Returns:
            The epoch it was saved at: pass it as ``initial_epoch`` to ``fit``.
            ``0`` if there is no checkpoint yet.

        Raises:
            TrainingCheckpointError: If ``path`` is given and does not exist.
        """
        path = path or self.manager.latest_checkpoint
        if path is None:
            return 0
        if not tf.io.gfile.exists(path + ".index"):
            raise TrainingCheckpointError(f"No training checkpoint at {path}.")
        # Optimizer slots that do not exist yet are restored by TensorFlow
        # when the first training step creates them: expected, so not warned about.
        self.checkpoint.read(path).assert_existing_objects_matched().expect_partial()
        return int(self.epoch.numpy())


class AdapterCheckpoint(tf.keras.callbacks.Callback):
    """Keras callback: a training checkpoint of the adapter after every epoch.

    Resume after a restart with :func:`restore_training_checkpoint` and
    ``fit(..., initial_epoch=epoch)``.

    Args:
        directory: Where checkpoints are written.
        max_to_keep: How many to keep.
        include_bias, extra_layers: As for :func:`save_lora_state`.
    """

    def __init__(self, directory: str, max_to_keep: int = 3, include_bias=None, extra_layers=None):
        super().__init__()
        self.directory = str(directory)
        self.max_to_keep = max_to_keep
        self.include_bias = include_bias
        self.extra_layers = extra_layers
        self.manager: AdapterCheckpointManager | None = None

    def on_train_begin(self, logs=None):
        self.manager = AdapterCheckpointManager(
            self.model,
            self.directory,
            max_to_keep=self.max_to_keep,
            include_bias=self.include_bias,
            extra_layers=self.extra_layers,
        )

    def on_epoch_end(self, epoch, logs=None):
        self.manager.save(epoch + 1)


def restore_training_checkpoint(
    model: tf.keras.Model, directory: str, optimizer=None, **selection
) -> int:
    """Restores a LoRA model (and its optimizer) from its latest training checkpoint.

    Args:
        model: The LoRA model, built from the same base (and compiled, if the
            optimizer state is to be restored).
        directory: The directory an :class:`AdapterCheckpoint` wrote to.
        optimizer: Defaults to ``model.optimizer``.
        **selection: ``include_bias`` / ``extra_layers`` used when saving.

    Returns:
        The epoch to resume from (``0`` if there is no checkpoint).
    """
    return AdapterCheckpointManager(model, directory, optimizer=optimizer, **selection).restore()


PROGRESS_FILE = "progress.json"
"""The commit file of a :class:`StoreTrainingCheckpoint`: written last, names the rest."""
_MAX_PROGRESS_BYTES = 16 << 20
_MAX_CHECKPOINT_BYTES = 16 << 30


def _plain_name(name) -> bool:
    return (
        isinstance(name, str)
        and "/" not in name
        and "\\" not in name
        and name not in ("", ".", "..")
    )


def _valid_record(record) -> bool:
    """Whether a progress record has its fields, and names only files beside it."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("files"), dict)
        and isinstance(record.get("state"), dict)
        and all(_plain_name(name) for name in record["files"])
        and _plain_name(record.get("prefix"))
        and all(name in record["files"] for name in checkpoint_files(record["prefix"]))
        and (record.get("best") is None or record["best"] in record["files"])
    )


@contextlib.contextmanager
def _scratch():
    # TensorFlow writes checkpoints through its own file systems only: its
    # in-memory one stands between a checkpoint and any store.
    directory = f"ram://lora_ckpt-training/{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(directory)
    try:
        yield directory
    finally:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.rmtree(directory)


class StoreTrainingCheckpoint:
    """The latest training checkpoint of a LoRA model, in any store.

    ``DIRECTORY/progress.json`` is the commit: written last, it names the
    checkpoint files (with sizes and SHA-256) written before it under a fresh
    tag, so a run killed at any moment leaves the previous checkpoint whole.

    Args:
        model: The LoRA model being trained (compiled, for its optimizer).
        directory: The checkpoint directory or URL.
        include_bias, extra_layers: As for :func:`save_lora_state`.
    """

    def __init__(self, model, directory: str, include_bias=None, extra_layers=None):
        self.model = model
        self.backend, self.directory = open_store(directory)
        self.selection = select_state(model, include_bias, extra_layers)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        parts = {CHECKPOINT_ROOT: nest_variables(self.selection.variables), "epoch": self.epoch}
        self.optimizer = getattr(model, "optimizer", None)
        if self.optimizer is not None:
            parts["optimizer"] = self.optimizer
        self.checkpoint = tf.train.Checkpoint(**parts)

    def _path(self, name: str) -> str:
        return self.backend.join(self.directory, name)

    def _committed(self) -> dict | None:
        try:
            raw = self.backend.read(self._path(PROGRESS_FILE), _MAX_PROGRESS_BYTES)
        except FileNotFoundError:
            return None
        except UnsafeFileError as exc:
            raise StoreError(f"{self._path(PROGRESS_FILE)}: {exc}") from None
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            record = None
        if not _valid_record(record):
            raise StoreError(
                f"{self._path(PROGRESS_FILE)} is not a training checkpoint record: remove "
                f"{self.directory} to start over."
            )
        return record

    def save(self, epoch: int, state: dict, best: dict[str, np.ndarray] | None = None) -> None:
        """Commits the checkpoint for the end of ``epoch`` (1-based).

        Args:
            epoch: Epochs finished.
            state: The caller's progress record (JSON), returned by :meth:`restore`.
            best: Arrays to keep beside it (the best weights so far), by key.
        """
        previous = self._committed()
        tag = new_tag()
        prefix = f"ckpt-{tag}"
        self.epoch.assign(epoch)
        files = {}
        with _scratch() as scratch:
            self.checkpoint.write(f"{scratch}/{prefix}")
            for name in checkpoint_files(prefix):
                with tf.io.gfile.GFile(f"{scratch}/{name}", "rb") as handle:
                    files[name] = handle.read()
        best_name = None
        if best is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **best)
            best_name = f"best-{tag}.npz"
            files[best_name] = buffer.getvalue()
        for name, data in files.items():
            self.backend.write(self._path(name), data)
        record = {
            "format": "lora_ckpt.training_checkpoint",
            "epoch": int(epoch),
            "prefix": prefix,
            "best": best_name,
            "files": {
                name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in files.items()
            },
            "state": state,
        }
        self.backend.write(self._path(PROGRESS_FILE), json.dumps(record).encode())
        for name in (previous or {}).get("files", {}):
            if name not in files:
                self.backend.remove_file(self._path(name))

    def restore(self) -> tuple[int, dict, dict[str, np.ndarray] | None] | None:
        """Restores the model and optimizer from the committed checkpoint.

        Returns:
            ``(epoch, state, best)`` as saved, or ``None`` if there is none.

        Raises:
            StoreError: If the checkpoint is damaged or belongs to
                another model (nothing of the model is changed then).
        """
        record = self._committed()
        if record is None:
            return None
        files = {}
        for name, info in record["files"].items():
            try:
                files[name] = self.backend.read_verified(
                    self._path(name), int(info["size"]), str(info["sha256"])
                )
            except (
                FileNotFoundError,
                UnsafeFileError,
                StoreError,
                KeyError,
                TypeError,
                ValueError,
            ) as exc:
                raise StoreError(
                    f"The training checkpoint in {self.directory} is damaged ({exc}): remove it "
                    "to start over."
                ) from None
        if self.optimizer is not None and hasattr(self.optimizer, "build"):
            # Slots exist before the restore, so every saved value finds its variable now.
            self.optimizer.build(self.model.trainable_variables)
        prefix = record["prefix"]
        with _scratch() as scratch:
            for name in checkpoint_files(prefix):
                with tf.io.gfile.GFile(f"{scratch}/{name}", "wb") as handle:
                    handle.write(files[name])
            try:
                self.checkpoint.read(f"{scratch}/{prefix}").assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as exc:
                raise StoreError(
                    f"The training checkpoint in {self.directory} does not fit this model "
                    f"({exc!s:.200}): remove it to start over, or train with the same settings."
                ) from None
        best = None
        if record.get("best"):
            with np.load(io.BytesIO(files[record["best"]]), allow_pickle=False) as arrays:
                best = {key: arrays[key] for key in arrays.files}
        return int(self.epoch.numpy()), record["state"], best

    def state(self) -> dict | None:
        """The committed progress record alone (no model change), or ``None``."""
        record = self._committed()
        return None if record is None else record["state"]

    def clear(self) -> None:
        """Removes the checkpoint directory (after the adapter is saved)."""
        self.backend.remove(self.directory)
