"""from_adapter: the LoRA model an adapter was trained with, rebuilt from its config.

PEFT's ``PeftModel.from_pretrained``: the adapter's config names the base
architecture and its configuration, and records every LoRA layer's path,
rank, alpha and DoRA/rsLoRA flags and what else was saved (biases, a head).
That is enough to build the same LoRA model, load the base weights into it
and then the adapter, each through the loaders' checks.
"""

import dataclasses

from .._tf import tf
from ..errors import (
    CorruptAdapterError,
    LoRAConfigError,
    LoRAError,
    UnregisteredArchitectureError,
)
from ..registry import lora_architecture, registered_architectures
from ..selection import classifier_paths
from .base_weights import load_base_weights
from .fit import qualified_name
from .format import AdapterConfig
from .load import load_adapter_state, read_lora_state


def _tuples(value):
    # JSON gave lists where the config dataclasses hold tuples.
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _one_flag(config: AdapterConfig, name: str) -> bool:
    values = {getattr(layer, name) for layer in config.layers.values()}
    if len(values) > 1:
        raise LoRAConfigError(
            f"The adapter mixes {name} and plain LoRA layers; from_adapter builds models "
            "that use one kind. Build the model yourself and call load_lora_state."
        )
    return values.pop()


def lora_model_config(config: AdapterConfig):
    """The LoRA architecture and config that an adapter's model had.

    Args:
        config: The adapter's config.

    Returns:
        ``(lora class, config dataclass instance)``.

    Raises:
        UnregisteredArchitectureError: If the adapter was not saved from a
            registered architecture (or records no configuration).
        LoRAConfigError: If its layers mix DoRA (or rsLoRA) and plain LoRA.
    """
    record = config.base_model
    base_cls = next(
        (c for c in registered_architectures() if qualified_name(c) == record.architecture), None
    )
    if base_cls is None:
        raise UnregisteredArchitectureError(
            f"from_adapter rebuilds registered architectures (every tfimm family); this "
            f"adapter was saved from a {record.architecture}. Build that model yourself "
            "and call load_lora_state."
        )
    if record.config is None:
        raise CorruptAdapterError(
            f"The adapter records no configuration of its {record.architecture} base, so "
            "from_adapter cannot rebuild it; build the model and call load_lora_state."
        )
    lora_cls = lora_architecture(base_cls)
    cfg_cls = lora_cls.cfg_class
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {k: _tuples(v) for k, v in record.config.items() if k in fields}
    if "name" in fields:
        # Adapters do not record the model's name (it does not change weights),
        # but Keras scopes variable names by it, and weight files key by those.
        values["name"] = base_cls.__name__.lower()
    layers = config.layers
    values.update(
        lora_target_layers=tuple(layers),
        lora_rank=max(layer.rank for layer in layers.values()),
        lora_rank_pattern={path: layer.rank for path, layer in layers.items()},
        lora_alpha_pattern={path: layer.alpha for path, layer in layers.items()},
        lora_use_dora=_one_flag(config, "dora"),
        lora_use_rslora=_one_flag(config, "rslora"),
        lora_train_bias=config.saved.bias,
        lora_train_classifier=False,
    )
    try:
        return lora_cls, cfg_cls(**values)
    except (TypeError, ValueError) as exc:
        raise CorruptAdapterError(f"The adapter's base configuration is invalid: {exc}") from exc


def _weights_file_bytes(path: str) -> int:
    """How many bytes of weights a ``.h5`` file or a TF checkpoint prefix holds."""
    if str(path).endswith((".h5", ".hdf5")):
        return tf.io.gfile.stat(path).length if tf.io.gfile.exists(path) else 0
    return sum(tf.io.gfile.stat(f).length for f in tf.io.gfile.glob(f"{path}.data-*"))


def _checked_parameter_count(lora_cls, cfg, base_weights, max_parameters) -> int:
    """Builds the model in a throwaway graph (allocating nothing) and bounds its size.

    A hostile config (``embed_dim=[100000, 100000]``) would otherwise allocate
    gigabytes before any other check could refuse it.
    """
    try:
        with tf.Graph().as_default():
            probe = lora_cls(cfg=cfg)
            probe(probe.dummy_inputs)
            count = sum(int(v.shape.num_elements()) for v in probe.weights)
    except LoRAError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, tf.errors.OpError) as exc:
        raise CorruptAdapterError(
            f"The adapter's base configuration does not build a model: {exc!s:.300}"
        ) from exc
    limit = max_parameters
    if base_weights is not None:
        limit = min(limit, _weights_file_bytes(base_weights) // 2)  # float16 at the least
    if count > limit:
        raise CorruptAdapterError(
            f"The adapter's base configuration makes a model of {count:,d} parameters, more "
            f"than {limit:,d} (the base weights file's size, or max_parameters); it is not "
            "the model these weights belong to."
        )
    return count


def from_adapter(
    path: str,
    base_weights: str | None = None,
    *,
    check_base: bool = True,
    max_parameters: int = 2_000_000_000,
) -> tf.keras.Model:
    """Builds the LoRA model an adapter belongs to and loads base weights and adapter.

    Args:
        path: The adapter (a directory, ``ram://`` or ``s3://`` URL).
        base_weights: The base model's weights (an ``.h5`` file or a
            TensorFlow checkpoint prefix, as ``save_weights`` writes them);
            checked against the adapter's fingerprint of its base. A head the
            adapter carries is not read from an ``.h5`` file, so it may have
            another number of classes than the file's.
        check_base: With ``base_weights=None`` the model keeps its fresh
            initialisation, which is not the adapter's base: pass
            ``check_base=False`` to accept that (for tests and inspection).
        max_parameters: The largest model the adapter's recorded
            configuration may describe (with ``base_weights``, also at most
            what the file can hold); checked on a graph-only build before
            anything is allocated.

    Returns:
        The built model, computing what the trained model computed.

    Raises:
        LoRAConfigError: Without ``base_weights`` unless ``check_base=False``.
        UnregisteredArchitectureError: For an adapter of an unregistered model.
        BaseWeightsError: If ``base_weights`` cannot be read or does not fit.
        BaseModelMismatchError: If they are not the weights it was trained on.
        CorruptAdapterError: If the recorded configuration does not build a
            model, or builds one larger than the limit.
        LoRAError: Whatever :func:`lora_ckpt.load_lora_state` raises for the adapter
            (it is read once).
    """
    if base_weights is None and check_base:
        raise LoRAConfigError(
            "from_adapter needs base_weights= (the base the adapter was trained on); pass "
            "check_base=False to build the model on freshly initialised weights."
        )
    state = read_lora_state(path)
    lora_cls, cfg = lora_model_config(state.config)
    _checked_parameter_count(lora_cls, cfg, base_weights, max_parameters)
    model = lora_cls(cfg=cfg)
    model(model.dummy_inputs)
    heads = set(classifier_paths(model))
    carried = sorted(heads & set(state.config.saved.extra_layers))
    if base_weights is not None:
        # A head the adapter carries comes from it, and may be of another width
        # than the file's: HDF5 files can leave it out (a TF checkpoint loads whole).
        h5 = str(base_weights).endswith((".h5", ".hdf5"))
        load_base_weights(model, base_weights, skip=carried if carried and h5 else None)
    if carried:
        model.cfg.lora_train_classifier = True  # trained in full, as when it was saved
    load_adapter_state(model, state, check_base=check_base)  # the adapter read above
    return model
