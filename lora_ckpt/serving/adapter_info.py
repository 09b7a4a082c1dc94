"""What one adapter of a store is, from its config alone: ``GET /adapters/{name}/info``.

No TensorFlow and no load: :func:`lora_ckpt.state.inspect.inspect_adapter`
reads ``adapter_config.json`` (bounded) and lists the checkpoint files to
check their sizes, so a truncated adapter is reported with its reason
before anything tries to load it. Answers never show the store's path.
"""

from ..errors import LoRAError
from ..state.inspect import inspect_adapter
from ..state.layout import adapter_path

__all__ = ["adapter_info"]


def adapter_info(store: str, name: str) -> dict:
    """Summarises adapter ``name`` of ``store`` for the console and any client.

    Args:
        store: The adapter store (any store URL or local path).
        name: The adapter's name (validated: never a path).

    Returns:
        ``{"name", "version" (the config's SHA-256), "format_version",
        "library_version", "created", "size_bytes", "num_parameters",
        "ranks" (distinct, sorted), "dora", "rslora", "classes", "labels",
        "layers" ({layer path: {"rank", ...}}), "saved", "base"
        ({"architecture", "lora_architecture", "fingerprint"}), "metadata"}``.

    Raises:
        LoRAConfigError: For an invalid name.
        AdapterNotFoundError: If the store has no committed adapter ``name``.
        CorruptAdapterError, AdapterVersionError: For a broken adapter (the
            message names the file and what is wrong with it).
        StoreError: If the store cannot be reached.
    """
    path = adapter_path(store, name)
    try:
        summary = inspect_adapter(path)
    except LoRAError as exc:
        message = str(exc).replace(path, name)
        if message == str(exc):
            raise
        try:
            redacted = type(exc)(message)
        except Exception:  # a class that takes other arguments: keep the original
            raise exc from None
        raise redacted from None
    layers = summary.get("layers") or {p: {"rank": r} for p, r in summary["ranks"].items()}
    metadata = summary["metadata"] if isinstance(summary["metadata"], dict) else {}
    labels = metadata.get("labels")
    if not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
        labels = None
    classes = metadata.get("classes")
    if labels is not None:
        classes = len(labels)
    elif not (isinstance(classes, int) and not isinstance(classes, bool) and classes > 0):
        classes = None
    return {
        "name": name,
        "version": summary["config_sha256"],
        "format_version": summary["format_version"],
        "library_version": summary["library_version"],
        "created": summary["created"],
        "size_bytes": summary["size_bytes"],
        "num_parameters": summary["num_parameters"],
        "ranks": sorted(set(summary["ranks"].values())),
        "dora": any(layer.get("dora", False) for layer in layers.values()),
        "rslora": any(layer.get("rslora", False) for layer in layers.values()),
        "classes": classes,
        "labels": labels,
        "layers": layers,
        "saved": summary["saved"],
        "base": {
            "architecture": summary["base_architecture"],
            "lora_architecture": summary["architecture"],
            "fingerprint": summary["base_fingerprint"],
        },
        "metadata": metadata,
    }
