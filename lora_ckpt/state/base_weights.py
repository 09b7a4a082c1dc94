"""Loading a regular model's weights file straight into a LoRA model.

tfimm's LoRA README had to build the regular model, load its weights and
transfer them. Here the LoRA model reads the base weights file itself: a
Keras HDF5 file (read with h5py) or a TensorFlow checkpoint, both as written
by ``regular_model.save_weights(path)``. LoRA variables are left untouched.
"""

import collections
from collections.abc import Iterable

import h5py
import numpy as np

from .._tf import tf
from ..errors import BaseWeightsError, LoRAConfigError
from ..layers import LORA_WEIGHT_NAMES
from ..models import lora_layers
from ..selection import match_layers
from ..traversal import named_variables, variable_short_name

__all__ = ["load_base_weights"]


_H5_SUFFIXES = (".h5", ".hdf5")


def _without_root(variable_name: str) -> str:
    # Keras HDF5 files key weights by variable name, which starts with the
    # model's name; that name differs between instances ("convnext_tiny_1").
    return variable_name.split("/", 1)[-1].split(":", 1)[0]


def _base_variables(model, skip: Iterable[str] = ()) -> dict[str, tf.Variable]:
    skipped = tuple(f"{path}/" for path in match_layers(model, skip, what="skip entry"))
    return {
        key: var
        for key, var in named_variables(model).items()
        if variable_short_name(var) not in LORA_WEIGHT_NAMES and not key.startswith(skipped)
    }


def _read_h5(path: str) -> dict[str, np.ndarray]:
    weights = {}
    with h5py.File(path, "r") as handle:
        root = handle.get("model_weights", handle)
        groups = [
            n.decode() if isinstance(n, bytes) else n for n in root.attrs.get("layer_names", [])
        ]
        if "top_level_model_weights" in root:  # variables of the model itself (ViT's cls_token)
            groups.append("top_level_model_weights")
        for layer_name in groups:
            group = root[layer_name]
            for name in group.attrs.get("weight_names", []):
                name = name.decode() if isinstance(name, bytes) else name
                weights[_without_root(name)] = np.asarray(group[name])
    return weights


def _load_h5(model, path: str, skip: Iterable[str]) -> None:
    stored = _read_h5(path)
    assignments = []
    for key, var in _base_variables(model, skip).items():
        name = _without_root(var.name)
        if name not in stored:
            raise BaseWeightsError(
                f"{path} has no weight {name} for variable {key}: it is not a weights "
                "file of this architecture and configuration."
            )
        if stored[name].shape != tuple(var.shape):
            raise BaseWeightsError(
                f"{path}: weight {name} has shape {stored[name].shape}, the model "
                f"needs {tuple(var.shape)}."
            )
        assignments.append((var, stored[name]))
    for var, value in assignments:
        var.assign(value)


def _load_tf_checkpoint(model, path: str) -> None:
    base = _base_variables(model)
    stored = [
        (tuple(shape))
        for name, shape in tf.train.list_variables(path)
        if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
        and ".OPTIMIZER_SLOT" not in name
        and not name.startswith("optimizer/")
    ]
    expected = collections.Counter(tuple(v.shape) for v in base.values())
    if collections.Counter(stored) != expected:
        raise BaseWeightsError(
            f"The checkpoint {path} holds {len(stored)} weights whose shapes do not "
            f"match the {len(base)} base weights of this model: it is not a weights "
            "file of this architecture and configuration."
        )
    status = model.load_weights(path)
    status.expect_partial()  # the LoRA variables are not in a regular checkpoint


def load_base_weights(model: tf.keras.Model, path: str, skip: Iterable[str] | None = None) -> None:
    """Loads a regular model's saved weights into a LoRA model's base variables.

    DoRA magnitudes are reset to the new kernels' column norms, so load the
    base before the adapter.

    Args:
        model: A built LoRA model (e.g. from :func:`lora_ckpt.create_model`).
        path: A ``.h5``/``.hdf5`` file or a TensorFlow checkpoint prefix, as
            written by ``save_weights`` of the regular model.
        skip: Layers (paths, names or globs) left as they are, e.g. a
            classifier of another number of classes than the file's
            (HDF5 files only).

    Raises:
        BaseWeightsError: If the file does not exist, or does not hold the
            base weights of this architecture and configuration (checked
            before any assignment).
        LayerNotFoundError: If a ``skip`` entry matches no layer.
        LoRAConfigError: For ``skip`` with a TensorFlow checkpoint.
    """
    path = str(path)
    if path.endswith(_H5_SUFFIXES):
        if not tf.io.gfile.exists(path):
            raise BaseWeightsError(f"Base weights file {path} does not exist.")
        _load_h5(model, path, skip or ())
    elif skip:
        raise LoRAConfigError(
            "load_base_weights(skip=...) reads HDF5 weights files (.h5); save the base "
            "with save_weights('base.h5') or load it whole."
        )
    else:
        if not tf.io.gfile.exists(path + ".index"):
            raise BaseWeightsError(f"No TensorFlow checkpoint at {path} ({path}.index is missing).")
        _load_tf_checkpoint(model, path)
    # A DoRA magnitude starts as its base kernel's column norms: with a new
    # base, the model must compute that base again until an adapter is loaded.
    for _, layer in lora_layers(model):
        layer.reset_lora_magnitude()
