"""timm module names of a tfimm model, and PEFT's rules for matching them.

tfimm loads timm's weights by one rule (``tfimm.utils.timm``): a variable
``model/blocks/0/attn/qkv/kernel:0`` is timm's ``blocks.0.attn.qkv.weight``,
Dense kernels transposed, Conv2D kernels permuted ``(2, 3, 1, 0)``. PEFT
names the modules it adapts by those timm names, so the rule, applied to the
model's own variable names, maps every PEFT key to a variable of the model.
Layer paths (``stem_conv``) and timm names (``stem.0``) differ: only the
variable names carry the mapping.

The matching rules are PEFT's (``peft.tuners.tuners_utils``,
``peft.utils.other``): a ``target_modules`` list entry names a module whose
name is it or ends with ``.`` + it; a string is a regular expression that
must match the whole name; a ``rank_pattern``/``alpha_pattern`` key names
the modules whose name ends with it (a regular expression after a dot), the
first matching key winning.
"""

import re
from dataclasses import dataclass

import numpy as np
from tfimm.utils.timm import TransposeType, convert_tf_weight_name_to_pt_weight_name

from ..layers import LORA_WEIGHT_NAMES
from ..traversal import named_layers, named_variables

__all__ = [
    "CONV2D",
    "DENSE",
    "TimmNames",
    "from_timm",
    "module_named",
    "pattern_value",
    "target_matches",
    "to_timm",
    "within_modules",
]


DENSE, CONV2D, PLAIN = "dense", "conv2d", "plain"
_KINDS = {TransposeType.SIMPLE: DENSE, TransposeType.CONV2D: CONV2D, TransposeType.NO: PLAIN}


@dataclass(frozen=True)
class _Parameter:
    """One variable of the model as timm names it.

    Attributes:
        key: The variable's key in the model (``blocks/0/attn/qkv/kernel``).
        layer: The path of the layer that holds it.
        timm: timm's parameter name (``blocks.0.attn.qkv.weight``).
        kind: ``"dense"`` (transposed), ``"conv2d"`` (permuted) or ``"plain"``.
    """

    key: str
    layer: str
    timm: str
    kind: str


class TimmNames:
    """The timm name of every variable and LoRA-capable layer of a tfimm model.

    Args:
        model: A built tfimm model (regular or LoRA); LoRA's own variables
            are left out.
    """

    def __init__(self, model):
        layers = dict(named_layers(model))
        self.parameters: dict[str, _Parameter] = {}  # timm name -> _Parameter
        self.by_key: dict[str, _Parameter] = {}
        for key, variable in named_variables(model).items():
            path, leaf = key.rsplit("/", 1) if "/" in key else ("", key)
            if leaf in LORA_WEIGHT_NAMES or path not in layers:
                continue
            timm, transpose = convert_tf_weight_name_to_pt_weight_name(
                variable.name, tf_weight_shape=variable.shape
            )
            parameter = _Parameter(key, path, timm, _KINDS[transpose])
            self.parameters[timm] = parameter
            self.by_key[key] = parameter
        # A layer's module is its kernel's name without ".weight".
        self.module_of: dict[str, str] = {}
        for parameter in self.by_key.values():
            if parameter.key.endswith("/kernel") and parameter.timm.endswith(".weight"):
                self.module_of[parameter.layer] = parameter.timm[: -len(".weight")]
        self.layer_of = {module: path for path, module in self.module_of.items()}
        self.layers = layers

    def modules(self) -> list[str]:
        """The timm module names of every layer with a kernel, in model order."""
        return list(self.layer_of)

    def parameters_under(self, module: str) -> list[_Parameter]:
        """The parameters of a module and its sub-modules (PEFT's ``modules_to_save``)."""
        prefix = module + "."
        return [p for name, p in self.parameters.items() if name.startswith(prefix)]


def target_matches(target_modules, module: str) -> bool:
    """PEFT's ``target_modules`` rule (``check_target_module_exists``).

    Args:
        target_modules: A regular expression (matched against the whole
            name) or a list of names (a module matches an entry equal to its
            name or to a ``.``-separated suffix of it).
        module: The module's name.

    Returns:
        Whether the module is a target.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def within_modules(modules, module: str) -> bool:
    """PEFT's exclusion of LoRA targets inside ``modules_to_save`` modules."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules or ())


def module_named(modules, module: str) -> bool:
    """Whether a ``modules_to_save`` entry names ``module`` (it or a suffix of it)."""
    return any(module == m or module.endswith("." + m) for m in modules or ())


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup (``get_pattern_key``).

    Args:
        patterns: Pattern key -> value, in the config's order.
        module: The module's name.
        default: The config's ``r`` or ``lora_alpha``.

    Returns:
        The value of the first key the module's name ends with, else ``default``.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def to_timm(array: np.ndarray, kind: str) -> np.ndarray:
    """A variable's value in timm's layout (``[out, in]``, ``[out, in, kh, kw]``)."""
    if kind == CONV2D:
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    if kind == DENSE:
        return np.ascontiguousarray(array.T)
    return array


def from_timm(array: np.ndarray, kind: str) -> np.ndarray:
    """A timm parameter in the variable's layout: tfimm's own transposition."""
    if kind == CONV2D:
        return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
    if kind == DENSE:
        return np.ascontiguousarray(array.T)
    return array
