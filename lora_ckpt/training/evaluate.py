"""How well an adapter classifies labelled images: accuracy, per-class
precision and recall, the confusion matrix."""

import numpy as np

from .._tf import tf
from ..errors import LoRAConfigError
from ..serving.store import adapter_path, store_base_weights
from ..state import from_adapter, read_config
from .datasets import ordered_batches
from .folders import scan_folder
from .model import input_shape
from .settings import DEFAULT_MAX_PIXELS

__all__ = ["classification_report", "evaluate_adapter", "format_evaluation", "predict_batches"]


def classification_report(labels, logits, classes: list[str]) -> dict:
    """Accuracy, loss, per-class precision/recall/support and the confusion matrix.

    Args:
        labels: True class indices, ``[n]``.
        logits: The model's outputs, ``[n, classes]``.
        classes: Class names, by index.

    Returns:
        ``{"accuracy", "loss", "images", "per_class": {name: {"precision",
        "recall", "support"}}, "confusion": rows = true class, columns =
        predicted, "labels"}``; a precision with no prediction of its class is
        ``None``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    predicted = logits.argmax(axis=-1)
    size = len(classes)
    confusion = np.zeros((size, size), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    per_class = {}
    for i, name in enumerate(classes):
        hits, predicted_i, support = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        per_class[name] = {
            "precision": float(hits / predicted_i) if predicted_i else None,
            "recall": float(hits / support) if support else None,
            "support": int(support),
        }
    return {
        "accuracy": float(np.trace(confusion) / max(len(labels), 1)),
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else None,
        "images": int(len(labels)),
        "labels": list(classes),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def predict_batches(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` over a dataset of ``(images, labels)`` batches."""
    labels, logits = [], []
    forward = tf.function(lambda x: model(x, training=False))
    for images, batch_labels in dataset:
        logits.append(forward(images).numpy())
        labels.append(np.asarray(batch_labels))
    if not logits:
        return np.zeros((0,), np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(labels), np.concatenate(logits)


def evaluate_adapter(
    store: str,
    name: str,
    data,
    *,
    batch_size: int = 64,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Evaluates a store's adapter on labelled images.

    Args:
        store: The adapter store (directory or URL).
        name: The adapter's name.
        data: A class-per-folder directory whose folder names are among the
            adapter's labels, or a ``tf.data.Dataset`` of ``(images,
            labels)`` batches of model inputs (preprocessed as the service
            does: :func:`lora_ckpt.preprocessing.preprocess_image`).
        batch_size: Images per forward pass (folders).
        strict: Refuse unreadable or non-image files instead of skipping them.
        max_pixels: Refuse images with more pixels.

    Returns:
        :func:`classification_report`'s dict, plus ``"adapter"`` and
        ``"skipped"`` (the files left out and why).

    Raises:
        AdapterNotFoundError, CorruptAdapterError: For a missing or broken adapter.
        StoreError: For a store or image folder that cannot be used.
        LoRAConfigError: If the adapter has no labels and ``data`` is a folder.
    """
    path = adapter_path(store, name)
    _, config = read_config(path)
    labels = (config.metadata or {}).get("labels")
    model = from_adapter(path, base_weights=store_base_weights(store))
    skipped = {}
    if isinstance(data, tf.data.Dataset):
        classes, dataset = labels, data
    else:
        if not labels:
            raise LoRAConfigError(
                f"Adapter {name} has no labels, so its classes cannot be matched with folder "
                "names: evaluate it on a tf.data dataset of integer labels."
            )
        folder = scan_folder(
            str(data), max_pixels=max_pixels, strict=strict, classes=labels, min_classes=1
        )
        classes, skipped = labels, folder.skipped
        dataset = ordered_batches(folder, input_shape(model), batch_size)
    true, logits = predict_batches(model, dataset)
    if not classes:
        classes = [str(i) for i in range(logits.shape[-1])]
    return {"adapter": name, **classification_report(true, logits, classes), "skipped": skipped}


def format_evaluation(result: dict) -> str:
    """:func:`evaluate_adapter`'s result as text: accuracy, a per-class table, the confusion matrix."""
    lines = [
        f"adapter {result['adapter']}: accuracy {result['accuracy']:.4f} on {result['images']} images"
    ]
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} file(s) that are not usable images")
    width = max(len(label) for label in [*result["labels"], "class"])
    lines.append(f"{'class':<{width}}  precision  recall  support")
    for label, row in result["per_class"].items():
        precision = "-" if row["precision"] is None else f"{row['precision']:.3f}"
        recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        lines.append(f"{label:<{width}}  {precision:>9}  {recall:>6}  {row['support']:>7}")
    lines.append("confusion (rows: true class, columns: predicted):")
    for label, row in zip(result["labels"], result["confusion"], strict=True):
        lines.append(f"{label:<{width}}  " + " ".join(f"{count:>5}" for count in row))
    return "\n".join(lines)
