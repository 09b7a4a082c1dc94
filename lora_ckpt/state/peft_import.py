"""import_peft: a PEFT LoRA adapter of a timm model, as a lora_ckpt adapter.

PEFT's keys are ``base_model.model.<timm module>.lora_A.weight`` ``[r, in]``
(Conv2d: ``[r, in, kh, kw]``), ``.lora_B.weight`` ``[out, r]`` (Conv2d:
``[out, r, 1, 1]``), DoRA's ``.lora_magnitude_vector`` ``[out]`` (Conv2d:
``[1, out, 1, 1]``), biases (``<module>.base_layer.bias`` on adapted
modules) and the full parameters of ``modules_to_save``. Modules map to
layers by tfimm's own timm name rule (:mod:`.peft_names`); ``A``/``B``
become ``A^T``/``B^T`` (Conv2D: ``A`` permuted ``(2, 3, 1, 0)``,
``B[:, :, 0, 0]^T``). The model is converted with exactly the adapter's
layers, ranks, alphas, DoRA/rsLoRA, bias mode and full layers, the values
are assigned, and :func:`lora_ckpt.save_lora_state` writes the adapter.
Whatever cannot map exactly is refused, naming the module.
"""

import json

import numpy as np

from ..errors import AdapterMismatchError, LoRAConfigError, UnregisteredArchitectureError
from ..models import convert_to_lora_model, convert_to_regular_model, lora_layers
from ..registry import is_lora_architecture, registered_architectures
from ..selection import KIND_BIAS, KIND_EXTRA, classifier_paths, select_state
from ..traversal import named_variables
from .peft_config import LoraConfig, modules_to_save_layers
from .peft_files import METADATA_KEY, read_peft_adapter
from .peft_names import CONV2D, DENSE, TimmNames, from_timm
from .save import save_lora_state

__all__ = ["PREFIX", "import_peft"]


PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}
# Fields of PEFT's LoraConfig with their neutral value: anything else there
# changes what the adapter computes in a way lora_ckpt's layers do not hold.
_NEUTRAL = {
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "megatron_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "velora_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
}
_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "use_dora",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "init_lora_weights",
)


def _config_from_peft(document: dict, where: str = "adapter_config.json") -> LoraConfig:
    """PEFT's ``adapter_config.json`` as a :class:`LoraConfig`, refusing what does not map.

    Raises:
        LoRAConfigError: For another PEFT method than LoRA, ``fan_in_fan_out``,
            layer selection by index, LoRA biases, an initialisation that
            changes the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) and every
            other option whose effect lora_ckpt's layers do not hold.
    """
    if str(document.get("peft_type", "")).upper() != "LORA":
        raise LoRAConfigError(
            f"{where} is a {document.get('peft_type')!r} adapter; import_peft reads LoRA adapters."
        )
    for name, neutral in _NEUTRAL.items():
        if name in document and not any(document[name] == n for n in neutral):
            raise LoRAConfigError(
                f"{where} sets {name}={document[name]!r:.80}, which lora_ckpt cannot map "
                "exactly" + _ADVICE.get(name, "; train without it.")
            )
    values = {name: document[name] for name in _FIELDS if name in document}
    for name in ("rank_pattern", "alpha_pattern"):
        values[name] = values.get(name) or {}
    values["bias"] = values.get("bias") or "none"
    if document.get("target_modules") is None:
        raise LoRAConfigError(f"{where} names no target_modules; it is not a LoRA adapter.")
    return LoraConfig(**values)


_ADVICE = {
    "fan_in_fan_out": " (weights stored [in, out], as GPT-2's Conv1D; timm's layers are not).",
    "layers_to_transform": "; list the adapted modules in target_modules instead.",
    "layers_pattern": "; list the adapted modules in target_modules instead.",
    "lora_bias": " (lora_B with a bias: lora_ckpt's B has none).",
}


def _split_keys(tensors: dict, where: str) -> tuple[dict, dict]:
    """``({module: {"A"|"B"|"m": array}}, {timm parameter: array})``."""
    lora, full, copies = {}, {}, {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterMismatchError(
                f"{where}: key {key!r} does not start with {PREFIX!r}; it was not saved "
                "by PeftModel.save_pretrained."
            )
        name = key[len(PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            lora.setdefault(name[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = value
        elif ".lora_" in name or name.startswith("lora_"):
            raise LoRAConfigError(
                f"{where}: {name!r} is a LoRA weight lora_ckpt's layers do not have "
                "(LoRA biases, embeddings, other variants)."
            )
        elif ".original_module." in name:
            continue  # bias="all" saves the base copy of a modules_to_save module too
        elif ".modules_to_save." in name:
            copies[name.replace(".modules_to_save.", ".")] = (name, value)
        else:
            name = name.replace(".base_layer.", ".")
            # tfimm's rule: timm's ".gamma"/".beta" parameters are its ".weight"/".bias".
            for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
                if name.endswith(old):
                    name = name[: -len(old)] + new
            full[name] = value
    for name, (original, value) in copies.items():
        if name in full and not np.array_equal(full[name], value):
            raise AdapterMismatchError(f"{where}: {original!r} differs from {name!r}.")
        full.setdefault(name, value)
    return lora, full


def _expect(module: str, what: str, value: np.ndarray, shape: tuple) -> None:
    if tuple(value.shape) != tuple(shape):
        raise AdapterMismatchError(
            f"Module {module!r}: {what} is {list(value.shape)}, the model's layer needs "
            f"{list(shape)}."
        )


def _lora_values(module: str, layer, parts: dict, config: LoraConfig) -> dict:
    """The layer's ``kernel_lora_a``/``kernel_lora_b``/``lora_magnitude`` values."""
    if "A" not in parts or "B" not in parts:
        raise AdapterMismatchError(f"Module {module!r} has only one of lora_A and lora_B.")
    if config.use_dora != ("m" in parts):
        has = "has" if "m" in parts else "lacks"
        raise AdapterMismatchError(
            f"Module {module!r} {has} a lora_magnitude_vector but the config says "
            f"use_dora={config.use_dora}."
        )
    rank, kernel = config.rank_of(module), tuple(layer.kernel.shape)
    a, b = parts["A"], parts["B"]
    if len(kernel) == 2:
        _expect(module, "lora_A.weight", a, (rank, kernel[0]))
        _expect(module, "lora_B.weight", b, (kernel[1], rank))
        values = {"kernel_lora_a": from_timm(a, DENSE), "kernel_lora_b": from_timm(b, DENSE)}
    else:
        kh, kw, cin, cout = kernel
        _expect(module, "lora_A.weight", a, (rank, cin, kh, kw))
        _expect(module, "lora_B.weight", b, (cout, rank, 1, 1))
        values = {
            "kernel_lora_a": from_timm(a, CONV2D),
            "kernel_lora_b": from_timm(b[:, :, 0, 0], DENSE),
        }
    if "m" in parts:
        m = parts["m"]
        if m.size != kernel[-1] or m.shape not in ((kernel[-1],), (1, kernel[-1], 1, 1)):
            _expect(module, "lora_magnitude_vector", m, (kernel[-1],))
        values["lora_magnitude"] = m.reshape(-1)
    return values


def _regular(model):
    if type(model) not in registered_architectures() and not is_lora_architecture(type(model)):
        raise UnregisteredArchitectureError(
            f"import_peft maps timm's module names through tfimm's weight-name rule, so it "
            f"needs a tfimm model (the timm model's twin), not a {type(model).__name__}."
        )
    if lora_layers(model):
        return convert_to_regular_model(model, merge=False)
    if not model.built:
        model(model.dummy_inputs)
    return model


def _head_width(base, names: TimmNames, full: dict) -> int | None:
    """A new classifier width, when the file's head differs from the model's in it only."""
    heads = set(classifier_paths(base))
    for name, value in full.items():
        p = names.parameters.get(name)
        if p is None or p.layer not in heads or not p.key.endswith("/kernel"):
            continue
        kernel = tuple(names.layers[p.layer].kernel.shape)
        width = value.shape[0]
        same_inputs = tuple(from_timm(value, p.kind).shape[:-1]) == kernel[:-1]
        has_classes = bool(getattr(getattr(base, "cfg", None), "nb_classes", 0))
        if value.ndim == len(kernel) and same_inputs and width != kernel[-1] and has_classes:
            return int(width)
    return None


def import_peft(
    peft_dir: str, model, out_path: str, *, labels=None, overwrite: bool = False
) -> str:
    """Writes a PEFT LoRA adapter of a timm model as a lora_ckpt adapter for its tfimm twin.

    Args:
        peft_dir: The directory ``PeftModel.save_pretrained`` wrote
            (``adapter_config.json``, ``adapter_model.safetensors``); any store.
        model: The tfimm model whose timm twin PEFT adapted (a regular or a
            LoRA tfimm model), holding the base weights the adapter was
            trained on (its fingerprint goes into the adapter).
        out_path: The lora_ckpt adapter to write (any store).
        labels: Class names, one per output (``metadata["labels"]``).
        overwrite: Replace an adapter already at ``out_path``.

    Returns:
        ``out_path``.

    Raises:
        AdapterNotFoundError: No PEFT config in ``peft_dir``.
        CorruptAdapterError: Weights only pickled (``adapter_model.bin``,
            never unpickled), not safetensors, not floats, NaN/Inf.
        LoRAConfigError: A PEFT option that cannot map exactly
            (``fan_in_fan_out``, PiSSA/OLoRA/CorDA not converted, ...).
        AdapterMismatchError: A module the model does not have or cannot
            adapt, a shape or rank that disagrees, weights the config does
            not describe (each names the module).
        UnregisteredArchitectureError: ``model`` is not a tfimm model.
        AdapterExistsError: An adapter at ``out_path`` and not ``overwrite``.
    """
    document, tensors, header = read_peft_adapter(peft_dir)
    config = _config_from_peft(document, f"{peft_dir}/adapter_config.json")
    lora, full = _split_keys(tensors, str(peft_dir))
    base = _regular(model)
    names = TimmNames(base)
    for module in lora:
        if module not in names.layer_of:
            raise AdapterMismatchError(
                f"Module {module!r} of the PEFT adapter is not a layer of this "
                f"{type(base).__name__}: it is another model or configuration."
            )
        if not config.is_target(module):
            raise AdapterMismatchError(
                f"Module {module!r} holds LoRA weights but the adapter's config does not "
                f"target it (target_modules={config.target_modules!r})."
            )
    targets = [m for m in names.layer_of if config.is_target(m)]
    missing = [m for m in targets if m not in lora]
    if missing:
        raise AdapterMismatchError(
            f"The adapter's config targets module {missing[0]!r} (and {len(missing) - 1} more) "
            "but its weights file holds no LoRA weights for it."
        )
    overrides = {}
    width = _head_width(base, names, full)
    if width is not None:
        overrides["nb_classes"] = width
    saved = modules_to_save_layers(base, config)
    paths = [names.layer_of[m] for m in targets]
    arguments = {
        "lora_target_layers": paths,
        "lora_rank": config.r,
        "lora_alpha": float(config.lora_alpha),
        "lora_rank_pattern": {names.layer_of[m]: config.rank_of(m) for m in targets},
        "lora_alpha_pattern": {names.layer_of[m]: config.alpha_of(m) for m in targets},
        "lora_use_dora": config.use_dora,
        "lora_use_rslora": config.use_rslora,
        "lora_train_bias": config.bias,
        "lora_train_classifier": False,
        "lora_trainable_layers": saved,
    }
    try:
        lora_model = convert_to_lora_model(base, **arguments, **overrides)
    except LoRAConfigError as exc:  # a target tfimm's layer cannot hold (a grouped conv)
        raise AdapterMismatchError(
            f"The PEFT adapter's modules do not fit this model: {exc}"
        ) from exc
    layers = dict(lora_layers(lora_model))
    variables = named_variables(lora_model)
    assignments = []
    for module in targets:
        path = names.layer_of[module]
        for attribute, value in _lora_values(module, layers[path], lora[module], config).items():
            assignments.append((variables[f"{path}/{attribute}"], value, module))
    selection = select_state(lora_model, config.bias, saved)
    wanted = {k: kind for k, kind in selection.kinds.items() if kind in (KIND_BIAS, KIND_EXTRA)}
    by_timm = {names.by_key[k].timm: k for k in wanted if k in names.by_key}
    unknown = sorted(set(full) - set(by_timm))
    if unknown or len(by_timm) != len(wanted):
        raise AdapterMismatchError(
            f"The PEFT adapter holds {unknown[0]!r}, which is neither a bias of bias="
            f"{config.bias!r} nor a parameter of modules_to_save={config.modules_to_save!r} "
            "in this model."
            if unknown
            else "Some saved variables have no timm name."
        )
    for name, key in by_timm.items():
        if name not in full:
            raise AdapterMismatchError(
                f"The PEFT adapter lacks {name!r}: bias={config.bias!r} and modules_to_save="
                f"{config.modules_to_save!r} save it."
            )
        value = from_timm(full[name], names.by_key[key].kind)
        _expect(name.rsplit(".", 1)[0], name, value, tuple(variables[key].shape))
        assignments.append((variables[key], value, name))
    for variable, value, _ in assignments:
        variable.assign(value.astype(variable.dtype.as_numpy_dtype))
    return save_lora_state(
        lora_model,
        out_path,
        include_bias=config.bias,
        extra_layers=saved,
        metadata=_metadata(document, header, str(peft_dir)),
        labels=labels,
        overwrite=overwrite,
    )


def _metadata(document: dict, header: dict, peft_dir: str) -> dict:
    """An exported adapter's own metadata back; else where a PEFT adapter came from."""
    if METADATA_KEY in header:
        try:
            metadata = json.loads(header[METADATA_KEY])
        except ValueError:
            metadata = None
        if isinstance(metadata, dict):
            return metadata
    source = {k: document.get(k) for k in ("base_model_name_or_path", "peft_version", "task_type")}
    source["lora_dropout"] = document.get("lora_dropout", 0.0)
    return {"peft": {k: v for k, v in source.items() if v is not None}}
