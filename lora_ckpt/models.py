"""Model-level LoRA API: the factory, conversion both ways, merging.

The names and signatures are those of ``tfimm.architectures.lora``, so code
written against it works after changing the import.
"""

import contextlib
import dataclasses
import difflib
import importlib.util
import sys
import warnings

import tfimm
from tfimm.models import model_class, model_config

from . import architectures  # noqa: F401  (registers the LoRA classes this factory builds)
from ._tf import require_tf_keras, tf
from .errors import (
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    MissingDependencyError,
    UnregisteredArchitectureError,
)
from .graph_models import convert_graph_model, graph_model_to_regular, is_graph_model
from .layers import LORA_WEIGHT_NAMES, is_lora_layer, supported_layer_types
from .registry import (
    is_lora_architecture,
    lora_architecture,
    lora_base_architecture,
    lora_config,
    registered_architectures,
)
from .selection import (
    classifier_paths,
    foreign_lora_layers,
    refuse_foreign_lora_layers,
    set_modules_to_save,
)
from .subclassed_models import convert_subclassed_model, convert_subclassed_model_to_regular
from .traversal import named_layers, named_variables

# tfimm's LoRAConvNeXtConfig spells this field `lora_train_classifer`.
_DEPRECATED_KWARGS = {"lora_train_classifer": "lora_train_classifier"}


def _normalize_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for old, new in _DEPRECATED_KWARGS.items():
        if old in kwargs:
            warnings.warn(
                f"`{old}` is tfimm's misspelling; use `{new}`.", DeprecationWarning, stacklevel=3
            )
            kwargs.setdefault(new, kwargs.pop(old))
    return kwargs


def _config_with_overrides(cfg_cls, base: dict, overrides: dict, model_desc: str):
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise LoRAConfigError(
            f"Unknown config field(s) {unknown} for {model_desc}. Valid fields: {sorted(fields)}."
        )
    values = {k: v for k, v in base.items() if k in fields}
    values.update(overrides)
    return cfg_cls(**values)


def _build(model: tf.keras.Model) -> tf.keras.Model:
    if not model.built:
        model(model.dummy_inputs)
    return model


def _reset_magnitudes(model) -> None:
    # DoRA magnitudes start as the column norms of the kernels the model holds
    # now (after building or after the base weights were transferred).
    for _, layer in lora_layers(model):
        layer.reset_lora_magnitude()


def _lora_cfg_class(model_cls: type) -> type:
    # tfimm allows `cfg_class = None` on a LoRA class: it takes the base's config.
    return lora_config(model_cls) or model_cls.cfg_class


def _missing_timm(model_name: str, package: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"tfimm converts the pretrained weights of '{model_name}' from timm (PyTorch), "
        f"and {package} is not installed: `pip install timm torch` (the first call also "
        "downloads the weights), or pass model_path= with weights saved by "
        "tfimm/Keras, or load base weights with lora_ckpt.load_base_weights."
    )


def _tfimm_create(model_name: str, **kwargs) -> tf.keras.Model:
    if kwargs.get("pretrained") and not kwargs.get("model_path"):
        # Asked before tfimm tries: it logs an error of its own before raising.
        for package in ("timm", "torch"):
            if importlib.util.find_spec(package) is None:
                raise _missing_timm(model_name, package)
    try:
        return tfimm.create_model(model_name, **kwargs)
    except ModuleNotFoundError as exc:
        if exc.name not in ("timm", "torch"):
            raise
        raise _missing_timm(model_name, exc.name) from exc


def _transfer(src: tf.keras.Model, dst: tf.keras.Model) -> None:
    """Copies every variable of ``src`` into ``dst`` by layer path (LoRA's own left out).

    By path, not by TensorFlow variable name as tfimm's ``transfer_weights``
    does: names depend on when a layer was built, paths only on the model.
    A classifier whose width differs (an ``nb_classes`` override) keeps its
    fresh initialisation; any other difference is an error.
    """
    source = named_variables(src)
    heads = tuple(path + "/" for path in classifier_paths(dst))
    for key, var in named_variables(dst).items():
        if key.rsplit("/", 1)[-1] in LORA_WEIGHT_NAMES:
            continue
        value = source.get(key)
        if value is not None and value.shape == var.shape:
            var.assign(value)
        elif not key.startswith(heads):
            raise LoRAError(
                f"Cannot transfer the weights of {type(src).__name__} to "
                f"{type(dst).__name__}: variable '{key}' "
                + ("is missing." if value is None else f"has shape {value.shape}, not {var.shape}.")
            )


# LoRA fields that decide which layers hold which A/B shapes: a tfimm LoRA
# model's own layers fix them, so they cannot be chosen anew when it is converted.
_FIXED_BY_TFIMM_LAYERS = (
    "lora_rank",
    "lora_alpha",
    "lora_layer_groups",
    "lora_target_layers",
    "lora_rank_pattern",
    "lora_alpha_pattern",
    "lora_use_dora",
    "lora_use_rslora",
    "target_layers",
)


def _tfimm_base_architecture(model_cls: type) -> type:
    """The base class that tfimm's own LoRA registry gives a tfimm LoRA class."""
    # Nothing can be an instance of a class registered there unless the module
    # was imported, so it is not imported here.
    tfimm_lora = sys.modules.get("tfimm.architectures.lora")
    try:
        return tfimm_lora.lora_base_architecture(model_cls)
    except (AttributeError, ValueError):  # no module, or a class it does not know
        raise UnregisteredArchitectureError(
            f"{model_cls.__name__} holds LoRA layers of another library but is not a LoRA "
            "architecture registered with tfimm.architectures.lora, so lora_ckpt cannot tell "
            "its base architecture. Merge its updates with that library and convert the "
            "regular model, or give lora_ckpt.convert_to_lora_model a regular model."
        ) from None


def _convert_tfimm_lora_model(model, foreign: list[tuple], kwargs: dict) -> tf.keras.Model:
    """:func:`convert_to_lora_model` for a model built by ``tfimm.architectures.lora``.

    Its base weights move by path as for any conversion; LoRA goes on exactly
    the layers that have it in ``model`` (``lora_target_layers``), with their
    ranks and alphas, and their ``A``/``B`` are copied as they are.
    """
    for path, layer in foreign:
        if not isinstance(layer, tf.keras.layers.Dense):
            raise LoRAConfigError(
                f"Layer '{path}' is tfimm's {type(layer).__name__}: its update has a "
                "low-rank factor per kernel position, which no lora_ckpt layer holds "
                "exactly. Merge it with tfimm "
                "(tfimm.architectures.lora.convert_to_regular_model) and convert the regular "
                "model with lora_ckpt.convert_to_lora_model."
            )
        if layer.merged:
            raise MergeStateError(
                f"tfimm LoRA layer '{path}' is merged, so its kernel is not the base "
                "kernel; call its unmerge_weights() (on every merged layer) first."
            )
    kwargs = _normalize_kwargs(kwargs)
    chosen = sorted(set(kwargs) & set(_FIXED_BY_TFIMM_LAYERS))
    if chosen:
        raise LoRAConfigError(
            f"{chosen} cannot be chosen when converting a tfimm LoRA model: its LoRA layers, "
            "ranks and alphas are carried over as they are. Convert without them, or "
            "convert its regular model (tfimm's convert_to_regular_model) instead."
        )
    base_cls = _tfimm_base_architecture(type(model))
    lora_cls = lora_architecture(base_cls)
    cfg = model.cfg
    rank = int(getattr(cfg, "lora_rank", foreign[0][1].lora_rank))
    alpha = float(getattr(cfg, "lora_alpha", foreign[0][1].lora_alpha))
    derived = {
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_target_layers": tuple(path for path, _ in foreign),
        # Exact paths as patterns: each matches its own layer only.
        "lora_rank_pattern": {p: int(x.lora_rank) for p, x in foreign if x.lora_rank != rank},
        "lora_alpha_pattern": {p: float(x.lora_alpha) for p, x in foreign if x.lora_alpha != alpha},
        "lora_train_bias": getattr(cfg, "lora_train_bias", "none"),
        # tfimm's config spells it `lora_train_classifer`.
        "lora_train_classifier": bool(getattr(cfg, "lora_train_classifer", True)),
    }
    base_fields = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("lora_")}
    lora_cfg = _config_with_overrides(
        _lora_cfg_class(base_cls), base_fields, {**derived, **kwargs}, lora_cls.__name__
    )
    lora_model = _build(lora_cls(cfg=lora_cfg))
    _transfer(_build(model), lora_model)
    ours = dict(named_layers(lora_model))
    for path, theirs in foreign:
        layer = ours.get(path)
        if not is_lora_layer(layer) or layer.kernel_lora_a.shape != theirs.kernel_lora_a.shape:
            raise LoRAError(  # a registered class that ignores lora_target_layers
                f"{lora_cls.__name__} did not put a LoRA layer of the same shape at '{path}', "
                f"where the tfimm model has one; it cannot carry the weights over."
            )
        layer.kernel_lora_a.assign(theirs.kernel_lora_a)
        layer.kernel_lora_b.assign(theirs.kernel_lora_b)
    _reset_magnitudes(lora_model)
    return lora_model


def create_model(
    model_name: str,
    pretrained: bool = False,
    model_path: str = "",
    **kwargs,
) -> tf.keras.Model:
    """Creates a LoRA model from a tfimm model name.

    Without weights to load, the LoRA model is built directly; with
    ``pretrained`` or ``model_path`` the regular model is loaded by tfimm and
    converted with :func:`convert_to_lora_model`.

    Args:
        model_name: A tfimm model name, e.g. ``"convnext_tiny"``.
        pretrained: Load tfimm's pretrained weights (tfimm converts them from
            timm, which must be installed; from its cache or the network).
        model_path: Path of a saved regular model to load; takes precedence
            over ``pretrained``.
        **kwargs: LoRA fields (``lora_rank``, ``lora_alpha``, ``lora_dropout``,
            ``lora_train_bias``, ``lora_train_classifier``, ``lora_layer_groups``,
            ``lora_use_dora``, ``lora_use_rslora``, ``lora_rank_pattern``,
            ``lora_alpha_pattern``, ``lora_initializer``,
            ``lora_trainable_layers``: layers trained and saved in full besides
            the classifier, PEFT's ``modules_to_save``) and overrides of the
            model config (``nb_classes``, ``embed_dim``, ...).

    Returns:
        The built LoRA model.

    Raises:
        LoRAConfigError: If tfimm does not know ``model_name``, for unknown
            config fields or invalid LoRA values.
        UnregisteredArchitectureError: If the architecture has no LoRA variant.
        MissingDependencyError: For ``pretrained=True`` without timm.
    """
    if not tfimm.models.is_model(model_name):
        close = difflib.get_close_matches(model_name, tfimm.list_models(), n=5)
        raise LoRAConfigError(
            f"Unknown model '{model_name}'. Close matches: {close}. "
            "See tfimm.list_models() for all names."
        )
    cls = model_class(model_name)
    lora_cls = lora_architecture(cls)
    kwargs = _normalize_kwargs(kwargs)
    if pretrained or model_path:
        lora_kwargs = {k: v for k, v in kwargs.items() if k.startswith("lora_")}
        full_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("lora_")}
        full_model = _tfimm_create(
            model_name, pretrained=pretrained, model_path=model_path, **full_kwargs
        )
        return convert_to_lora_model(full_model, **lora_kwargs)

    trainable = kwargs.pop("lora_trainable_layers", None)
    base_cfg = dataclasses.asdict(model_config(model_name))
    cfg = _config_with_overrides(_lora_cfg_class(cls), base_cfg, kwargs, model_name)
    model = _build(lora_cls(cfg=cfg))
    _reset_magnitudes(model)
    if trainable:
        set_modules_to_save(model, trainable)
    return model


def convert_to_lora_model(model: tf.keras.Model, **kwargs) -> tf.keras.Model:
    """Creates the LoRA version of a model and transfers all its weights.

    A model of a registered architecture (every tfimm family) becomes its LoRA
    class. A LoRA model built by ``tfimm.architectures.lora`` becomes
    lora_ckpt's LoRA class of its base architecture, with LoRA on the same
    Dense layers and their ``A``/``B``, rank and alpha carried over exactly.
    Any other Keras model (functional, Sequential or subclassed) gets
    LoRA on the layers that ``target_layers`` names (see
    :func:`lora_ckpt.graph_models.convert_graph_model` and
    :func:`lora_ckpt.subclassed_models.convert_subclassed_model`).

    Args:
        model: A registered architecture, or any tf_keras model.
        **kwargs: LoRA fields (``lora_rank``, ``lora_alpha``, ...); for a
            registered architecture also config overrides such as
            ``nb_classes`` (a classifier of another size keeps its fresh
            initialisation) and ``lora_trainable_layers`` (layers trained and
            saved in full besides the classifier: PEFT's ``modules_to_save``);
            for a functional/Sequential model ``target_layers`` (names or
            glob patterns, required) and ``lora_trainable_layers``.

    Returns:
        The built LoRA model; its LoRA ``B`` weights are zero (or, for a tfimm
        LoRA model, its own), so it computes what ``model`` computes.

    Raises:
        UnregisteredArchitectureError: If the model is not registered and no
            ``target_layers`` are given, or is a tfimm LoRA model whose base
            architecture lora_ckpt has no LoRA variant for.
        LoRAConfigError: For unknown config fields or invalid LoRA values, a
            ``target_layers`` pattern that matches nothing, a model that is
            already a LoRA architecture, or a tfimm ``LoRAConv2D`` (its
            per-position update has no exact lora_ckpt equivalent).
        MergeStateError: For a tfimm LoRA model with merged layers.
        KerasObjectError: For a Keras 3 model.
    """
    require_tf_keras(model, "convert_to_lora_model")
    foreign = foreign_lora_layers(named_layers(model))
    if foreign:
        return _convert_tfimm_lora_model(model, foreign, kwargs)
    target_layers = kwargs.pop("target_layers", None)
    model_cls = type(model)
    registered = model_cls in registered_architectures()
    if is_lora_architecture(model_cls) and lora_base_architecture(model_cls) is not model_cls:
        raise LoRAConfigError(
            f"{model_cls.__name__} is already a LoRA model; converting it again would "
            "re-initialise its LoRA weights. Use it as it is, or convert_to_regular_model first."
        )
    if target_layers is not None or not registered:
        if target_layers is None:
            if not is_graph_model(model) and getattr(model, "cfg", None) is None:
                raise UnregisteredArchitectureError(
                    f"{model_cls.__name__} is not a registered LoRA architecture: choose the "
                    "layers that get LoRA with target_layers=[paths, names or glob patterns]. "
                    f"Registered architectures: {sorted(c.__name__ for c in registered_architectures())}."
                )
            raise LoRAConfigError(
                f"Choose the layers of this {model_cls.__name__} model that get LoRA "
                "with target_layers=[paths, names or glob patterns], e.g. ['*conv*']."
            )
        if registered:
            raise LoRAConfigError(
                f"{model_cls.__name__} is a registered architecture: choose its LoRA layers "
                "with lora_layer_groups, not target_layers."
            )
        if is_graph_model(model):
            return convert_graph_model(model, target_layers, **kwargs)
        return convert_subclassed_model(model, target_layers, **kwargs)
    lora_cls = lora_architecture(model_cls)
    kwargs = _normalize_kwargs(kwargs)
    trainable = kwargs.pop("lora_trainable_layers", None)
    cfg = _config_with_overrides(
        _lora_cfg_class(model_cls), dataclasses.asdict(model.cfg), kwargs, lora_cls.__name__
    )
    lora_model = _build(lora_cls(cfg=cfg))
    _transfer(_build(model), lora_model)
    _reset_magnitudes(lora_model)
    if trainable:
        set_modules_to_save(lora_model, trainable)
    return lora_model


def convert_to_regular_model(model: tf.keras.Model, merge: bool = True) -> tf.keras.Model:
    """Converts a LoRA model into its regular architecture.

    The LoRA model itself is left as it was (layers merged for the transfer
    are unmerged afterwards, bit for bit).

    Args:
        model: An instance of a registered LoRA architecture, or a
            functional/Sequential/subclassed model with LoRA layers.
        merge: ``True``: fold the updates in (the result computes what
            ``model`` computes with LoRA enabled). ``False``: the base model
            without the updates (PEFT's ``unload``).

    Returns:
        A built regular model.

    Raises:
        UnregisteredArchitectureError: If the class is not a LoRA variant,
            or the model was built by tfimm's LoRA module (convert it with
            :func:`convert_to_lora_model` first).
        MergeStateError: With ``merge=False`` for a model merged when it was
            saved (its base kernel is not known).
    """
    require_tf_keras(model, "convert_to_regular_model")
    if not merge:
        with _base_kernels(model):
            return convert_to_regular_model(model, merge=True)
    if not is_lora_architecture(type(model)):
        if not lora_layers(model):
            raise UnregisteredArchitectureError(
                f"{type(model).__name__} model '{model.name}' is neither a registered LoRA "
                "architecture nor a model with LoRA layers: there is nothing to convert back."
            )
        if is_graph_model(model):
            return graph_model_to_regular(model)
        return convert_subclassed_model_to_regular(model)
    base_cls = lora_base_architecture(type(model))
    base_cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if not k.startswith("lora_")}
    base_cfg = _config_with_overrides(base_cls.cfg_class, base_cfg, {}, base_cls.__name__)
    base_model = _build(base_cls(cfg=base_cfg))

    # A disabled layer adds nothing, so its base kernel is what the model computes with.
    to_merge = [layer for _, layer in lora_layers(model) if not layer.merged and layer.lora_enabled]
    try:
        for layer in to_merge:
            layer.merge_weights()
        _transfer(model, base_model)
    finally:
        for layer in to_merge:
            if layer.merged:
                layer.unmerge_weights()
    return base_model


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
def _base_kernels(model):
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


def supported_architectures() -> dict:
    """What :func:`convert_to_lora_model` can convert, and which layers get LoRA.

    Returns:
        ``{base class name: {"base", "lora_class", "layer_groups",
        "default_groups", "model_names"}}`` for every registered architecture
        (every tfimm family), ``"model_names"``: every tfimm model name that
        ``create_model`` takes, and entries ``"functional/Sequential"`` and
        ``"subclassed"`` for other Keras models.
    """
    result = {}
    for base_cls, lora_cls in registered_architectures().items():
        groups = lora_cls.layer_groups() if hasattr(lora_cls, "layer_groups") else {}
        default = getattr(lora_cls.cfg_class(), "lora_layer_groups", ()) if groups else ()
        result[base_cls.__name__] = {
            "base": f"{base_cls.__module__}.{base_cls.__qualname__}",
            "lora_class": f"{lora_cls.__module__}.{lora_cls.__qualname__}",
            "layer_groups": {name: list(paths) for name, paths in groups.items()},
            "default_groups": list(default),
        }
    names = tfimm.list_models()
    for entry in result.values():
        entry["model_names"] = []
    for name in names:
        family = model_class(name).__name__
        if family in result:
            result[family]["model_names"].append(name)
    result["model_names"] = [n for n in names if model_class(n) in registered_architectures()]
    result["functional/Sequential"] = {
        "base": "tf.keras.Model (functional or Sequential)",
        "lora_class": "the same kind of model, rebuilt",
        "layer_types": supported_layer_types(),
        "select_with": "target_layers=[layer names or glob patterns]",
    }
    result["subclassed"] = {
        "base": "any subclassed tf.keras.Model with get_config/from_config (or a tfimm cfg)",
        "lora_class": "the same class, with LoRA layers put where its attributes hold them",
        "layer_types": supported_layer_types(),
        "select_with": "target_layers=[layer paths, names or glob patterns]",
    }
    return result


__all__ = [
    "convert_to_lora_model",
    "convert_to_regular_model",
    "create_model",
    "lora_disabled",
    "lora_layers",
    "merge_lora_weights",
    "merge_weights",
    "print_trainable_parameters",
    "set_lora_enabled",
    "supported_architectures",
    "unmerge_lora_weights",
]
