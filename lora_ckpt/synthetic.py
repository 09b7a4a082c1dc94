"""Small labelled image tasks the project generates itself (no downloads).

Each task draws noisy images whose label is a visual property, so a small
model learns it in a few steps and different tasks need different
adapters on one shared base:

- ``"quadrant"``: which quadrant holds a bright square (4 classes);
- ``"color"``: which colour channel dominates a blob (3 classes);
- ``"stripes"``: horizontal, vertical or no stripes (3 classes);
- ``"size"``: whether a bright disc is small, medium or large (3 classes).
"""

import numpy as np

from .errors import LoRAConfigError

__all__ = ["TASKS", "make_task_dataset"]


TASKS = {"quadrant": 4, "color": 3, "stripes": 3, "size": 3}


def _quadrant(rng, labels, size):
    images = rng.normal(0.0, 0.3, (len(labels), size, size, 3))
    half, side = size // 2, max(size // 4, 2)
    for image, label in zip(images, labels, strict=True):
        top = (label // 2) * half + rng.integers(0, half - side + 1)
        left = (label % 2) * half + rng.integers(0, half - side + 1)
        image[top : top + side, left : left + side, :] += 2.0
    return images


def _color(rng, labels, size):
    images = rng.normal(0.0, 0.3, (len(labels), size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for image, label in zip(images, labels, strict=True):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
        image[..., label] += 2.0 * blob
    return images


def _stripes(rng, labels, size):
    images = rng.normal(0.0, 0.3, (len(labels), size, size, 3))
    coords = np.arange(size)
    for image, label in zip(images, labels, strict=True):
        period = rng.integers(3, 6)
        wave = (np.sin(2 * np.pi * coords / period + rng.uniform(0, 2 * np.pi)) > 0) * 1.5
        if label == 0:
            image += wave[:, None, None]
        elif label == 1:
            image += wave[None, :, None]
    return images


def _size(rng, labels, size):
    images = rng.normal(0.0, 0.3, (len(labels), size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    radii = np.array([0.1, 0.2, 0.33]) * size
    for image, label in zip(images, labels, strict=True):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radii[label] ** 2] += 1.5
    return images


_MAKERS = {"quadrant": _quadrant, "color": _color, "stripes": _stripes, "size": _size}


def make_task_dataset(
    task: str, n: int, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generates ``n`` labelled images of a synthetic task.

    Args:
        task: One of ``"quadrant"``, ``"color"``, ``"stripes"``.
        n: Number of images.
        image_size: Height and width in pixels.
        seed: Seed of the generator; the same seed gives the same data.

    Returns:
        ``(images, labels)``: float32 ``[n, size, size, 3]`` and int32 ``[n]``.

    Raises:
        LoRAConfigError: For an unknown task.
    """
    if task not in _MAKERS:
        raise LoRAConfigError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}.")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, TASKS[task], n)
    images = _MAKERS[task](rng, labels, image_size)
    return images.astype(np.float32), labels.astype(np.int32)
