"""What every registered LoRA architecture shares.

An architecture module subclasses a tfimm model with :class:`LoRAModelMixin`,
names its *layer groups* (which layers of each block get LoRA, e.g.
``"attention"``: ``attn.qkv`` and ``attn.proj``) and lists its blocks. The
mixin converts the chosen groups, validates the LoRA config, and overrides
``trainable_weights`` so Keras' ``fit`` trains only what LoRA trains.
"""

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from tfimm.models import keras_serializable

from .._tf import tf
from ..errors import LayerNotFoundError, LoRAConfigError, UnsupportedLayerError
from ..graph_models import (
    check_pattern_keys,
    is_convertible,
    lora_layer_arguments,
    match_targets,
)
from ..layers import (
    convert_to_lora_layer,
    describe_unsupported,
    has_kernel,
    supported_layer_types,
    validate_lora_args,
)
from ..selection import LoRATrainableMixin, check_train_bias, layer_matches
from ..traversal import layer_references, named_layers, replace_layer

__all__ = ["BuildTimeLoRAMixin", "LoRAConfigFields", "LoRAModelMixin", "lora_serializable"]


@dataclass
class LoRAConfigFields:
    """LoRA fields added to an architecture's config dataclass.

    Attributes:
        lora_rank: Rank of every LoRA update (unless ``lora_rank_pattern``
            names another for a layer).
        lora_alpha: Updates are scaled by ``lora_alpha / lora_rank``.
        lora_dropout: Dropout on the LoRA branch input during training.
        lora_train_bias: ``"none"``, ``"lora_only"`` or ``"all"``.
        lora_train_classifier: Whether the classifier head is trained in full.
        lora_layer_groups: Which layer groups get LoRA; each architecture
            defines its groups and their default. The ``head`` group gives the
            classifier LoRA instead of training it in full (what an
            AdapterPool can serve per request).
        lora_use_dora: DoRA layers (a trainable magnitude per output channel).
        lora_use_rslora: rsLoRA scaling, ``lora_alpha / sqrt(rank)``.
        lora_rank_pattern: ``{layer path, name or glob: rank}`` (PEFT's
            ``rank_pattern``); the first matching pattern wins.
        lora_alpha_pattern: ``{layer path, name or glob: alpha}``, likewise.
        lora_initializer: Initializer of ``A``: a Keras initializer name,
            ``"gaussian"`` or ``"kaiming_uniform"``.
        lora_target_layers: Layer paths, names or globs that get LoRA, in
            place of ``lora_layer_groups`` (PEFT's ``target_modules``; what
            :func:`lora_ckpt.from_adapter` uses to rebuild an adapter's model).
    """

    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    lora_train_bias: str = "none"
    lora_train_classifier: bool = True
    lora_layer_groups: tuple[str, ...] = ()
    lora_use_dora: bool = False
    lora_use_rslora: bool = False
    lora_rank_pattern: dict = field(default_factory=dict)
    lora_alpha_pattern: dict = field(default_factory=dict)
    lora_initializer: str = "glorot_uniform"
    lora_target_layers: tuple[str, ...] = ()


def lora_serializable(cls):
    """tfimm's ``keras_serializable``, registered under the ``lora_ckpt`` package:
    tfimm's own LoRA classes have the same names and would otherwise take the
    place of ours when a saved model is loaded."""
    return tf.keras.utils.register_keras_serializable(package="lora_ckpt")(keras_serializable(cls))


class LoRAModelMixin(LoRATrainableMixin):
    """Mixed into a LoRA architecture, before its tfimm base class.

    A subclass names its layer groups either per block (:attr:`LAYER_GROUPS`
    with :meth:`lora_blocks`) or by glob patterns over layer paths
    (:attr:`GROUP_PATTERNS`), then calls :meth:`apply_lora` at the end of
    ``__init__``.
    """

    #: group name -> attribute paths, inside one block, of the layers to convert.
    LAYER_GROUPS: dict[str, tuple[str, ...]] = {}
    #: group name -> attribute paths, from the model, of layers outside the blocks.
    MODEL_LAYER_GROUPS: dict[str, tuple[str, ...]] = {}
    #: group name -> globs over layer paths (``stages/*/blocks/*/mlp/fc1``).
    GROUP_PATTERNS: dict[str, tuple[str, ...]] = {}

    @classmethod
    def layer_groups(cls) -> dict[str, tuple[str, ...]]:
        """Every layer group the architecture offers, block and model level."""
        return {**cls.LAYER_GROUPS, **cls.MODEL_LAYER_GROUPS, **cls.GROUP_PATTERNS}

    def lora_blocks(self) -> Iterable[tf.keras.layers.Layer]:
        """The blocks whose group layers get LoRA."""
        return []

    def block_layer_paths(self, block, groups: tuple[str, ...]) -> list[str]:
        """Attribute paths, inside ``block``, of the layers the groups convert."""
        return [path for group in groups for path in self.LAYER_GROUPS[group]]

    def lora_target_paths(self, groups: tuple[str, ...]) -> list[str]:
        """Paths of the layers that the layer groups name, in model order.

        Block and model groups name their layers whatever they are; pattern
        groups match the layers that have a kernel (Dense, Conv2D and their
        subclasses). Layers without a LoRA version among them (grouped or
        depthwise convolutions) are in the list: :meth:`apply_lora` leaves
        them out.

        Raises:
            LayerNotFoundError: If a pattern group matches no layer with a kernel.
        """
        layers = list(named_layers(self))
        path_of = {id(layer): path for path, layer in layers}
        wanted = []
        block_groups = tuple(g for g in groups if g in self.LAYER_GROUPS)
        for block in self.lora_blocks():
            for attr in self.block_layer_paths(block, block_groups):
                wanted.append(f"{path_of[id(block)]}/{attr.replace('.', '/')}")
        for group in groups:
            wanted += [attr.replace(".", "/") for attr in self.MODEL_LAYER_GROUPS.get(group, ())]
        candidates = [(path, layer) for path, layer in layers if has_kernel(layer)]
        for group in groups:
            # A group's globs cover several block kinds; each model has some of them.
            patterns = self.GROUP_PATTERNS.get(group, ())
            matched = [
                path
                for path, layer in candidates
                if any(layer_matches(path, layer, pattern) for pattern in patterns)
            ]
            if patterns and not matched:
                raise LayerNotFoundError(
                    f"Layer group {group!r} of {type(self).__name__} ({list(patterns)}) "
                    "matches no LoRA-capable layer of this configuration; choose other "
                    f"lora_layer_groups from {sorted(self.layer_groups())}."
                )
            wanted += matched
        order = {path: i for i, (path, _) in enumerate(layers)}
        return sorted(set(wanted), key=lambda path: order.get(path, -1))

    def supported_group_targets(self, groups: tuple[str, ...], layers: dict) -> list[str]:
        """:meth:`lora_target_paths` without the layers LoRA cannot adapt.

        Those are left out with one warning that names them, so that every
        configuration of a family converts with its default groups (a
        ResNeXt's grouped 3x3 convolutions, for one).

        Args:
            groups: The layer groups.
            layers: ``{path: layer}`` of the model.

        Returns:
            Paths of the convertible layers the groups name.

        Raises:
            UnsupportedLayerError: If the groups name only layers LoRA cannot adapt.
            LayerNotFoundError: As :meth:`lora_target_paths`.
        """
        paths = self.lora_target_paths(groups)
        supported = [path for path in paths if is_convertible(layers[path])]
        unsupported = [
            f"{path} ({describe_unsupported(layers[path])})"
            for path in paths
            if not is_convertible(layers[path])
        ]
        if unsupported and not supported:
            raise UnsupportedLayerError(
                f"lora_layer_groups {list(groups)} of {type(self).__name__} name only layers "
                f"without a LoRA version: {unsupported[:5]}. Choose other lora_layer_groups from "
                f"{sorted(self.layer_groups())}; LoRA adapts {supported_layer_types()} (groups=1)."
            )
        if unsupported:
            warnings.warn(
                f"{type(self).__name__}: {len(unsupported)} layer(s) of lora_layer_groups "
                f"{list(groups)} have no LoRA version and keep their base weights, frozen; the "
                f"other {len(supported)} get LoRA. Left out: {', '.join(unsupported)}.",
                UserWarning,
                stacklevel=3,
            )
        return supported

    def apply_lora(self) -> None:
        """Replaces the layers of the configured groups with LoRA layers.

        Raises:
            LoRAConfigError: For invalid LoRA values or an unknown group.
            UnsupportedLayerError: If the groups, or a ``lora_target_layers``
                pattern, name only layers LoRA cannot adapt (such layers among
                others that groups name are left out with a warning).
            LayerNotFoundError: If a rank or alpha pattern matches no LoRA layer.
        """
        cfg = self.cfg
        self._lora_applied = True
        validate_lora_args(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        check_train_bias(cfg.lora_train_bias)
        groups = tuple(cfg.lora_layer_groups)
        explicit = getattr(cfg, "lora_target_layers", ()) or ()
        explicit = (explicit,) if isinstance(explicit, str) else tuple(explicit)
        unknown = [g for g in groups if g not in self.layer_groups()]
        if not explicit and (unknown or not groups):
            raise LoRAConfigError(
                f"lora_layer_groups {list(groups)} is invalid for {type(self).__name__}: "
                f"choose one or more of {sorted(self.layer_groups())}."
            )
        all_layers = list(named_layers(self))
        layers = dict(all_layers)
        if explicit:
            paths = match_targets(self, explicit, all_layers, "lora_target_layers")
        else:
            paths = self.supported_group_targets(groups, layers)
        targets = [(path, layers[path]) for path in paths]
        arguments = {
            "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "lora_use_dora": cfg.lora_use_dora,
            "lora_use_rslora": cfg.lora_use_rslora,
            "lora_initializer": cfg.lora_initializer,
            "lora_rank_pattern": cfg.lora_rank_pattern,
            "lora_alpha_pattern": cfg.lora_alpha_pattern,
        }
        check_pattern_keys(self, arguments, targets)
        references = layer_references(self)
        for path, layer in targets:
            lora_layer = convert_to_lora_layer(
                layer, lora_freeze_base=True, **lora_layer_arguments(path, layer, arguments)
            )
            for place in references[id(layer)]:  # a layer held twice, both places
                replace_layer(self, place, lora_layer)


class BuildTimeLoRAMixin(LoRAModelMixin):
    """For families that create layers while they first run (PVT's blocks,
    EfficientNet's squeeze-excite, gMLP's spatial gate): LoRA is applied right
    after the model's first call, which ``create_model`` and
    ``convert_to_lora_model`` make when they build it. That call computes the
    base's output, as a fresh LoRA model would."""

    def __call__(self, *args, **kwargs):
        outputs = super().__call__(*args, **kwargs)
        # Not inside a trace: layers made there would belong to that graph.
        if not getattr(self, "_lora_applied", False) and tf.executing_eagerly():
            self.apply_lora()
            outputs = super().__call__(*args, **kwargs)  # builds the new LoRA layers
        return outputs
