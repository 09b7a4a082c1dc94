"""Real images that a package ships: scikit-learn's handwritten digits
(``load_digits``, 8x8 grey levels 0-16, inside the package: nothing is
downloaded), written out as a class-per-folder PNG tree."""

import os

import numpy as np
from PIL import Image

from lora_ckpt import tf  # TensorFlow with Keras 2, before tfimm imports it


def write_digits(
    root: str, classes=(0, 1, 2, 3), per_class: int | None = None, start: int = 0
) -> list[str]:
    """Writes ``root/<digit>/<index>.png`` for each digit of ``classes``.

    Args:
        root: The folder to create.
        classes: Which digits (each a class folder named by the digit).
        per_class: How many images per class (default: all of them, ~180),
            taken in the data set's order from the ``start``-th of each class.

    Returns:
        The class folder names, sorted (the labels training gives them).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in classes:
        folder = os.path.join(root, str(digit))
        os.makedirs(folder, exist_ok=True)
        indices = np.flatnonzero(digits.target == digit)[start:]
        if per_class is not None:
            indices = indices[:per_class]
        for i in indices:
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    return sorted(str(d) for d in classes)


def split_digits(root: str, classes=(0, 1, 2, 3), train: int = 120) -> tuple[str, str]:
    """``root/train`` (the first ``train`` images of each digit) and ``root/val`` (the rest)."""
    write_digits(os.path.join(root, "train"), classes, per_class=train)
    write_digits(os.path.join(root, "val"), classes, start=train)
    return os.path.join(root, "train"), os.path.join(root, "val")


def make_training_store(path: str, taken=(), seed: int = 0) -> str:
    """A tiny store like :func:`tests.helpers.scale.make_tiny_store` (the same
    untrained tiny ConvNeXt base, 32x32 inputs) with the demo's LoRA fields:
    the head trained in full, so the service serves each adapter's own head.
    ``taken``: names of adapters saved there untrained.
    """
    import tfimm

    from lora_ckpt.demo import LORA
    from lora_ckpt.serving.store import adapter_path, build_base_model, write_base
    from lora_ckpt.state import save_lora_state
    from tests.helpers.scale import CONFIG, MODEL

    tf.keras.utils.set_random_seed(seed)
    base = tfimm.create_model(
        MODEL, **{k: tuple(v) if isinstance(v, list) else v for k, v in CONFIG.items()}
    )
    write_base(path, MODEL, CONFIG, LORA, base)
    for name in taken:
        model, _ = build_base_model(path)
        save_lora_state(model, adapter_path(path, name), labels=[f"c{i}" for i in range(4)])
    return path
