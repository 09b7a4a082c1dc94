"""LoRA for any subclassed Keras model, by layer path pattern.

The generic route for models that no registered architecture covers: a copy
of the model is made (from its tfimm config, or ``get_config``/``from_config``)
with the same weights, and each ``Dense``/``Conv2D`` whose path, name or glob
is in ``target_layers`` is replaced where its parent holds it (an attribute or
a list entry). A functional model nested inside is converted as a whole by
:func:`lora_ckpt.graph_models.convert_graph_model`, since assigning to it
would not change its graph. Every other leaf layer is frozen unless named in
``lora_trainable_layers``, so Keras' ``fit`` trains exactly what an adapter
saves.
"""

from collections.abc import Iterable

from ._tf import tf
from .errors import LoRAConfigError
from .graph_models import (
    check_conversion_arguments,
    check_pattern_keys,
    convert_graph_targets,
    convert_target_layer,
    is_graph_model,
    match_targets,
)
from .layers import is_lora_layer
from .selection import LoRASettings, match_layers
from .traversal import layer_references, named_layers, named_variables, replace_layer

__all__ = ["convert_subclassed_model", "convert_subclassed_model_to_regular"]


def _sample_inputs(model):
    if hasattr(model, "dummy_inputs"):
        return (model.dummy_inputs,), {}
    spec = model.save_spec(dynamic_batch=True) if model.built else None
    shape = getattr(model, "_build_input_shape", None)  # model.build(shape), never called
    if spec is None and shape is not None:
        return (tf.zeros([1 if d is None else d for d in tf.TensorShape(shape)]),), {}
    if spec is None:
        raise LoRAConfigError(
            f"Model '{model.name}' is not built; call it on a batch before converting it."
        )

    def zeros(tensor_spec):
        return tf.zeros([1 if d is None else d for d in tensor_spec.shape], tensor_spec.dtype)

    args, kwargs = tf.nest.map_structure(zeros, spec)
    return args, kwargs


def _copy_model_structure(model: tf.keras.Model) -> tf.keras.Model:
    """A new, built instance of ``model``'s class made from its config (weights not copied).

    A model that LoRA layers were put into after construction comes back
    with its original layers: the config does not know them.

    Raises:
        LoRAConfigError: If the model cannot be rebuilt from its config.
    """
    try:
        if getattr(model, "cfg", None) is not None:
            copy = type(model)(cfg=model.cfg)
        else:
            copy = type(model).from_config(model.get_config())
    except (NotImplementedError, TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise LoRAConfigError(
            f"{type(model).__name__} cannot be rebuilt from its config ({exc}); give it "
            "get_config/from_config (Keras' serialization API) to convert it."
        ) from exc
    args, kwargs = _sample_inputs(model)
    copy(*args, **kwargs)
    return copy


def convert_subclassed_model(
    model: tf.keras.Model, target_layers: Iterable[str], **kwargs
) -> tf.keras.Model:
    """Converts the matching layers of a subclassed model to LoRA.

    Args:
        model: A built subclassed Keras model (a tfimm model of any family,
            or your own) without LoRA layers.
        target_layers: Layer paths (``stages/0/blocks/1/mlp/fc1``), names or
            ``fnmatch`` patterns over either; each must match a Dense or
            Conv2D (groups=1) layer. Paths reach into nested functional models.
        **kwargs: As for :func:`lora_ckpt.graph_models.convert_graph_model`.

    Returns:
        A new model of the same class with LoRA layers and all of ``model``'s
        weights; the LoRA ``B`` weights are zero, so it computes what
        ``model`` computes.

    Raises:
        LayerNotFoundError: If a pattern matches no convertible layer.
        LoRAConfigError: For unknown or invalid arguments, a model that
            already has LoRA layers, or one that cannot be rebuilt.
    """
    train_bias = check_conversion_arguments(model, kwargs)
    if any(is_lora_layer(layer) for _, layer in named_layers(model)):
        raise LoRAConfigError(
            f"Model '{model.name}' already has LoRA layers; converting it again would "
            "re-initialise them. Use it as it is, or convert_to_regular_model first."
        )
    copy = _copy_model_structure(model)
    copy.set_weights(model.get_weights())
    layers = list(named_layers(copy))
    by_path = dict(layers)
    targets = match_targets(copy, target_layers, layers)
    check_pattern_keys(copy, kwargs, [(path, by_path[path]) for path in targets])
    trainable = match_layers(
        copy, list(kwargs.get("lora_trainable_layers", [])), layers, "lora_trainable_layers entry"
    )
    graphs = [path for path, layer in layers if is_graph_model(layer)]

    def graph_of(path):
        return next((g for g in graphs if path.startswith(g + "/")), None)

    references = layer_references(copy)
    for path in targets:
        if graph_of(path) is None:
            lora_layer = convert_target_layer(path, by_path[path], kwargs)
            for place in references[id(by_path[path])]:  # a layer held twice, both places
                replace_layer(copy, place, lora_layer)
    for graph in dict.fromkeys(g for g in map(graph_of, targets) if g is not None):
        relative = [p[len(graph) + 1 :] for p in targets if graph_of(p) == graph]
        frozen_except = [p[len(graph) + 1 :] for p in trainable if p.startswith(graph + "/")]
        converted = convert_graph_targets(by_path[graph], relative, frozen_except, kwargs)
        replace_layer(copy, graph, converted)

    converted = list(named_layers(copy))
    paths = [path for path, _ in converted]
    for path, layer in converted:
        leaf = not any(other.startswith(path + "/") for other in paths)
        if leaf and not is_lora_layer(layer) and graph_of(path) is None:
            # A frozen BatchNorm also runs in inference mode, keeping the
            # base's moving statistics.
            layer.trainable = path in trainable
    copy.lora_settings = LoRASettings(train_bias, tuple(trainable))
    return copy


def convert_subclassed_model_to_regular(model: tf.keras.Model) -> tf.keras.Model:
    """Rebuilds a model converted by :func:`convert_subclassed_model` without LoRA.

    Args:
        model: The converted model.

    Returns:
        A new model of its class with plain layers; each LoRA layer's kernel
        is its merged kernel (its base kernel if LoRA is disabled there).

    Raises:
        LoRAConfigError: If the model cannot be rebuilt from its config.
    """
    regular = _copy_model_structure(model)
    source = named_variables(model)
    lora_kernels = {
        f"{path}/kernel": layer
        for path, layer in named_layers(model)
        if is_lora_layer(layer) and not layer.merged and layer.lora_enabled
    }
    for key, var in named_variables(regular).items():
        layer = lora_kernels.get(key)
        var.assign(layer.merged_kernel() if layer is not None else source[key])
    return regular
