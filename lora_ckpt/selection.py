"""Which weights LoRA trains and which an adapter saves.

One place decides both, so what ``fit`` trains is what ``save_lora_state``
writes: every LoRA ``A``/``B``, the biases of the bias mode (``"none"``,
``"lora_only"``, ``"all"``) and every variable of the layers trained in full
(a classifier head, BatchNorm statistics). Layers are named by one rule
(:func:`match_layers`): a layer path, a layer name, or a glob over either.
"""

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._tf import tf
from .errors import (
    LoRAConfigError,
    MergeStateError,
    UnregisteredArchitectureError,
)
from .layers import LoRALayerMixin, is_lora_layer
from .traversal import layers_and_variables, named_layers, named_variables

_TRAIN_BIAS_OPTIONS = ("none", "lora_only", "all")

MODULES_TO_SAVE_ATTRIBUTE = "_lora_modules_to_save"
"""Where a registered LoRA model keeps the paths of the layers it trains in
full besides its classifier (``lora_trainable_layers``, PEFT's
``modules_to_save``): set by :func:`set_modules_to_save`."""

KIND_LORA = "lora"
KIND_BIAS = "bias"
KIND_EXTRA = "extra"


def check_train_bias(train_bias: str) -> None:
    """Checks a bias mode.

    Args:
        train_bias: ``"none"``, ``"lora_only"`` or ``"all"``.

    Raises:
        LoRAConfigError: For any other value.
    """
    if train_bias not in _TRAIN_BIAS_OPTIONS:
        raise LoRAConfigError(
            f"Unknown value for train_bias: {train_bias!r}; expected one of "
            f"{list(_TRAIN_BIAS_OPTIONS)}."
        )


@dataclass(frozen=True)
class LoRASettings:
    """How a LoRA model trains, as ``save_lora_state``'s defaults read it.

    Attributes:
        train_bias: ``"none"``, ``"lora_only"`` or ``"all"``.
        trainable_layers: Paths, names or globs of layers trained (and saved)
            in full.
    """

    train_bias: str = "none"
    trainable_layers: tuple[str, ...] = ()


class LoRATrainableMixin:
    """Makes ``model.trainable_weights`` what LoRA trains, for a subclassed model.

    Settings come from the model's config: ``cfg.lora_train_bias`` (default
    ``"none"``) and, if ``cfg.lora_train_classifier``, the layers named by
    ``cfg.classifier``. Every registered LoRA architecture has this override:
    :func:`lora_ckpt.register_lora_architecture` gives it to classes that do
    not inherit it, so Keras' ``fit`` trains exactly what an adapter saves.
    """

    def lora_trainable_layers(self) -> list[str]:
        """Paths of the layers trained in full: the classifier, if the config
        asks, and the layers named by ``lora_trainable_layers`` (PEFT's
        ``modules_to_save``) when the model was built."""
        extra = list(getattr(self, MODULES_TO_SAVE_ATTRIBUTE, ()) or ())
        classifier = self._lora_trainable_classifier()
        return classifier + [path for path in extra if path not in classifier]

    def _lora_trainable_classifier(self) -> list[str]:
        cfg = getattr(self, "cfg", None)
        if not getattr(cfg, "lora_train_classifier", False):
            return []
        if "head" in tuple(getattr(cfg, "lora_layer_groups", ()) or ()):
            return []  # the head has LoRA instead
        classifier = getattr(cfg, "classifier", None)
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        # A model built with nb_classes=0 has no classifier layer to train, and a
        # classifier that got LoRA (a head group or lora_target_layers) trains as LoRA.
        plain = {
            name
            for path, layer in named_layers(self)
            if not is_lora_layer(layer)
            for name in (path, layer.name)
        }
        return [name for name in names if name in plain]

    @property
    def lora_settings(self) -> LoRASettings:
        """Bias mode and fully trained layers, from the config."""
        train_bias = getattr(getattr(self, "cfg", None), "lora_train_bias", "none")
        return LoRASettings(train_bias, tuple(self.lora_trainable_layers()))

    @property
    def trainable_weights(self) -> list[tf.Variable]:
        settings = self.lora_settings
        return lora_trainable_weights(self, settings.train_bias, settings.trainable_layers)

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        settings = self.lora_settings
        return lora_non_trainable_weights(self, settings.train_bias, settings.trainable_layers)


def set_modules_to_save(model, patterns: Iterable[str]) -> list[str]:
    """Makes a registered LoRA model train (and its adapters save) more layers in full.

    PEFT's ``modules_to_save`` for any layer of a tfimm model: besides the
    classifier (``lora_train_classifier``), the named layers' variables are
    trained by ``fit`` and written by ``save_lora_state``.

    Args:
        model: A built model with :class:`LoRATrainableMixin` (every
            registered LoRA architecture).
        patterns: Layer paths, names or globs; LoRA layers are not candidates
            (their base kernel stays frozen; ``lora_train_bias`` trains biases).

    Returns:
        The matched layer paths, in model order.

    Raises:
        LoRAConfigError: If a pattern matches no layer other than a LoRA layer.
    """
    candidates = [(path, layer) for path, layer in named_layers(model) if not is_lora_layer(layer)]
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or ())
    paths = match_layers(model, patterns, candidates, "lora_trainable_layers entry")
    # A plain attribute, not a tracked one: Keras would wrap a list for checkpoints.
    object.__setattr__(model, MODULES_TO_SAVE_ATTRIBUTE, tuple(paths))
    return paths


def lora_settings(model) -> LoRASettings:
    """The training settings of a LoRA model (registered, converted or plain).

    Registered architectures derive them from their config, converted
    functional/Sequential models carry them; any other model trains LoRA
    weights only.

    Args:
        model: Any Keras model.

    Returns:
        Its bias mode and the layers it trains in full.
    """
    return getattr(model, "lora_settings", None) or LoRASettings()


def foreign_lora_layers(layers: Iterable[tuple[str, tf.keras.layers.Layer]]) -> list[tuple]:
    """The ``(path, layer)`` pairs whose layer is a LoRA layer of another library.

    tfimm's own ``LoRADense``/``LoRAConv2D`` say ``is_lora_layer = True`` as
    ours do, but have none of the state lora_ckpt keeps (enabled flag, DoRA,
    exact merge), so code that reads it must not take them for ours.

    Args:
        layers: ``(path, layer)`` pairs, e.g. from ``named_layers(model)``.

    Returns:
        The pairs of foreign LoRA layers, in the given order.
    """
    return [
        (path, layer)
        for path, layer in layers
        if is_lora_layer(layer) and not isinstance(layer, LoRALayerMixin)
    ]


def refuse_foreign_lora_layers(model, layers: Iterable[tuple] | None = None) -> None:
    """Refuses a model built by ``tfimm.architectures.lora`` with what to do instead.

    Args:
        model: The model a lora_ckpt function was given.
        layers: Its ``(path, layer)`` pairs, if the caller walked it already.

    Raises:
        UnregisteredArchitectureError: If the model holds LoRA layers that are
            not lora_ckpt's.
    """
    foreign = foreign_lora_layers(named_layers(model) if layers is None else layers)
    if foreign:
        path, layer = foreign[0]
        raise UnregisteredArchitectureError(
            f"{type(model).__name__} model '{model.name}' was built with "
            f"{type(layer).__module__}.{type(layer).__name__} layers ('{path}' and "
            f"{len(foreign) - 1} more), not lora_ckpt's: lora_ckpt cannot save, merge or "
            "convert them. Convert the model first: `model = "
            "lora_ckpt.convert_to_lora_model(model)` carries its LoRA weights over exactly."
        )


def layer_matches(path: str, layer, pattern: str) -> bool:
    """The one layer-matching rule: ``pattern`` is the layer's path or name, or a
    glob (``fnmatch``) over either.

    Args:
        path: The layer's path in its model (``stages/0/blocks/1/mlp/fc1``).
        layer: The layer (its ``name`` is matched too).
        pattern: A path, a layer name or a glob.

    Returns:
        Whether the pattern names the layer.
    """
    return any(
        pattern == candidate or fnmatch.fnmatchcase(candidate, pattern)
        for candidate in (path, layer.name)
    )


def match_layers(
    model,
    patterns: Iterable[str],
    layers: Sequence[tuple] | None = None,
    what: str = "Layer pattern",
) -> list[str]:
    """Expands layer paths, names or glob patterns to layer paths.

    Args:
        model: The model whose layers are matched (for messages).
        patterns: Paths (``"head/fc"``), layer names, or globs (``"*bn*"``).
        layers: ``(path, layer)`` candidates; every layer of ``model`` by default.
        what: How the caller calls its patterns, for the error message.

    Returns:
        Matching layer paths, each once, in model order.

    Raises:
        LoRAConfigError: If a pattern matches no candidate.
    """
    layers = list(named_layers(model)) if layers is None else list(layers)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise LoRAConfigError(f"{what}s must be strings (paths, names or globs), got {bad[:3]!r}.")
    paths: list[str] = []
    for pattern in patterns:
        matched = [path for path, layer in layers if layer_matches(path, layer, pattern)]
        if not matched:
            known = [p for p, _ in layers]
            raise LoRAConfigError(
                f"{what} {pattern!r} matches no layer of model '{model.name}'. "
                f"Candidates include: {known[:20]}{' ...' if len(known) > 20 else ''}"
            )
        paths.extend(p for p in matched if p not in paths)
    return paths


def _bias_variables(layer: tf.keras.layers.Layer) -> list[tf.Variable]:
    """The bias variables of a layer: convolution/dense ``bias``, norm ``beta``."""
    bias_layers = (
        tf.keras.layers.Conv1D,
        tf.keras.layers.Conv2D,
        tf.keras.layers.Conv3D,
        tf.keras.layers.Dense,
        tf.keras.layers.DepthwiseConv1D,
        tf.keras.layers.DepthwiseConv2D,
    )
    norm_layers = (tf.keras.layers.BatchNormalization, tf.keras.layers.LayerNormalization)
    if isinstance(layer, bias_layers) and layer.use_bias:
        return [layer.bias]
    if isinstance(layer, norm_layers) and layer.center:
        return [layer.beta]
    return []


def _trained_biases(layer: tf.keras.layers.Layer, train_bias: str) -> list[tf.Variable]:
    """The biases of ``layer`` that bias mode ``train_bias`` trains."""
    if train_bias == "all" or (train_bias == "lora_only" and is_lora_layer(layer)):
        return _bias_variables(layer)
    return []


def lora_trainable_weights(
    model: tf.keras.layers.Layer,
    train_bias: str = "none",
    trainable_layers: Iterable[str] | None = None,
) -> list[tf.Variable]:
    """The variables to train for LoRA, in place of ``model.trainable_weights``.

    Works for any Keras model: subclassed, functional or Sequential.

    Args:
        model: A model with LoRA layers.
        train_bias: ``"none"``: no biases; ``"lora_only"``: the biases of LoRA
            layers; ``"all"``: every bias (dense/conv ``bias``, norm ``beta``).
        trainable_layers: Layers trained in full (e.g. a classifier head),
            by path (``"head/fc"``), layer name or glob.

    Returns:
        The variables, each once, in the model's layer order.

    Raises:
        LoRAConfigError: For an unknown ``train_bias``, or a name in
            ``trainable_layers`` that matches no layer.
    """
    check_train_bias(train_bias)
    layers = list(named_layers(model))
    full = set(match_layers(model, trainable_layers or [], layers, "trainable_layers entry"))
    selected, ids = [], set()
    for path, layer in layers:
        variables = _trained_biases(layer, train_bias)
        if is_lora_layer(layer):
            variables = [*layer.lora_trainable_weights(train_bias=False), *variables]
        if path in full:
            variables += tf.keras.layers.Layer.trainable_weights.fget(layer)
        for variable in variables:
            if id(variable) not in ids:
                ids.add(id(variable))
                selected.append(variable)
    return selected


def lora_non_trainable_weights(
    model: tf.keras.layers.Layer,
    train_bias: str = "none",
    trainable_layers: Iterable[str] | None = None,
) -> list[tf.Variable]:
    """Every variable of the model that :func:`lora_trainable_weights` leaves out.

    Args:
        model: A model with LoRA layers.
        train_bias: As for :func:`lora_trainable_weights`.
        trainable_layers: As for :func:`lora_trainable_weights`.

    Returns:
        The frozen variables, in the model's layer order.

    Raises:
        LoRAConfigError: As :func:`lora_trainable_weights`.
    """
    trainable = {id(v) for v in lora_trainable_weights(model, train_bias, trainable_layers)}
    return [v for v in named_variables(model).values() if id(v) not in trainable]


@dataclass
class StateSelection:
    """The adapter variables of a model, keyed by their stable paths.

    Attributes:
        variables: ``key -> variable`` for every variable in the adapter.
        kinds: ``key -> "lora" | "bias" | "extra"``.
        layers: ``layer path -> {"type", "rank", "alpha", "scaling", "dora",
            "rslora"}`` for every LoRA layer.
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
        extra_layers: Layers saved in full (paths, names or globs); defaults
            to the layers the model trains in full.

    Returns:
        The selection.

    Raises:
        LoRAConfigError: If the model has no LoRA layer, a pattern matches
            no layer, or the bias mode is unknown.
        MergeStateError: If a LoRA layer is merged (its kernel then holds the
            update, so the base cannot be identified).
        UnregisteredArchitectureError: For a model built by tfimm's LoRA
            module (convert it with ``convert_to_lora_model`` first).
    """
    all_layers, all_vars = layers_and_variables(model)
    refuse_foreign_lora_layers(model, all_layers)
    layers = [(path, layer) for path, layer in all_layers if is_lora_layer(layer)]
    if not layers:
        raise LoRAConfigError(
            f"Model '{model.name}' has no LoRA layers: there is no adapter state to "
            "save or load. Convert it with convert_to_lora_model first."
        )
    merged = [path for path, layer in layers if layer.merged]
    if merged:
        raise MergeStateError(
            f"LoRA layer '{merged[0]}' is merged; call unmerge_lora_weights(model) "
            "before saving or loading adapter state."
        )
    if include_bias is None or extra_layers is None:
        settings = lora_settings(model)
        include_bias = settings.train_bias if include_bias is None else include_bias
        extra_layers = settings.trainable_layers if extra_layers is None else extra_layers
    bias = include_bias
    check_train_bias(bias)
    extra = match_layers(model, extra_layers, all_layers, "extra_layers entry")
    key_of = {id(v): k for k, v in all_vars.items()}

    kinds: dict[str, str] = {}
    for _, layer in layers:
        for var in layer.lora_trainable_weights(train_bias=False):  # A, B (, magnitude)
            kinds[key_of[id(var)]] = KIND_LORA
    for prefix in extra:
        for key in all_vars:
            if key.startswith(prefix + "/"):
                kinds.setdefault(key, KIND_EXTRA)
    for _, layer in all_layers:
        for var in _trained_biases(layer, bias):
            kinds.setdefault(key_of[id(var)], KIND_BIAS)

    ordered = {k: all_vars[k] for k in all_vars if k in kinds}
    layer_info = {
        path: {
            "type": type(layer).__name__,
            "rank": int(layer.lora_rank),
            "alpha": float(layer.lora_alpha),
            "scaling": float(layer.scaling),
            "dora": bool(layer.lora_use_dora),
            "rslora": bool(layer.lora_use_rslora),
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


def classifier_paths(model) -> list[str]:
    """Paths of the model's classifier layers (whose width is the number of classes).

    A tfimm model names them in its config (``cfg.classifier``); for a
    functional/Sequential model they are the layers that produce its outputs.
    A model built without a classifier (``nb_classes=0``) has none.

    Args:
        model: A tfimm model (regular or LoRA) or a functional/Sequential model.

    Returns:
        The classifier layers' paths, in model order.
    """
    layers = list(named_layers(model))
    names = getattr(getattr(model, "cfg", None), "classifier", None)
    if names is None:
        names = list(getattr(model, "output_names", None) or [])
    names = [names] if isinstance(names, str) else list(names)
    return [path for path, layer in layers if any(layer_matches(path, layer, n) for n in names)]


# The public API (lora_trainable_weights, ...) and what the modules above use:
# the kinds are the values of StateSelection.kinds that state/ writes and reads.
__all__ = [
    "KIND_BIAS",
    "KIND_EXTRA",
    "KIND_LORA",
    "LoRASettings",
    "LoRATrainableMixin",
    "MODULES_TO_SAVE_ATTRIBUTE",
    "StateSelection",
    "check_train_bias",
    "classifier_paths",
    "foreign_lora_layers",
    "layer_matches",
    "lora_non_trainable_weights",
    "lora_settings",
    "lora_trainable_weights",
    "match_layers",
    "refuse_foreign_lora_layers",
    "select_state",
    "set_modules_to_save",
]
