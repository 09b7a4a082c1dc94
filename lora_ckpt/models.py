"""Model-level LoRA API: the factory, conversion both ways, merging.

The names and signatures are those of ``tfimm.architectures.lora``, so code
written against it works after changing the import.
"""

import dataclasses
import difflib

import tfimm
from tfimm.models import model_class, model_config

from . import architectures  # noqa: F401  (registers the LoRA classes this factory builds)
from ._tf import require_tf_keras, tf
from .errors import (
    LoRAConfigError,
    UnregisteredArchitectureError,
)
from .graph_models import convert_graph_model, graph_model_to_regular, is_graph_model
from .layers import supported_layer_types

# tfimm's LoRAConvNeXtConfig spells this field `lora_train_classifer`.
from .model_build import (
    build,
    config_with_overrides,
    lora_cfg_class,
    normalize_kwargs,
    reset_magnitudes,
    tfimm_create,
    transfer,
)
from .model_ops import (
    base_kernels_in_place,
    lora_disabled,
    lora_layers,
    merge_lora_weights,
    merge_weights,
    print_trainable_parameters,
    set_lora_enabled,
    unmerge_lora_weights,
)
from .registry import (
    is_lora_architecture,
    lora_architecture,
    lora_base_architecture,
    registered_architectures,
)
from .selection import (
    foreign_lora_layers,
    set_modules_to_save,
)
from .subclassed_models import convert_subclassed_model, convert_subclassed_model_to_regular
from .tfimm_lora_models import convert_tfimm_lora_model
from .traversal import named_layers


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
    kwargs = normalize_kwargs(kwargs)
    if pretrained or model_path:
        lora_kwargs = {k: v for k, v in kwargs.items() if k.startswith("lora_")}
        full_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("lora_")}
        full_model = tfimm_create(
            model_name, pretrained=pretrained, model_path=model_path, **full_kwargs
        )
        return convert_to_lora_model(full_model, **lora_kwargs)

    trainable = kwargs.pop("lora_trainable_layers", None)
    base_cfg = dataclasses.asdict(model_config(model_name))
    cfg = config_with_overrides(lora_cfg_class(cls), base_cfg, kwargs, model_name)
    model = build(lora_cls(cfg=cfg))
    reset_magnitudes(model)
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
        return convert_tfimm_lora_model(model, foreign, kwargs)
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
    kwargs = normalize_kwargs(kwargs)
    trainable = kwargs.pop("lora_trainable_layers", None)
    cfg = config_with_overrides(
        lora_cfg_class(model_cls), dataclasses.asdict(model.cfg), kwargs, lora_cls.__name__
    )
    lora_model = build(lora_cls(cfg=cfg))
    transfer(build(model), lora_model)
    reset_magnitudes(lora_model)
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
        with base_kernels_in_place(model):
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
    base_cfg = config_with_overrides(base_cls.cfg_class, base_cfg, {}, base_cls.__name__)
    base_model = build(base_cls(cfg=base_cfg))

    # A disabled layer adds nothing, so its base kernel is what the model computes with.
    to_merge = [layer for _, layer in lora_layers(model) if not layer.merged and layer.lora_enabled]
    try:
        for layer in to_merge:
            layer.merge_weights()
        transfer(model, base_model)
    finally:
        for layer in to_merge:
            if layer.merged:
                layer.unmerge_weights()
    return base_model


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
