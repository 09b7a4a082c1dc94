"""The one walk over a model's layer tree that the rest of the package uses.

A layer's *path* is how the model reaches it, as ``tf.train.Checkpoint``
names it: attribute names (and list indices) in subclassed models,
``stages/0/blocks/1/mlp/fc1`` or ``fc`` in a tfimm ConvNeXt, and layer names
inside functional and Sequential models, whose layers have no attributes.
Paths never contain the model's own name nor names Keras generates per
process (``sequential_3``), so they are the same for every instance of an
architecture: they key weight selection and saved adapters.
"""

from collections.abc import Iterator

from ._tf import require_tf_keras, tf
from .errors import LoRAError, UnsupportedLayerError
from .layers import LORA_STATE_NAME, is_lora_layer

__all__ = [
    "layer_references",
    "layers_and_variables",
    "named_layers",
    "named_variables",
    "replace_layer",
    "variable_short_name",
]


def _is_graph_network(layer) -> bool:
    return isinstance(layer, tf.keras.Model) and getattr(layer, "_is_graph_network", False)


def _direct(layer) -> tuple[list[tuple[str, tf.keras.layers.Layer]], list[tf.Variable]]:
    """The child layers (with their path components) and the own variables of a layer."""
    layers: list[tuple[str, tf.keras.layers.Layer]] = []
    variables: list[tf.Variable] = []

    def visit(obj, prefix):
        for name, child in tf.train.TrackableView(obj).children(obj).items():
            if isinstance(child, tf.Variable):
                # A LoRA layer's merged/enabled flags: runtime state, not a weight.
                if not (name == LORA_STATE_NAME and is_lora_layer(obj)):
                    variables.append(child)
            elif isinstance(child, tf.keras.layers.Layer):
                layers.append((prefix + name, child))
            elif isinstance(child, (list, tuple, dict)):  # Keras' tracked containers
                visit(child, f"{prefix}{name}/")

    visit(layer, "")
    if _is_graph_network(layer):
        layers = [(child.name, child) for child in layer.layers]
    return layers, variables


def _walk(model) -> Iterator[tuple[str, tf.keras.layers.Layer, list[tf.Variable]]]:
    """``(path, layer, own variables)`` for the model ("") and every layer below, depth first."""
    require_tf_keras(model)
    seen = {id(model)}

    def walk(layer, path):
        children, variables = _direct(layer)
        yield path, layer, variables
        for name, child in children:
            if id(child) not in seen:
                seen.add(id(child))
                yield from walk(child, f"{path}/{name}" if path else name)

    yield from walk(model, "")


def named_layers(model: tf.keras.layers.Layer) -> Iterator[tuple[str, tf.keras.layers.Layer]]:
    """Yields ``(path, layer)`` for every layer below ``model``, depth first.

    A layer shared between several places is yielded once, at its first path.

    Args:
        model: Any Keras model or layer (subclassed, functional, Sequential).

    Yields:
        Pairs of the layer's path and the layer.
    """
    for path, layer, _ in _walk(model):
        if layer is not model:
            yield path, layer


def layer_references(model) -> dict[int, list[str]]:
    """Every path at which each layer is held, by ``id``: a layer held by two
    attributes (``self.d2 = self.d``) has two, where :func:`named_layers`
    yields it once."""
    references: dict[int, list[str]] = {}
    expanded = {id(model)}

    def walk(layer, path):
        for name, child in _direct(layer)[0]:
            child_path = f"{path}/{name}" if path else name
            references.setdefault(id(child), []).append(child_path)
            if id(child) not in expanded:
                expanded.add(id(child))
                walk(child, child_path)

    walk(model, "")
    return references


def variable_short_name(variable: tf.Variable) -> str:
    """The name a variable was created with: ``kernel`` for ``.../fc1/kernel:0``."""
    return variable.name.rsplit("/", 1)[-1].split(":", 1)[0]


def named_variables(model: tf.keras.layers.Layer) -> dict[str, tf.Variable]:
    """Maps ``layer_path/variable_name`` to each variable of the model.

    Args:
        model: A built Keras model or layer.

    Returns:
        An insertion-ordered dict, in the order of :func:`named_layers`.

    Raises:
        LoRAError: If two variables get the same key (two sibling layers with
            the same name), since keys must identify one variable each.
    """
    return layers_and_variables(model)[1]


def layers_and_variables(model) -> tuple[list, dict[str, tf.Variable]]:
    """:func:`named_layers` and :func:`named_variables` from one walk of the model.

    Raises:
        LoRAError: As :func:`named_variables`.
    """
    layers: list[tuple[str, tf.keras.layers.Layer]] = []
    result: dict[str, tf.Variable] = {}
    seen = set()
    for path, layer, variables in _walk(model):
        if layer is not model:
            layers.append((path, layer))
        for variable in variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            name = variable_short_name(variable)
            key = f"{path}/{name}" if path else name
            if key in result:
                raise LoRAError(
                    f"Two variables of the model have the same path '{key}': give "
                    "sibling layers distinct names."
                )
            result[key] = variable
    return layers, result


def _is_list(obj) -> bool:
    return isinstance(obj, list) or type(obj).__name__ == "ListWrapper"


def _is_dict(obj) -> bool:
    return isinstance(obj, dict) or type(obj).__name__ == "_DictWrapper"


def replace_layer(model, path: str, new_layer) -> None:
    """Puts ``new_layer`` where ``path`` reaches in a subclassed model (or layer).

    Attributes are assigned; a list entry is replaced by assigning a fresh
    list (Keras' tracked lists stop being checkpointable after an item
    assignment); dict keys may contain ``/`` (tfimm's ``stage_0/block_0``).

    Args:
        model: The model.
        path: A path as :func:`named_layers` gives it (``stages/0/blocks/1/mlp/fc1``).
        new_layer: The layer to put there.

    Raises:
        UnsupportedLayerError: If the path passes through a functional or
            Sequential model, whose graph an attribute assignment would not change.
    """
    parts = path.split("/")
    chain = [(None, model)]  # (how the parent reached it, object)
    while parts:
        owner = chain[-1][1]
        if _is_graph_network(owner):
            raise UnsupportedLayerError(
                f"Layer '{path}' sits inside the functional model '{owner.name}', whose "
                "graph cannot be changed in place; convert that model with target_layers."
            )
        if _is_dict(owner):
            # The longest key that the remaining path starts with.
            size = max(n for n in range(1, len(parts) + 1) if "/".join(parts[:n]) in owner)
            key, parts = "/".join(parts[:size]), parts[size:]
            chain.append((key, owner[key]))
        elif _is_list(owner):
            chain.append((int(parts[0]), owner[int(parts[0])]))
            parts = parts[1:]
        else:
            chain.append((parts[0], getattr(owner, parts[0])))
            parts = parts[1:]
    value = new_layer
    for i in range(len(chain) - 1, 0, -1):
        key, parent = chain[i][0], chain[i - 1][1]
        if _is_list(parent):
            # A fresh list, put in the list's own place on the next step up.
            value = [value if j == key else item for j, item in enumerate(parent)]
            continue
        if _is_dict(parent):
            parent[key] = value
        else:
            setattr(parent, key, value)
        return
