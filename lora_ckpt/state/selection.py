"""Which variables of a model make up its adapter state.

An adapter holds what LoRA training changes: every LoRA ``A``/``B``, the
biases the bias mode trains, and every variable (trainable or not, such as
BatchNorm moving statistics) of the extra layers named by the caller. The
rest of the model is the *base*: it is identified by a fingerprint, never
saved.
"""

import fnmatch
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .._tf import tf
from ..errors import LayerNotFoundError, MergeStateError
from ..generic import lora_settings
from ..layers import is_lora_layer
from ..models import check_train_bias, trained_biases
from ..traversal import named_layers, named_variables

KIND_LORA = "lora"
KIND_BIAS = "bias"
KIND_EXTRA = "extra"


@dataclass
class StateSelection:
    """The adapter variables of a model, keyed by their stable paths.

    Attributes:
        variables: ``key -> variable`` for every variable in the adapter.
        kinds: ``key -> "lora" | "bias" | "extra"``.
        layers: ``layer path -> {"type", "rank", "alpha", "scaling"}`` for
            every LoRA layer.
        bias: The bias mode that chose the biases.
        extra_layers: Paths of the extra layers saved in full.
        model_variables: ``key -> variable`` for the whole model.
    """

    variables: dict[str, tf.Variable]
    kinds: dict[str, str]
    layers: dict[str, dict]
    bias: str
    extra_layers: list[str]
    model_variables: dict[str, tf.Variable] = field(repr=False)

    def lora_keys(self) -> list[str]:
        """Keys of the LoRA A/B variables: what every adapter of this model holds."""
        return [k for k, kind in self.kinds.items() if kind == KIND_LORA]


def resolve_layer_patterns(model, patterns: Iterable[str], layers=None) -> list[str]:
    """Expands layer paths, names or glob patterns to layer paths.

    Args:
        model: The model whose layers are matched.
        patterns: Exact paths (``"head/fc"``), layer names, or ``fnmatch``
            patterns (``"*bn*"``) matched against paths.
        layers: ``named_layers(model)`` if the caller has it already.

    Returns:
        Matching layer paths, each once, in model order.

    Raises:
        LayerNotFoundError: If a pattern matches no layer.
    """
    layers = list(named_layers(model)) if layers is None else layers
    paths: list[str] = []
    for pattern in patterns:
        matched = [
            path
            for path, layer in layers
            if path == pattern or layer.name == pattern or fnmatch.fnmatchcase(path, pattern)
        ]
        if not matched:
            raise LayerNotFoundError(
                f"Layer pattern {pattern!r} matches no layer of model '{model.name}'. "
                f"Layer paths include: {[p for p, _ in layers][:20]}"
            )
        paths.extend(p for p in matched if p not in paths)
    return paths


def select_state(
    model: tf.keras.Model,
    include_bias: str | None = None,
    extra_layers: Iterable[str] | None = None,
) -> StateSelection:
    """Selects the adapter variables of a model.

    Args:
        model: A built model with LoRA layers, not merged.
        include_bias: ``"none"``, ``"lora_only"`` or ``"all"``; defaults to
            the model's bias mode (:func:`lora_settings`).
        extra_layers: Layers saved in full (paths, names or glob patterns);
            defaults to the layers the model trains in full.

    Returns:
        The selection.

    Raises:
        LayerNotFoundError: If the model has no LoRA layer or a pattern
            matches no layer.
        MergeStateError: If a LoRA layer is merged (its kernel then holds the
            update, so the base cannot be identified).
        LoRAConfigError: For an unknown bias mode.
    """
    all_layers = list(named_layers(model))
    layers = [(path, layer) for path, layer in all_layers if is_lora_layer(layer)]
    if not layers:
        raise LayerNotFoundError(
            f"Model '{model.name}' has no LoRA layers: there is no adapter state to "
            "save or load. Convert it with convert_to_lora_model first."
        )
    merged = [path for path, layer in layers if layer.merged]
    if merged:
        raise MergeStateError(
            f"LoRA layer '{merged[0]}' is merged; call unmerge_lora_weights(model) "
            "before saving or loading adapter state."
        )
    settings = lora_settings(model)
    bias = settings.train_bias if include_bias is None else include_bias
    check_train_bias(bias)
    extra = resolve_layer_patterns(
        model, settings.trainable_layers if extra_layers is None else extra_layers, all_layers
    )
    all_vars = named_variables(model)
    key_of = {id(v): k for k, v in all_vars.items()}

    kinds: dict[str, str] = {}
    for _, layer in layers:
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            kinds[key_of[id(var)]] = KIND_LORA
    for prefix in extra:
        for key in all_vars:
            if key.startswith(prefix + "/"):
                kinds.setdefault(key, KIND_EXTRA)
    for _, layer in all_layers:
        for var in trained_biases(layer, bias):
            kinds.setdefault(key_of[id(var)], KIND_BIAS)

    ordered = {k: all_vars[k] for k in all_vars if k in kinds}
    layer_info = {
        path: {
            "type": type(layer).__name__,
            "rank": int(layer.lora_rank),
            "alpha": float(layer.lora_alpha),
            "scaling": float(layer.scaling),
        }
        for path, layer in layers
    }
    return StateSelection(
        variables=ordered,
        kinds={k: kinds[k] for k in ordered},
        layers=layer_info,
        bias=bias,
        extra_layers=extra,
        model_variables=all_vars,
    )


FINGERPRINT_SAMPLES = 4096
"""Values per variable a base fingerprint reads (all values of smaller ones)."""


def _sample(variable: tf.Variable) -> np.ndarray:
    flat = variable.numpy().ravel()  # one eager op: cheaper than slicing in TF
    return np.ascontiguousarray(flat[:: -(-flat.size // FINGERPRINT_SAMPLES)])


def base_fingerprint(model_variables: dict[str, tf.Variable], exclude: Iterable[str]) -> str:
    """A digest that identifies the base weights: every variable not in ``exclude``.

    It covers each variable's key, shape and dtype, and a fixed sample of its
    values: all of them up to 4096, else every k-th value (4096 in all).
    Another training run or checkpoint of the base changes nearly every
    value, so it changes the fingerprint; a few hand-edited values may not.
    Reading a sample keeps a load fast on a large base (a full hash of
    convnext_tiny's 110 MB took longer than loading the whole model).

    Args:
        model_variables: ``key -> variable`` of the whole model.
        exclude: Keys left out (the adapter's own variables, which a load
            overwrites).

    Returns:
        ``"sampled-blake2b:<hex>"``.
    """
    excluded = set(exclude)
    digest = hashlib.blake2b(digest_size=20)
    for key in sorted(model_variables):
        if key in excluded:
            continue
        variable = model_variables[key]
        digest.update(f"{key}|{variable.dtype.name}|{variable.shape.as_list()}|".encode())
        digest.update(_sample(variable).data)
    return "sampled-blake2b:" + digest.hexdigest()
