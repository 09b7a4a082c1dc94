"""PEFT's typed ``LoraConfig`` and ``get_peft_model``, for lora_ckpt models.

``LoraConfig`` has the fields of PEFT's (``peft.tuners.lora.config``) that
map exactly onto lora_ckpt's LoRA layers, each with its help text, checked
in ``__post_init__``. Module names are PEFT's: for a tfimm model they are
timm's (``blocks.0.attn.qkv``, found by tfimm's own weight-name rule), for
any other Keras model the layer paths with dots (``backbone.conv1``).
:func:`get_lora_model` turns a config into the keyword arguments of
:func:`lora_ckpt.convert_to_lora_model` and calls it.
"""

import math
from dataclasses import asdict, dataclass, field

from ..errors import LoRAConfigError
from ..graph_models import is_convertible
from ..layers import MAX_LORA_RANK
from ..models import convert_to_lora_model
from ..registry import registered_architectures
from ..traversal import named_layers
from .peft_names import (
    TimmNames,
    module_named,
    pattern_value,
    target_matches,
    within_modules,
)

__all__ = ["LoraConfig", "get_lora_model", "modules_to_save_layers"]


BIAS_MODES = ("none", "all", "lora_only")
# What each init_lora_weights trains from; the rest (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA) change the base weights, which an adapter does not hold.
INITIALIZERS = {True: "kaiming_uniform", "gaussian": "gaussian"}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig``, the fields that lora_ckpt's LoRA layers hold exactly.

    Attributes: see each field's ``metadata["help"]``
    (``dataclasses.fields(LoraConfig)``).

    Raises:
        LoRAConfigError: From ``__post_init__``, for a field of the wrong type
            or range, with what is expected.
    """

    r: int = _help(
        "LoRA rank of every adapted layer (unless rank_pattern names another).", default=8
    )
    lora_alpha: float = _help(
        "Scaling numerator: updates are scaled by lora_alpha / r (/ sqrt(r) with use_rslora).",
        default=8,
    )
    lora_dropout: float = _help("Dropout on the LoRA branch's input while training.", default=0.0)
    target_modules: list | str | None = _help(
        "Module names that get LoRA: a list (a module matches an entry equal to its name or "
        "to a dot-separated suffix of it, e.g. 'qkv'), or a regular expression matched "
        "against the whole name. None: the architecture's default layer groups.",
        default=None,
    )
    exclude_modules: list | str | None = _help(
        "Module names (same rules as target_modules) that never get LoRA.", default=None
    )
    bias: str = _help("Biases trained and saved: 'none', 'all' or 'lora_only'.", default="none")
    use_dora: bool = _help(
        "DoRA: a trainable magnitude per output channel (PEFT's lora_magnitude_vector).",
        default=False,
    )
    use_rslora: bool = _help("rsLoRA: scaling lora_alpha / sqrt(r).", default=False)
    rank_pattern: dict = _help(
        "Module-name pattern -> rank: a module whose name ends with the pattern (a regular "
        "expression after a dot) takes its rank; the first matching key wins.",
        default_factory=dict,
    )
    alpha_pattern: dict = _help(
        "Module-name pattern -> alpha, matched as rank_pattern.", default_factory=dict
    )
    modules_to_save: list | None = _help(
        "Modules trained and saved in full besides LoRA (a new classifier head: ['head']); "
        "a module matches an entry equal to its name or to a suffix of it.",
        default=None,
    )
    init_lora_weights: bool | str = _help(
        "Initialisation of A: True (PEFT's Kaiming-uniform) or 'gaussian'; B starts at zero. "
        "Adapters imported from PEFT may name others (False, 'orthogonal', 'eva', 'mica'); "
        "PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA change the base and are refused.",
        default=True,
    )

    def __post_init__(self):
        _check_int(self.r, "r")
        _check_number(self.lora_alpha, "lora_alpha")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not 0.0 <= self.lora_dropout < 1.0
        ):
            raise LoRAConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, _modules(getattr(self, name), name, regex=True))
        self.modules_to_save = _modules(self.modules_to_save, "modules_to_save", regex=False)
        if self.bias not in BIAS_MODES:
            raise LoRAConfigError(f"bias must be one of {list(BIAS_MODES)}, got {self.bias!r}.")
        for name in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                raise LoRAConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name, check in (("rank_pattern", _check_int), ("alpha_pattern", _check_number)):
            patterns = getattr(self, name)
            if patterns is None:
                patterns = {}
            if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
                raise LoRAConfigError(
                    f"{name} must be a dict of module-name pattern -> value, got {patterns!r:.80}."
                )
            for key, value in patterns.items():
                check(value, f"{name}[{key!r}]")
            setattr(self, name, dict(patterns))
        init = self.init_lora_weights
        if not isinstance(init, (bool, str)):
            raise LoRAConfigError(
                f"init_lora_weights must be True, False or a PEFT initialisation name, got {init!r}."
            )
        if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
            raise LoRAConfigError(
                f"init_lora_weights={init!r} changes the base model's weights while it "
                "initialises LoRA, and an adapter does not hold the base: its updates apply "
                "to a base nobody else has. In PEFT, save the adapter with "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...), which "
                "converts it into a plain LoRA adapter of the original base "
                "(init_lora_weights=True), and import that."
            )

    def rank_of(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern``, else ``r``)."""
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha_of(self, module: str) -> float:
        """The alpha PEFT gives ``module`` (``alpha_pattern``, else ``lora_alpha``)."""
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def is_target(self, module: str) -> bool:
        """Whether PEFT puts LoRA on ``module`` (targets minus exclusions and
        modules inside ``modules_to_save``)."""
        if self.target_modules is None or not target_matches(self.target_modules, module):
            return False
        if self.exclude_modules is not None and target_matches(self.exclude_modules, module):
            return False
        return not within_modules(self.modules_to_save, module)

    def to_dict(self) -> dict:
        """The fields as a JSON-serialisable dict."""
        return asdict(self)


def _check_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_LORA_RANK:
        raise LoRAConfigError(f"{name} must be an integer in [1, {MAX_LORA_RANK}], got {value!r}.")


def _check_number(value, name: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise LoRAConfigError(f"{name} must be a positive finite number, got {value!r}.")


def _modules(value, name: str, regex: bool):
    if value is None or (regex and isinstance(value, str)):
        if value == "all-linear":
            raise LoRAConfigError(
                f"{name}='all-linear' is PEFT's shorthand for transformers models; list the "
                "modules (e.g. ['qkv', 'proj', 'fc1', 'fc2']) or give a regular expression."
            )
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    kind = "a list of module names or a regular expression" if regex else "a list of module names"
    raise LoRAConfigError(f"{name} must be {kind}, got {value!r:.80}.")


def _module_names(model) -> dict[str, str]:
    """PEFT's name of every LoRA-capable layer of a model -> its layer path.

    Args:
        model: A built tfimm model (timm's names, by tfimm's weight-name rule)
            or any other Keras model (layer paths with dots).

    Returns:
        Module name -> layer path, in model order.
    """
    if type(model) in registered_architectures() or getattr(model, "cfg", None) is not None:
        names = TimmNames(model)
        return {m: p for m, p in names.layer_of.items() if is_convertible(names.layers[p])}
    return {
        path.replace("/", "."): path
        for path, layer in named_layers(model)
        if path and is_convertible(layer)
    }


def _resolve_targets(config: LoraConfig, modules: dict[str, str]) -> list[str]:
    """The module names that ``config`` puts LoRA on, in model order.

    Raises:
        LoRAConfigError: If ``target_modules`` matches no module.
    """
    targets = [m for m in modules if config.is_target(m)]
    if not targets:
        raise LoRAConfigError(
            f"target_modules {config.target_modules!r} matches no LoRA-capable module; "
            f"the model's are {list(modules)[:12]}{' ...' if len(modules) > 12 else ''}."
        )
    return targets


def modules_to_save_layers(model, config: LoraConfig) -> list[str]:
    """Layer paths of the modules ``config.modules_to_save`` names, in model order.

    Raises:
        LoRAConfigError: For an entry that names no module of the model.
    """
    if not config.modules_to_save:
        return []
    if type(model) in registered_architectures() or getattr(model, "cfg", None) is not None:
        names = TimmNames(model)
        prefixes = {
            ".".join(p.timm.split(".")[:i])
            for p in names.by_key.values()
            for i in range(1, p.timm.count(".") + 1)
        }
        paths = []
        for entry in config.modules_to_save:
            matched = [m for m in sorted(prefixes) if module_named([entry], m)]
            if not matched:
                raise LoRAConfigError(
                    f"modules_to_save entry {entry!r} names no module of this model "
                    f"(modules include {sorted(prefixes)[:12]})."
                )
            for module in matched:
                paths += [p.layer for p in names.parameters_under(module)]
        order = {path: i for i, path in enumerate(names.layers)}
        return sorted(set(paths), key=order.get)
    layers = [path for path, _ in named_layers(model) if path]
    dotted = {path.replace("/", "."): path for path in layers}
    paths = []
    for entry in config.modules_to_save:
        matched = [p for m, p in dotted.items() if module_named([entry], m)]
        if not matched:
            raise LoRAConfigError(f"modules_to_save entry {entry!r} names no layer of this model.")
        paths += matched
    return [p for p in layers if p in set(paths)]


def _lora_model_arguments(model, config: LoraConfig) -> dict:
    """The keyword arguments of :func:`lora_ckpt.convert_to_lora_model` for ``config``.

    Raises:
        LoRAConfigError: As :func:`get_lora_model`.
    """
    init = config.init_lora_weights
    if init not in INITIALIZERS:
        raise LoRAConfigError(
            f"init_lora_weights={init!r} cannot initialise a new lora_ckpt model; use True "
            "(Kaiming-uniform, PEFT's default) or 'gaussian'."
        )
    registered = type(model) in registered_architectures()
    arguments = {
        "lora_rank": config.r,
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "lora_use_dora": config.use_dora,
        "lora_use_rslora": config.use_rslora,
        "lora_initializer": INITIALIZERS[init],
        "lora_train_bias": config.bias,
    }
    if registered:
        arguments["lora_train_classifier"] = False  # PEFT trains a head only in modules_to_save
    if config.target_modules is not None:
        modules = _module_names(model)
        targets = _resolve_targets(config, modules)
        paths = [modules[m] for m in targets]
        arguments["lora_target_layers" if registered else "target_layers"] = paths
        arguments["lora_rank_pattern"] = {
            modules[m]: config.rank_of(m) for m in targets if config.rank_of(m) != config.r
        }
        arguments["lora_alpha_pattern"] = {
            modules[m]: config.alpha_of(m)
            for m in targets
            if config.alpha_of(m) != float(config.lora_alpha)
        }
    elif config.rank_pattern or config.alpha_pattern or config.exclude_modules:
        raise LoRAConfigError(
            "rank_pattern, alpha_pattern and exclude_modules need target_modules: name the "
            "modules that get LoRA."
        )
    saved = modules_to_save_layers(model, config)
    if saved:
        arguments["lora_trainable_layers"] = saved
    return arguments


def get_lora_model(model, config: LoraConfig, **overrides):
    """PEFT's ``get_peft_model``: a LoRA model of ``model`` as ``config`` says.

    Args:
        model: A regular tfimm model (module names are timm's: ``qkv``,
            ``blocks.0.mlp.fc1``) or any other tf_keras model (layer paths
            with dots).
        config: The :class:`LoraConfig`.
        **overrides: Config overrides for a tfimm model (``nb_classes=10``
            for a new head of another width, trained by naming it in
            ``modules_to_save``).

    Returns:
        The built LoRA model, computing what ``model`` computes until trained;
        ``model.trainable_weights`` is what PEFT would train: the LoRA
        weights, the biases of ``bias`` and the ``modules_to_save`` layers.

    Raises:
        LoRAConfigError: For a target or modules_to_save entry that names no
            module, or an initialisation lora_ckpt cannot start from.
        UnregisteredArchitectureError, UnsupportedLayerError: As
            :func:`lora_ckpt.convert_to_lora_model`.
    """
    if not isinstance(config, LoraConfig):
        raise LoRAConfigError(
            f"config must be a lora_ckpt.LoraConfig, got {type(config).__name__}."
        )
    return convert_to_lora_model(model, **_lora_model_arguments(model, config), **overrides)
