"""Model-level LoRA operations: find the LoRA layers, merge and unmerge them,
switch them off, count what trains (PEFT's ``print_trainable_parameters``)."""

import contextlib

from . import architectures  # noqa: F401  (registers the LoRA classes this factory builds)
from ._tf import tf
from .errors import (
    LoRAConfigError,
    MergeStateError,
)
from .layers import is_lora_layer
from .selection import (
    refuse_foreign_lora_layers,
)
from .traversal import named_layers

__all__ = [
    "base_kernels_in_place",
    "lora_disabled",
    "lora_layers",
    "merge_lora_weights",
    "merge_weights",
    "print_trainable_parameters",
    "set_lora_enabled",
    "unmerge_lora_weights",
]


# tfimm's LoRAConvNeXtConfig spells this field `lora_train_classifer`.


def lora_layers(model: tf.keras.layers.Layer) -> list[tuple[str, tf.keras.layers.Layer]]:
    """Returns ``(path, layer)`` for every LoRA layer of a model, in order.

    Args:
        model: Any tf_keras model or layer.

    Returns:
        ``(path, layer)`` pairs, depth first; empty for a model without LoRA.

    Raises:
        UnregisteredArchitectureError: For a model built by tfimm's LoRA
            module, whose layers lack lora_ckpt's state: every caller (merge,
            enable/disable, conversion back, save, serving) would fail on them.
    """
    layers = list(named_layers(model))
    refuse_foreign_lora_layers(model, layers)
    return [(path, layer) for path, layer in layers if is_lora_layer(layer)]


def _forget_compiled_functions(model) -> None:
    # Keras caches traced predict/train/test functions; a merge or an
    # enable/disable changes which ops `call` traces, so they must be rebuilt.
    for attr in ("predict_function", "train_function", "test_function"):
        if isinstance(model, tf.keras.Model) and getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def _require_lora_layers(model):
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise LoRAConfigError(
            f"Model '{model.name}' has no LoRA layers; convert it first with convert_to_lora_model."
        )
    return layers


def _refuse_merged(layers, consequence: str) -> None:
    merged = [layer.name for layer in layers if layer.merged]
    if merged:
        raise MergeStateError(
            f"{len(merged)} LoRA layer(s) are already merged (e.g. '{merged[0]}'), {consequence}; "
            "call unmerge_lora_weights(model) first."
        )


def merge_lora_weights(model: tf.keras.layers.Layer) -> None:
    """Folds every LoRA update into its base kernel, in place.

    Args:
        model: A model with LoRA layers, none of them merged.

    Raises:
        MergeStateError: If any LoRA layer is already merged (nothing is
            changed then).
        LoRAConfigError: If the model has no LoRA layers.
    """
    layers = _require_lora_layers(model)
    _refuse_merged(layers, "cannot be merged again")
    for layer in layers:
        layer.merge_weights()
    _forget_compiled_functions(model)


merge_weights = merge_lora_weights
"""The name the tfimm LoRA README uses for :func:`merge_lora_weights`."""


def unmerge_lora_weights(model: tf.keras.layers.Layer) -> None:
    """Restores every merged LoRA layer's base kernel bit for bit.

    Args:
        model: A model whose LoRA layers were merged.

    Raises:
        MergeStateError: If no LoRA layer is merged.
        LoRAConfigError: If the model has no LoRA layers.
    """
    layers = [layer for layer in _require_lora_layers(model) if layer.merged]
    if not layers:
        raise MergeStateError(
            f"No LoRA layer of model '{model.name}' is merged; nothing to unmerge."
        )
    for layer in layers:
        layer.unmerge_weights()
    _forget_compiled_functions(model)


def set_lora_enabled(model: tf.keras.layers.Layer, enabled: bool) -> None:
    """Switches the LoRA branch of every LoRA layer on or off.

    With LoRA disabled (and unmerged) the model computes its base model's
    output exactly.

    Args:
        model: A model with LoRA layers.
        enabled: ``True`` to add the LoRA updates, ``False`` to skip them.

    Raises:
        LoRAConfigError: If the model has no LoRA layers.
    """
    for layer in _require_lora_layers(model):
        layer.lora_enabled = bool(enabled)
    _forget_compiled_functions(model)


@contextlib.contextmanager
def base_kernels_in_place(model):
    """Within the block, every LoRA layer holds its base kernel and adds no update."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge_weights()
    try:
        with lora_disabled(model):
            yield
    finally:
        for layer in merged:
            layer.merge_weights()


@contextlib.contextmanager
def lora_disabled(model: tf.keras.layers.Layer):
    """Runs the base model inside the ``with`` block (PEFT's ``disable_adapter()``).

    Every LoRA layer stops adding its update; on leaving the block, even by
    an exception, each layer gets back the enabled state it had.

    Args:
        model: A model with LoRA layers, not merged.

    Yields:
        ``model``, computing its base model's output.

    Raises:
        LoRAConfigError: If the model has no LoRA layers.
        MergeStateError: If a LoRA layer is merged (its kernel then holds the
            update, so disabling could not give the base).
    """
    layers = _require_lora_layers(model)
    _refuse_merged(layers, "so the base cannot be run by disabling LoRA")
    before = [layer.lora_enabled for layer in layers]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.lora_enabled = enabled
        _forget_compiled_functions(model)


def _trainable_parameter_counts(model: tf.keras.layers.Layer) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as Keras' ``summary`` counts them."""
    trainable = sum(int(v.shape.num_elements()) for v in model.trainable_weights)
    total = trainable + sum(int(v.shape.num_elements()) for v in model.non_trainable_weights)
    return trainable, total


def print_trainable_parameters(model: tf.keras.layers.Layer) -> None:
    """Prints PEFT's one-line summary of what trains.

    ``trainable params: 132,480 || all params: 28,721,608 || trainable%: 0.4613``

    Args:
        model: Any built Keras model.
    """
    trainable, total = _trainable_parameter_counts(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )
