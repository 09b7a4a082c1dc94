"""The error classes: one per way a caller handles a mistake, old names kept as aliases."""

import lora_ckpt.errors as errors

FINAL_CLASSES = {
    # class: the built-in exceptions callers (tfimm's among them) catch it as
    "LoRAError": (),
    "MissingDependencyError": (ImportError,),
    "KerasObjectError": (TypeError,),
    "LoRAConfigError": (ValueError,),
    "UnregisteredArchitectureError": (ValueError,),
    "MergeStateError": (RuntimeError,),
    "StoreError": (),
    "AdapterError": (),
    "AdapterNotFoundError": (FileNotFoundError,),
    "AdapterExistsError": (FileExistsError,),
    "CorruptAdapterError": (),
    "AdapterMismatchError": (),
    "BaseModelMismatchError": (),
    "PoolError": (),
    "AdapterNotLoadedError": (KeyError,),
    "PoolFullError": (),
}


def test_the_error_classes_and_what_they_also_are():
    classes = {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__name__ == name
    }
    assert sorted(classes) == sorted(FINAL_CLASSES) == sorted(errors.__all__)
    for name, bases in FINAL_CLASSES.items():
        assert issubclass(classes[name], errors.LoRAError), name
        assert all(issubclass(classes[name], base) for base in bases), name
    # The CLI falls back on UnregisteredArchitectureError alone; a config
    # error in general must not trigger that fallback.
    assert issubclass(errors.UnregisteredArchitectureError, errors.LoRAConfigError)
    assert not issubclass(errors.LoRAConfigError, errors.UnregisteredArchitectureError)
    assert issubclass(errors.BaseModelMismatchError, errors.AdapterMismatchError)


def test_merged_names_are_the_same_classes_so_raise_and_except_keep_working():
    for old, new in errors._DEPRECATED_ALIASES.items():
        assert getattr(errors, old) is getattr(errors, new), old
    try:
        raise errors.AdapterVersionError("format_version 99")
    except errors.CorruptAdapterError as exc:
        assert str(exc) == "format_version 99"
    try:
        raise errors.LayerNotFoundError("no layer")
    except ValueError as exc:  # as tfimm's callers catch it
        assert isinstance(exc, errors.LoRAConfigError)


def test_a_missing_pool_adapter_reads_as_its_message_not_a_quoted_key():
    assert str(errors.AdapterNotLoadedError("adapter 'a' is not loaded")) == (
        "adapter 'a' is not loaded"
    )
