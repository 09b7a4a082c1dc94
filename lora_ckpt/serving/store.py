"""An adapter store: one base model and its adapters in one directory.

::

    STORE/
      base.json        {"model": tfimm name, "config": overrides, "lora": LoRA fields}
      base.h5          the base weights (a regular model's save_weights)
      adapters/NAME/   one adapter directory each (see lora_ckpt.state)

The demo writes a store; ``lora-ckpt serve`` and ``export`` read one.
"""

import dataclasses
import json
import os
import re

from tfimm.models import model_config

from .._tf import tf
from ..errors import BaseWeightsError, LoRAConfigError, StoreError
from ..models import create_model
from ..selection import classifier_paths
from ..state import load_base_weights
from ..state.files import is_work_directory
from ..state.format import CONFIG_FILE

BASE_CONFIG = "base.json"
BASE_WEIGHTS = "base.h5"
ADAPTERS = "adapters"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_adapter_name(name: str) -> str:
    """Returns ``name`` if it is a safe adapter name, else raises.

    Names are 1-64 letters, digits, ``_``, ``.`` or ``-``, starting with a
    letter or digit: never a path, so a request cannot reach outside the store.

    Raises:
        LoRAConfigError: For any other name.
    """
    if (
        not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or ".." in name
        or is_work_directory(name)
    ):
        raise LoRAConfigError(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return name


def adapter_path(store: str, name: str) -> str:
    """The directory of adapter ``name`` in ``store`` (the name is validated)."""
    return os.path.join(store, ADAPTERS, validate_adapter_name(name))


def store_adapters(store: str) -> list[str]:
    """Names of the committed adapters in ``store``, sorted."""
    root = os.path.join(store, ADAPTERS)
    if not tf.io.gfile.isdir(root):
        return []
    return sorted(
        name.rstrip("/")
        for name in tf.io.gfile.listdir(root)
        if _NAME.fullmatch(name.rstrip("/"))
        and not is_work_directory(name.rstrip("/"))
        and tf.io.gfile.exists(os.path.join(root, name, CONFIG_FILE))
    )


def write_base(store: str, model_name: str, config: dict, lora: dict, regular_model) -> None:
    """Writes ``base.json`` and ``base.h5`` of a store.

    Args:
        store: The store directory (created if needed).
        model_name: The tfimm model name.
        config: Config overrides the base was built with (JSON-serialisable).
        lora: LoRA fields serving models get (``lora_layer_groups``, ...).
        regular_model: The trained regular base model.
    """
    tf.io.gfile.makedirs(os.path.join(store, ADAPTERS))
    regular_model.save_weights(os.path.join(store, BASE_WEIGHTS))
    with tf.io.gfile.GFile(os.path.join(store, BASE_CONFIG), "w") as handle:
        json.dump({"model": model_name, "config": config, "lora": lora}, handle, indent=2)


def read_base_config(store: str) -> dict:
    """The parsed ``base.json`` of a store.

    Raises:
        StoreError: If the store has no ``base.json``.
    """
    path = os.path.join(store, BASE_CONFIG)
    if not tf.io.gfile.exists(path):
        raise StoreError(
            f"{store} is not an adapter store (no {BASE_CONFIG}); run `lora-ckpt demo` "
            "to create one, or pass --model and --base-weights."
        )
    with tf.io.gfile.GFile(path) as handle:
        return json.load(handle)


def build_base_model(
    store: str,
    model_name: str | None = None,
    base_weights: str | None = None,
    overrides: dict | None = None,
):
    """Builds the LoRA model of a store with its base weights loaded.

    Args:
        store: The store directory.
        model_name: Overrides the store's model (then ``base.json`` is optional).
        base_weights: Overrides the store's ``base.h5``.
        overrides: Config fields to change (e.g. ``nb_classes`` for an
            adapter with a head of its own width: that head is then left out
            of the base weights).

    Returns:
        ``(model, base_config)``.

    Raises:
        StoreError: If the store has no ``base.json`` and no model is named.
        BaseWeightsError: If named base weights do not exist or do not fit.
    """
    if model_name is None or tf.io.gfile.exists(os.path.join(store, BASE_CONFIG)):
        base = read_base_config(store)
    else:
        base = {"model": model_name, "config": {}, "lora": {}}
    if model_name is not None:
        base["model"] = model_name
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in base["config"].items()}
    lora = {k: tuple(v) if isinstance(v, list) else v for k, v in base["lora"].items()}
    current = {**dataclasses.asdict(model_config(base["model"])), **config}
    changed = {k: v for k, v in (overrides or {}).items() if current.get(k) != v}
    model = create_model(base["model"], **{**config, **changed}, **lora)
    # A classifier of another width keeps its fresh weights (the adapter brings its own).
    skip = classifier_paths(model) if "nb_classes" in changed else None
    weights = base_weights or os.path.join(store, BASE_WEIGHTS)
    if tf.io.gfile.exists(weights) or tf.io.gfile.exists(weights + ".index"):
        load_base_weights(model, weights, skip=skip)
    elif base_weights is not None:
        raise BaseWeightsError(f"Base weights {base_weights} not found.")
    return model, base
