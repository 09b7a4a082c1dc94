"""export_peft: a lora_ckpt adapter as the files PEFT loads on the timm model.

The reverse of :func:`lora_ckpt.state.peft_import.import_peft`: each LoRA
layer's ``A``/``B`` become ``lora_A.weight``/``lora_B.weight`` under its timm
module name (tfimm's weight-name rule), DoRA's magnitude becomes
``lora_magnitude_vector``, biases and full layers (``modules_to_save``) keep
their timm parameter names, and ``adapter_config.json`` holds ``r``,
``lora_alpha``, ``rank_pattern``/``alpha_pattern`` (exact module names),
``use_dora``, ``use_rslora``, ``bias`` and ``modules_to_save``. The
adapter's own metadata rides in the safetensors header, so importing the
export gives the adapter back bit for bit.
"""

import dataclasses
import json
import re
from collections import Counter

import numpy as np

from .._tf import tf
from ..errors import LoRAConfigError, UnregisteredArchitectureError
from ..selection import KIND_BIAS, KIND_EXTRA
from .adapter_model import _layer_classes_kept, estimate_parameters, lora_model_config
from .load import read_lora_state
from .peft_config import LoraConfig
from .peft_files import METADATA_KEY, write_peft_adapter
from .peft_import import PREFIX
from .peft_names import CONV2D, DENSE, TimmNames, module_named, pattern_value, to_timm

__all__ = ["export_peft"]


_MAX_PARAMETERS = 2_000_000_000


def _names_of(config) -> TimmNames:
    """The timm names of the adapter's model, from a build in a throwaway graph
    (variable names, no memory for weights)."""
    try:
        lora_cls, cfg = lora_model_config(config)
    except UnregisteredArchitectureError as exc:
        raise UnregisteredArchitectureError(
            f"export_peft names modules as timm does, through tfimm's rule; {exc}"
        ) from None
    estimate = estimate_parameters(type(cfg), dataclasses.asdict(cfg))
    if estimate is not None and estimate > _MAX_PARAMETERS:
        raise LoRAConfigError(
            f"The adapter's base configuration describes about {estimate:,d} parameters; "
            "it is not a model export_peft builds."
        )
    with _layer_classes_kept(), tf.Graph().as_default():
        probe = lora_cls(cfg=cfg)
        probe(probe.dummy_inputs)
        return TimmNames(probe)


def _one(config, flag: str) -> bool:
    values = {getattr(layer, flag) for layer in config.layers.values()}
    if len(values) > 1:
        raise LoRAConfigError(
            f"The adapter mixes {flag} and plain LoRA layers; PEFT's use_{flag} holds for "
            "every layer of an adapter. Export it as two adapters."
        )
    return values.pop()


def _common(values: dict):
    """The most frequent value (ties: the first in layer order)."""
    return Counter(values.values()).most_common(1)[0][0]


def _patterns(values: dict, default) -> dict:
    """Exact module-name keys for the modules whose value is not ``default``,
    longest first: a key that is a suffix of another module's name comes after it."""
    keys = sorted((m for m, v in values.items() if v != default), key=len, reverse=True)
    return {re.escape(m): values[m] for m in keys}


def _number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def _lora_tensors(path: str, layer, module: str, tensors: dict) -> dict:
    a = tensors[f"{path}/kernel_lora_a"]
    b = tensors[f"{path}/kernel_lora_b"]
    out = {}
    if a.ndim == 2:
        out[f"{PREFIX}{module}.lora_A.weight"] = to_timm(a, DENSE)
        out[f"{PREFIX}{module}.lora_B.weight"] = to_timm(b, DENSE)
        shape = (b.shape[1],)
    else:
        out[f"{PREFIX}{module}.lora_A.weight"] = to_timm(a, CONV2D)
        out[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None])
        shape = (1, b.shape[1], 1, 1)
    magnitude = tensors.get(f"{path}/lora_magnitude")
    if magnitude is not None:
        out[f"{PREFIX}{module}.lora_magnitude_vector"] = magnitude.reshape(shape)
    return out


def export_peft(
    adapter_path: str,
    out_dir: str,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes a lora_ckpt adapter as a PEFT adapter of the timm model.

    A PyTorch user loads it with ``PeftModel.from_pretrained(timm_model,
    out_dir)`` on the timm model whose weights the adapter's base holds.

    Args:
        adapter_path: The lora_ckpt adapter (any store) of a tfimm model.
        out_dir: Where to write ``adapter_config.json`` and
            ``adapter_model.safetensors`` (any store).
        base_model_name_or_path: Recorded in the config for PEFT users (a
            timm hub name such as ``"timm/vit_base_patch16_224.augreg_in21k"``).
        overwrite: Replace a PEFT adapter already in ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        UnregisteredArchitectureError: For an adapter of a non-tfimm model.
        LoRAConfigError: For what PEFT cannot express: DoRA or rsLoRA on some
            layers only, names PEFT's matching rules cannot tell apart.
        AdapterExistsError: A PEFT adapter in ``out_dir`` and not ``overwrite``.
        LoRAError: Whatever :func:`lora_ckpt.read_lora_state` raises.
    """
    state = read_lora_state(adapter_path)
    config = state.config
    names = _names_of(config)
    use_dora, use_rslora = _one(config, "dora"), _one(config, "rslora")
    tensors, ranks, alphas = {}, {}, {}
    for path, record in config.layers.items():
        module = names.module_of.get(path)
        if module is None:
            raise LoRAConfigError(f"LoRA layer {path!r} has no timm module name.")
        ranks[module], alphas[module] = record.rank, record.alpha
        tensors.update(_lora_tensors(path, record, module, state.tensors))
    lora_modules = set(ranks)
    saved_modules = []
    for key, record in config.variables.items():
        if record.kind not in (KIND_BIAS, KIND_EXTRA):
            continue
        parameter = names.by_key[key]
        name = parameter.timm
        if record.kind == KIND_BIAS and parameter.layer in config.layers:
            name = name[: -len(".bias")] + ".base_layer.bias"  # PEFT's wrapped layer
        tensors[PREFIX + name] = to_timm(state.tensors[key], parameter.kind)
        if record.kind == KIND_EXTRA:
            module = parameter.timm.rsplit(".", 1)[0]
            if module not in saved_modules:
                saved_modules.append(module)
    r, alpha = _common(ranks), _common(alphas)
    peft = LoraConfig(
        r=r,
        lora_alpha=_number(alpha),
        target_modules=sorted(lora_modules),
        bias=config.saved.bias,
        use_dora=use_dora,
        use_rslora=use_rslora,
        rank_pattern=_patterns(ranks, r),
        alpha_pattern={k: _number(v) for k, v in _patterns(alphas, alpha).items()},
        modules_to_save=saved_modules or None,
    )
    _check_peft_reads_back(peft, names, ranks, alphas, config)
    document = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "fan_in_fan_out": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
        **peft.to_dict(),
    }
    metadata = {METADATA_KEY: json.dumps(config.metadata, sort_keys=True)}
    return write_peft_adapter(out_dir, document, tensors, metadata, overwrite=overwrite)


def _check_peft_reads_back(peft: LoraConfig, names: TimmNames, ranks, alphas, config) -> None:
    """PEFT's own matching rules on the written config give exactly these
    layers, ranks, alphas and full layers; else the export is refused."""
    targets = {m for m in names.layer_of if peft.is_target(m)}
    if targets != set(ranks):
        extra = sorted(targets ^ set(ranks))[0]
        raise LoRAConfigError(
            f"PEFT's target_modules rule cannot single out the adapter's layers: module "
            f"{extra!r} would be matched differently."
        )
    for module in ranks:
        rank = pattern_value(peft.rank_pattern, module, peft.r)
        alpha = float(pattern_value(peft.alpha_pattern, module, peft.lora_alpha))
        if rank != ranks[module] or alpha != alphas[module]:
            raise LoRAConfigError(
                f"PEFT's rank_pattern/alpha_pattern rule would give module {module!r} rank "
                f"{rank} and alpha {alpha}, not {ranks[module]} and {alphas[module]}."
            )
    extra = {k for k, v in config.variables.items() if v.kind == KIND_EXTRA}
    covered = {
        p.key
        for p in names.by_key.values()
        if any(module_named(peft.modules_to_save or [], p.timm[:i]) for i in _dots(p.timm))
    }
    if covered != extra:
        odd = sorted(covered ^ extra)[0]
        raise LoRAConfigError(
            f"PEFT's modules_to_save {peft.modules_to_save} would not save exactly the "
            f"adapter's full layers (variable {odd!r})."
        )


def _dots(name: str) -> list[int]:
    return [i for i, c in enumerate(name) if c == "."]
