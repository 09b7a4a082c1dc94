"""Image folders as ``tf.data`` pipelines of model inputs, preprocessed as the service does.

Training batches come from a per-epoch order drawn from ``(seed, epoch)``:
a run resumed at epoch ``k`` sees the same batches as one that never
stopped, and each epoch's batches never mix with the next one's.
"""

import numpy as np

from .._tf import tf
from ..preprocessing import preprocess_image
from .folders import ImageFolder

__all__ = ["epoch_order", "ordered_batches", "training_batches"]


def _loader(folder: ImageFolder, shape):
    paths = tf.constant(folder.files)
    labels = tf.constant(np.asarray(folder.labels, dtype=np.int32))

    def load(index):
        image = preprocess_image(tf.io.read_file(paths[index]), shape)
        image.set_shape(shape)
        return image, labels[index]

    return load


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training images in ``epoch`` (0-based) of a run seeded ``seed``."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def training_batches(
    folder: ImageFolder, shape, batch_size: int, seed: int, first_epoch: int, epochs: int
) -> tuple[tf.data.Dataset, int]:
    """The training batches of epochs ``first_epoch`` .. ``epochs - 1``, one after another.

    Args:
        folder: The training images.
        shape: The model's input shape ``(height, width, channels)``.
        batch_size: Images per batch (an epoch's last batch may be smaller).
        seed, first_epoch, epochs: Which epochs' orders (:func:`epoch_order`).

    Returns:
        ``(dataset, steps_per_epoch)`` for ``fit(..., steps_per_epoch=...)``.
    """
    size = len(folder.files)
    orders = np.stack([epoch_order(size, seed, e) for e in range(first_epoch, epochs)])
    load = _loader(folder, tuple(shape))

    def one_epoch(order):
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
        )

    dataset = tf.data.Dataset.from_tensor_slices(orders).flat_map(one_epoch)
    return dataset.prefetch(2), -(-size // batch_size)


def ordered_batches(folder: ImageFolder, shape, batch_size: int) -> tf.data.Dataset:
    """Every image of ``folder`` once, in its order (validation, evaluation)."""
    load = _loader(folder, tuple(shape))
    indices = tf.data.Dataset.range(len(folder.files))
    return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)
