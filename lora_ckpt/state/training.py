"""Training checkpoints of the adapter alone: resume LoRA training where it stopped.

A training checkpoint holds the adapter variables, the optimizer state of
those variables (the optimizer only ever tracks what it trains) and the
epoch, managed by ``tf.train.CheckpointManager`` so the last N are kept.
Export the finished adapter with :func:`save_lora_state`.
"""

from collections.abc import Iterable

from .._tf import tf
from ..errors import TrainingCheckpointError
from ..selection import select_state
from .format import CHECKPOINT_ROOT, nest_variables


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
