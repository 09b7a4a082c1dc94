"""Every tfimm model name converts with default arguments.

Building the 282 models at full size would take far too long, so each name's
config is converted with its *default LoRA arguments* and its own blocks,
but shallower:

- depth: ``nb_blocks``/``depth`` cut to one block per stage (every block of a
  stage has the same layers, so the groups match the same kinds of layer);
- families whose layers exist only once the model runs (EfficientNet and
  MobileNet, PVT, MLP-Mixer/ResMLP/gMLP) are built on a small input and, for
  EfficientNet, at most width multiplier 1 and one repeat per stage;
- the others are converted without building weights: their LoRA class is
  constructed from the config, which is where conversion picks and replaces
  layers (``apply_lora``); building and copying weights does not depend on
  the name and is covered per family in tests/test_families.py;
- names whose shallow configs are equal are converted once.

Layers LoRA cannot adapt are left out with one warning: exactly the
ResNeXt-style names (grouped 3x3 convolutions) warn, naming those layers.
"""

import dataclasses
import warnings

import pytest
import tfimm
from tfimm.models import model_class, model_config

import lora_ckpt
from lora_ckpt.architectures.base import BuildTimeLoRAMixin
from lora_ckpt.registry import lora_architecture, lora_config

_IDENTITY = ("name", "url", "mean", "std", "crop_pct", "interpolation", "test_input_size")


def _shallow(value):
    if isinstance(value, (tuple, list)):
        return tuple(min(v, 1) for v in value)
    return min(value, 1)


def shallow_overrides(cfg) -> dict:
    """Config overrides that keep a name's block kinds with as few blocks as possible."""
    overrides = {
        key: _shallow(getattr(cfg, key))
        for key in ("nb_blocks", "depth")
        if isinstance(getattr(cfg, key, None), (int, tuple, list))
    }
    kind = type(cfg).__name__
    if kind == "EfficientNetConfig":
        overrides.update(
            input_size=(32, 32),
            depth_multiplier=0.1,  # every stage's repeats round up to one
            channel_multiplier=min(cfg.channel_multiplier, 1.0),
            nb_features=min(cfg.nb_features, 64),
        )
    elif kind == "MLPMixerConfig":
        overrides.update(input_size=(2 * cfg.patch_size, 2 * cfg.patch_size))
    elif kind == "PyramidVisionTransformerConfig":
        overrides.update(input_size=(64, 64))
    return overrides


def convert_by_default(name: str):
    """The LoRA model of ``name``'s shallow config with default LoRA arguments,
    and the warnings its conversion gave."""
    cls = model_class(name)
    lora_cls = lora_architecture(cls)
    cfg_cls = lora_config(cls) or cls.cfg_class
    base = model_config(name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {k: v for k, v in dataclasses.asdict(base).items() if k in fields}
    values.update(shallow_overrides(base), nb_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lora_cls(cfg=cfg_cls(**values))
        if issubclass(lora_cls, BuildTimeLoRAMixin):
            model(model.dummy_inputs)  # what convert_to_lora_model's build does
    left_out = [str(w.message) for w in caught if "no LoRA version" in str(w.message)]
    return model, left_out


def _distinct_names() -> list[str]:
    seen, names = set(), []
    for name in tfimm.list_models():
        cfg = model_config(name)
        values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _IDENTITY}
        key = (type(cfg).__name__, repr(sorted({**values, **shallow_overrides(cfg)}.items())))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


@pytest.mark.slow
def test_every_name_converts_with_default_arguments():
    names = tfimm.list_models()
    assert len(names) == 282
    distinct = _distinct_names()
    failed, warned = {}, {}
    for name in distinct:
        try:
            model, left_out = convert_by_default(name)
        except lora_ckpt.LoRAError as exc:
            failed[name] = str(exc)[:200]
            continue
        if not lora_ckpt.lora_layers(model):
            failed[name] = "no layer got LoRA"
        if left_out:
            warned[name] = left_out
    assert failed == {}
    grouped = {n for n in distinct if getattr(model_config(n), "cardinality", 1) != 1}
    assert grouped and set(warned) == grouped
    for name, messages in warned.items():
        assert len(messages) == 1, name  # one warning per conversion
        cardinality = model_config(name).cardinality
        assert f"blocks/0/conv2 (Conv2D, groups={cardinality})" in messages[0], name
