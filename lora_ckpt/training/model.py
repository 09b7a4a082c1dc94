"""The model an adapter is trained in: the store's base, a head of the task's width.

Built as :func:`lora_ckpt.serving.store.build_base_model` builds a serving
model (the store's ``base.json`` and ``base.h5``), with the LoRA fields a
training run overrides, so the adapter fits the models the service builds.
"""

import dataclasses

from tfimm.models import is_model, model_class, model_config

from .._tf import tf
from ..models import create_model
from ..registry import lora_architecture
from ..selection import classifier_paths
from ..serving.store import read_base_config, store_base_weights
from ..state import load_base_weights
from .settings import TrainSettings

__all__ = ["build_training_model", "input_shape"]


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def input_shape(model) -> tuple[int, int, int]:
    """``(height, width, channels)`` of a built model's input."""
    if hasattr(model, "dummy_inputs"):
        return tuple(int(d) for d in model.dummy_inputs.shape[1:])
    return tuple(int(d) for d in model.input_shape[1:])


def build_training_model(store: str, num_classes: int, settings: TrainSettings):
    """The store's base as a LoRA model with a fresh head of ``num_classes`` outputs.

    Args:
        store: The adapter store (directory or URL).
        num_classes: The width of the task's head.
        settings: The run's LoRA overrides (rank, alpha, DoRA, targets).

    The classifier is always trained in full, so a ``head`` layer group of the
    store's LoRA fields is left out (serve such adapters from a store whose
    ``base.json`` trains the head in full, as the demo's does).

    Returns:
        ``(model, base_config)``: the model with the base weights loaded (the
        head too when its width is the base's), compiled for integer labels
        and logits with Adam and accuracy.

    Raises:
        StoreError: If the store has no ``base.json`` or cannot be reached.
        BaseWeightsError: If ``base.h5`` does not fit.
        LoRAConfigError, LayerNotFoundError: For LoRA settings the model refuses.
    """
    base = read_base_config(store)
    name = base["model"]
    config = _tuples(base.get("config", {}))
    lora = _tuples(base.get("lora", {}))
    if settings.targets is not None:
        lora.pop("lora_layer_groups", None)
        lora.pop("lora_target_layers", None)
    groups = set()
    if is_model(name):  # an unknown name is refused by create_model, with close matches
        lora_cls = lora_architecture(model_class(name))
        groups = set(lora_cls.layer_groups()) if hasattr(lora_cls, "layer_groups") else set()
    lora.update(settings.lora_overrides(groups))
    if "head" in lora.get("lora_layer_groups", ()):
        # The head is the task's own, trained in full: LoRA on a fresh head would
        # train low-rank factors over a frozen random kernel that no adapter keeps.
        lora["lora_layer_groups"] = tuple(g for g in lora["lora_layer_groups"] if g != "head")
    current = {**dataclasses.asdict(model_config(name)), **config}
    width_changes = current.get("nb_classes") != num_classes
    config["nb_classes"] = num_classes
    model = create_model(name, **config, **lora)
    local = store_base_weights(store)
    if local is not None:
        # A head of another width keeps its fresh weights: the adapter brings its own.
        load_base_weights(model, local, skip=classifier_paths(model) if width_changes else None)
    _compile_model(model, settings.learning_rate)
    return model, base


def _compile_model(model, learning_rate: float):
    """Compiles for integer labels and logits: Adam, cross-entropy, accuracy."""
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
