"""The one walk over a model's layer tree that the rest of the package uses.

A layer's *path* is how the model reaches it, as ``tf.train.Checkpoint``
names it: attribute names (and list indices) in subclassed models,
``stages/0/blocks/1/mlp/fc1`` or ``fc`` in a tfimm ConvNeXt, and layer names
inside functional and Sequential models, whose layers have no attributes.
Paths never contain the model's own name nor names Keras generates per
process (``sequential_3``), so they are the same for every instance of an
architecture: they key weight selection and saved adapters.
"""
from typing import Dict, Iterator, List, Tuple

from ._tf import tf
from .errors import LoRAError


def _is_graph_network(layer) -> bool:
    return isinstance(layer, tf.keras.Model) and getattr(layer, "_is_graph_network", False)


def _children(layer: tf.keras.layers.Layer) -> List[Tuple[str, tf.keras.layers.Layer]]:
    """``(name, child layer)`` one level down."""
    if _is_graph_network(layer):
        return [(child.name, child) for child in layer.layers]
    found: List[Tuple[str, tf.keras.layers.Layer]] = []

    def visit(obj, prefix):
        for name, child in tf.train.TrackableView(obj).children(obj).items():
            if isinstance(child, tf.keras.layers.Layer):
                found.append((prefix + name, child))
            elif isinstance(child, (list, tuple, dict)):  # Keras' tracked containers
                visit(child, f"{prefix}{name}/")

    visit(layer, "")
    return found


def named_layers(model: tf.keras.layers.Layer) -> Iterator[Tuple[str, tf.keras.layers.Layer]]:
    """Yields ``(path, layer)`` for every layer below ``model``, depth first.

    A layer shared between several places is yielded once, at its first path.

    Args:
        model: Any Keras model or layer (subclassed, functional, Sequential).

    Yields:
        Pairs of the layer's path and the layer.
    """
    seen = set()

    def walk(layer, prefix):
        for name, child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{name}" if prefix else name
            yield path, child
            yield from walk(child, path)

    yield from walk(model, "")


def variable_short_name(variable: tf.Variable) -> str:
    """The name a variable was created with: ``kernel`` for ``.../fc1/kernel:0``."""
    return variable.name.rsplit("/", 1)[-1].split(":", 1)[0]


def _own_variables(layer, child_layers) -> List[tf.Variable]:
    below = {id(v) for child in child_layers for v in child.weights}
    return [v for v in layer.weights if id(v) not in below]


def named_variables(model: tf.keras.layers.Layer) -> Dict[str, tf.Variable]:
    """Maps ``layer_path/variable_name`` to each variable of the model.

    Args:
        model: A built Keras model or layer.

    Returns:
        An insertion-ordered dict, in the order of :func:`named_layers`.

    Raises:
        LoRAError: If two variables get the same key (two sibling layers with
            the same name), since keys must identify one variable each.
    """
    result: Dict[str, tf.Variable] = {}
    seen = set()
    entries = [("", model)] + list(named_layers(model))
    for path, layer in entries:
        for variable in _own_variables(layer, [child for _, child in _children(layer)]):
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
    return result
