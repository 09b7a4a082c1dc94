"""from_adapter: the LoRA model an adapter was trained with, rebuilt from its config.

PEFT's ``PeftModel.from_pretrained``: the adapter's config names the base
architecture and its configuration, and records every LoRA layer's path,
rank, alpha and DoRA/rsLoRA flags and what else was saved (biases, a head).
That is enough to build the same LoRA model, load the base weights into it
and then the adapter, each through the loaders' checks.
"""

import contextlib
import dataclasses
import math
import re

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

__all__ = ["estimate_parameters", "from_adapter", "lora_model_config"]


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


# ---- the size of a model, by arithmetic on its config --------------------------------
#
# Dominant terms only, each counted generously (every bias, norm and small
# layer is covered by the slack of the terms kept), so the estimate is usually high:
# it is what refuses a hostile config before anything is built.


def _ints(value, n: int | None = None) -> list[int]:
    """An int or a sequence of numbers as a list of ints (``n`` copies of a scalar)."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] * (n or 1)


def _floats(value, n: int) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)] * n


def _area(value) -> int:
    """Pixels of a size given as an int or ``(height, width)``."""
    sizes = _ints(value)
    return sizes[0] * sizes[-1]


def _head(c: dict, width: int, heads: int = 1) -> int:
    return heads * int(c["nb_classes"]) * (width + 1)


def _stages(c: dict, widths, depths, per_block, tokens: int = 0) -> int:
    """Stem, blocks, downsampling between stages, position embeddings."""
    total = int(c.get("in_channels", 3)) * 64 * widths[0] + tokens * widths[0]
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        total += depth * (per_block(i, width) + 64 * width)
        if i:
            total += 9 * widths[i - 1] * width
    return total


def _transformer(c: dict) -> int:
    """ViT, DeiT, CaiT, PiT, Swin, PVT, PVTv2, ConvNeXt, PoolFormer, ConvMixer."""
    depths = _ints(c.get("nb_blocks", c.get("depth")))
    n = len(depths)
    kind = c["_family"]
    embed = _ints(c["embed_dim"], n)
    if kind == "SwinTransformerConfig":  # the width doubles at each stage
        embed = [embed[0] * 2**i for i in range(n)]
    ratios = _floats(c.get("mlp_ratio", 4.0), n)
    sr = _ints(c.get("sr_ratio", 1), n)
    patch = _ints(c.get("patch_size", 4), n)[0]
    tokens = _area(c["input_size"]) // max(1, patch) ** 2

    def block(i, w):
        if kind in ("ConvNeXtConfig", "PoolFormerConfig"):  # no attention
            return int(2 * ratios[i] * w * w) + 49 * w
        if kind == "ConvMixerConfig":
            return w * w + _area(c["kernel_size"]) * w
        attention = (4 + sr[i] ** 2) * w * w
        if kind == "SwinTransformerConfig":
            window = int(c["window_size"])  # a bias table, and an index of window**4
            attention += (2 * window - 1) ** 2 * _ints(c["nb_heads"], n)[i] + window**4
        return attention + int(2 * ratios[i] * w * w)

    if kind == "CaiTConfig":
        depths = [depths[0] + 2]  # and two class-attention blocks
    has_tokens = kind in ("ViTConfig", "CaiTConfig", "PoolingVisionTransformerConfig")
    total = _stages(c, embed, depths, block, tokens if has_tokens else 0)
    if kind == "PyramidVisionTransformerConfig":
        total += sum(tokens // 4**i * w for i, w in enumerate(embed))
    if kind == "ViTConfig" and c.get("patch_layer") == "hybrid_embeddings":
        total += 30_000_000  # a ResNet stem
    representation = c.get("representation_size") or 0
    total += representation * (embed[-1] + 1)
    width = representation or embed[-1]
    return total + _head(c, width, 2 if c.get("distilled") else 1)


def _mlp_mixer(c: dict) -> int:
    """MLP-Mixer, ResMLP, gMLP: channel MLPs plus token mixing of tokens x tokens."""
    w, depth = int(c["embed_dim"]), int(c["nb_blocks"])
    token_ratio, channel_ratio = _floats(c["mlp_ratio"], 2)
    tokens = _area(c["input_size"]) // int(_ints(c["patch_size"])[0]) ** 2
    per_block = 3 * channel_ratio * w * w + 3 * token_ratio * tokens * tokens + 2 * tokens * w
    return int(_stages(c, [w], [depth], lambda i, w: int(per_block)) + _head(c, w))


def _resnet(c: dict) -> int:
    depths, channels = _ints(c["nb_blocks"]), _ints(c["nb_channels"])
    bottleneck = "bottleneck" in str(c.get("block", "bottleneck"))
    cardinality, base_width = int(c.get("cardinality", 1)), int(c.get("base_width", 64))
    total, previous = 64 * max(64, int(c.get("stem_width", 64))) ** 2 // 4, 64
    for depth, ch in zip(depths, channels, strict=True):
        if bottleneck:
            mid = ch * base_width // 64 * cardinality
            out = 4 * ch
            block = 2 * out * mid + 9 * mid * mid // cardinality + out * out // 4
        else:
            mid = out = ch
            block = 18 * out * out + out * out // 4
        total += depth * block + previous * out * 2
        previous = out
    return total + _head(c, previous)


def _resnetv2(c: dict) -> int:
    factor = int(c.get("width_factor", 1))
    depths, channels = _ints(c["nb_blocks"]), [ch * factor for ch in _ints(c["nb_channels"])]
    total, previous = 49 * 3 * 64 * factor, 64 * factor
    for depth, out in zip(depths, channels, strict=True):
        mid = out // 4
        total += depth * (2 * out * mid + 9 * mid * mid + 4 * out) + previous * out
        previous = out
    return total + _head(c, previous)


_BLOCK = re.compile(r"([a-z]+)(\d+(?:\.\d+)*)")


def _efficientnet(c: dict) -> int:
    multiplier, depth = float(c["channel_multiplier"]), float(c["depth_multiplier"])
    previous = int(c["stem_size"])
    total = 27 * previous
    for stage in c["architecture"]:
        for text in stage:
            kind, *parts = str(text).split("_")
            values = {}
            for part in parts:
                match = _BLOCK.fullmatch(part)
                if match:
                    values[match[1]] = max(float(v) for v in match[2].split(".") if v)
            out = int(values.get("c", 0) * multiplier) + 8
            mid = int(previous * values.get("e", 1.0)) + 8
            k2 = int(values.get("k", 3)) ** 2
            repeats = math.ceil(values.get("r", 1) * depth)
            for i in range(repeats):
                inp = previous if i == 0 else out
                mid = int(inp * values.get("e", 1.0)) + 8
                if kind == "er":
                    block = k2 * inp * mid + mid * out
                elif kind == "cn":
                    block = k2 * inp * out
                else:  # ir, ds: pointwise, depthwise, squeeze-excite, pointwise
                    block = inp * mid + k2 * mid + 2 * mid * inp + mid * out
                total += block + 8 * mid
            previous = out
    features = int(c["nb_features"])
    return total + previous * features + _head(c, features)


def _vgg(c: dict) -> int:
    total, previous = 0, int(c.get("in_channels", 3))
    for layer in c["layers"]:
        if isinstance(layer, int):
            total += 9 * previous * layer + layer
            previous = layer
    hidden = int(int(c["nb_features"]) * float(c.get("mlp_ratio", 1.0)))
    total += 49 * previous * hidden + hidden * int(c["nb_features"]) + 2 * hidden
    return total + _head(c, int(c["nb_features"]))


_FAMILIES = {
    "ViTConfig": _transformer,
    "CaiTConfig": _transformer,
    "PoolingVisionTransformerConfig": _transformer,
    "SwinTransformerConfig": _transformer,
    "PyramidVisionTransformerConfig": _transformer,
    "PyramidVisionTransformerV2Config": _transformer,
    "ConvNeXtConfig": _transformer,
    "PoolFormerConfig": _transformer,
    "ConvMixerConfig": _transformer,
    "MLPMixerConfig": _mlp_mixer,
    "ResNetConfig": _resnet,
    "ResNetV2Config": _resnetv2,
    "EfficientNetConfig": _efficientnet,
    "VGGConfig": _vgg,
}


def estimate_parameters(cfg_class: type, config: dict) -> int | None:
    """An estimate of how many parameters a tfimm config builds, within a small factor.

    Pure arithmetic on the config's dominant terms (widths, depths, MLP
    ratios, tokens, classes times the last width): nothing is built, so it
    answers at once for a config of any size.

    Args:
        cfg_class: The config dataclass (a tfimm config or a subclass of one).
        config: Its field values, as recorded in an adapter.

    Returns:
        The estimate, or ``None`` for a config family it does not know or
        values it cannot read (the graph-only build then decides alone).
    """
    family = next((k.__name__ for k in cfg_class.__mro__ if k.__name__ in _FAMILIES), None)
    if family is None:
        return None
    try:
        return int(_FAMILIES[family](dict(config, _family=family)))
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError):
        return None


# ---- the size of a model, by a graph-only build -------------------------------------


def _weights_file_bytes(path: str) -> int:
    """How many bytes of weights a ``.h5`` file or a TF checkpoint prefix holds."""
    if str(path).endswith((".h5", ".hdf5")):
        return tf.io.gfile.stat(path).length if tf.io.gfile.exists(path) else 0
    return sum(tf.io.gfile.stat(f).length for f in tf.io.gfile.glob(f"{path}.data-*"))


def _layer_class_bases() -> dict[type, tuple]:
    found, stack = {}, [tf.keras.layers.Layer]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found[sub] = sub.__bases__
                stack.append(sub)
    return found


@contextlib.contextmanager
def _layer_classes_kept():
    """Puts back the bases of every Keras layer class on the way out.

    tf_keras builds a layer inside a ``tf.Graph`` as a v1 layer by rewriting
    ``__bases__`` of its class and of the classes it derives from, for the
    whole process (``version_utils.swap_class``): every model of those
    classes already built would then raise "invalid state" until a model of
    the class is built eagerly again.
    """
    saved = _layer_class_bases()
    try:
        yield
    finally:
        for cls, bases in saved.items():
            if cls.__bases__ != bases:
                cls.__bases__ = bases


def _refuse(count: int, limit: int, how: str) -> CorruptAdapterError:
    return CorruptAdapterError(
        f"The adapter's base configuration makes a model of {how}{count:,d} parameters, "
        f"more than {limit:,d} (the base weights file's size, or max_parameters); it is "
        "not the model these weights belong to."
    )


def _checked_parameter_count(lora_cls, cfg, base_weights, max_parameters) -> int:
    """Bounds the model's size before it is built: by arithmetic on its config,
    then exactly by a build in a throwaway graph (allocating nothing).

    A hostile config (``embed_dim=[100000, 100000]``) would otherwise allocate
    gigabytes before any other check could refuse it.
    """
    estimate = estimate_parameters(type(cfg), dataclasses.asdict(cfg))
    if estimate is not None and estimate > max_parameters:
        raise _refuse(estimate, max_parameters, "about ")
    try:
        with _layer_classes_kept(), tf.Graph().as_default():
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
        raise _refuse(count, limit, "")
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
            what the file can hold); checked by arithmetic on the config
            and then on a graph-only build, before anything is allocated.

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
