"""A training run's report: ``STORE/reports/NAME/`` with ``metrics.json``,
``curves.png`` (loss and accuracy per epoch, training and validation) and
``confusion.png``.

Reports live outside ``adapters/`` (whose adapter directories hold their
files and nothing else) and are written through the store, so they land
beside the adapter in an ``s3://`` store too. Figures are drawn by
matplotlib's Agg backend into memory: no display, no local file.
"""

import importlib.util
import io
import json

from ..errors import MissingDependencyError
from ..storage import open_store

__all__ = ["require_report_tools", "write_report"]


REPORTS = "reports"


def _report_path(store: str, name: str) -> str:
    """``STORE/reports/NAME`` in the store's spelling."""
    backend, store = open_store(store)
    return backend.join(store, REPORTS, name)


def require_report_tools(tensorboard: bool = False) -> None:
    """Checks, before a run trains, that its report can be drawn (and logged).

    Raises:
        MissingDependencyError: Without matplotlib (or, for TensorBoard logs, tensorboard).
    """
    for package, wanted in (("matplotlib", True), ("tensorboard", tensorboard)):
        if wanted and importlib.util.find_spec(package) is None:
            raise MissingDependencyError(
                f"Training needs {package} for its report: install the train extra with "
                "`pip install 'lora_ckpt[train]'`."
            )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render into memory
    from matplotlib import pyplot

    return pyplot


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def _curves_png(history: list[dict], best_epoch: int | None, title: str = "") -> bytes:
    """Loss and accuracy per epoch, training and validation, as PNG bytes.

    Args:
        history: One dict per epoch: ``epoch``, ``loss``, ``accuracy``,
            ``val_loss``, ``val_accuracy`` (missing values are left out).
        best_epoch: Marked with a dotted line.
        title: Above both panels.
    """
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(1, 2, figsize=(9, 3.6))
    epochs = [row["epoch"] for row in history]
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label, style in (
            (metric, "training", "-o"),
            (f"val_{metric}", "validation", "-s"),
        ):
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if points:
                axis.plot(*zip(*points, strict=True), style, label=label, markersize=4)
        if best_epoch is not None:
            axis.axvline(
                best_epoch, linestyle=":", color="grey", label=f"best epoch ({best_epoch})"
            )
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        if epochs:
            axis.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _png(figure)


def _confusion_png(confusion: list[list[int]], labels: list[str], title: str = "") -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) as PNG bytes."""
    pyplot = _pyplot()
    size = len(labels)
    side = min(12.0, 2.5 + 0.5 * size)
    figure, axis = pyplot.subplots(figsize=(side, side))
    image = axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(size), labels, rotation=45, ha="right")
    axis.set_yticks(range(size), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = max((max(row) for row in confusion), default=0)
    if size <= 30:
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                color = "white" if count > peak / 2 else "black"
                axis.text(j, i, str(count), ha="center", va="center", color=color)
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title(title or "confusion matrix")
    figure.tight_layout()
    return _png(figure)


def write_report(store: str, name: str, metrics: dict) -> str:
    """Writes ``metrics.json``, ``curves.png`` and ``confusion.png`` of a run.

    Args:
        store: The adapter store.
        name: The adapter's name.
        metrics: The run's record: ``history``, ``best_epoch`` and
            ``validation`` (a classification report with ``confusion`` and
            ``labels``), written as ``metrics.json``.

    Returns:
        The report directory.

    Raises:
        StoreError: If the store cannot be written.
    """
    backend, _ = open_store(store)
    directory = _report_path(store, name)
    validation = metrics.get("validation") or {}
    files = {
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "curves.png": _curves_png(metrics["history"], metrics.get("best_epoch"), f"adapter {name}"),
    }
    if validation.get("confusion"):
        title = f"{name}: validation accuracy {validation['accuracy']:.3f}"
        files["confusion.png"] = _confusion_png(
            validation["confusion"], validation["labels"], title
        )
    for file_name, data in files.items():
        backend.write(backend.join(directory, file_name), data)
    return directory
