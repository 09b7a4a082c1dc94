"""Errors a user of lora_ckpt can cause.

Every error raised for bad input is a :class:`LoRAError`. There is one
subclass per way a caller handles a mistake differently (a different fix, a
different HTTP status, a fallback in the CLI), not one per place that raises:
the message says what exactly was wrong and what to do. Where tfimm's LoRA
module raised ``ValueError`` for the same mistake, the subclass is also a
``ValueError`` so code written against tfimm keeps catching it; a missing
adapter is a ``FileNotFoundError``, an adapter not resident in a pool a
``KeyError``. This module imports nothing, so pure-Python parts (the slot
table, the CLI's argument parsing) can use it without TensorFlow.

The classes, and what a caller does differently for each:

- ``LoRAError``: anything lora_ckpt refuses (HTTP 400 unless below).
- ``MissingDependencyError`` (ImportError): fix the environment (install a
  package, or set ``TF_USE_LEGACY_KERAS=1`` before TensorFlow comes up).
- ``KerasObjectError`` (TypeError): a Keras 3 object was passed.
- ``LoRAConfigError`` (ValueError): an invalid argument, model name, layer
  pattern, or a layer that cannot get LoRA.
- ``UnregisteredArchitectureError`` (a LoRAConfigError): no LoRA variant for
  this model class; ``lora-ckpt export`` falls back to the store's base model.
- ``MergeStateError`` (RuntimeError; HTTP 409): the merge state forbids it.
- ``StoreError``: a store, base weights file or training checkpoint is
  missing or not what it should be.
- ``AdapterError`` (HTTP 422) and its subclasses ``AdapterNotFoundError``
  (FileNotFoundError; 404), ``AdapterExistsError`` (FileExistsError: pass
  overwrite), ``CorruptAdapterError`` (unreadable, altered, or another format
  version), ``AdapterMismatchError`` (does not fit the model) and its
  ``BaseModelMismatchError`` (other base weights: ``check_base=False``
  loads it anyway).
- ``PoolError`` and its ``AdapterNotLoadedError`` (KeyError; 404) and
  ``PoolFullError`` (503).

Older names merged into these stay importable (``_DEPRECATED_ALIASES``).
"""


class LoRAError(Exception):
    """Base class of every error that lora_ckpt raises for bad input."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, ImportError):
            # TensorFlow's autograph re-raises an error from traced code (a
            # layer's call inside `fit`) as itself only if its class keeps
            # Exception's constructor; otherwise it becomes a StagingError.
            cls.__init__ = Exception.__init__


class MissingDependencyError(LoRAError, ImportError):
    """A package lora_ckpt needs is missing or unusable in this process.

    ``tf_keras`` is not installed or TensorFlow already runs with Keras 3, or
    an optional package a call needs (timm for pretrained weights) is missing.
    """


class KerasObjectError(LoRAError, TypeError):
    """A Keras 3 layer or model was passed; lora_ckpt works with tf_keras (Keras 2) objects."""


class LoRAConfigError(LoRAError, ValueError):
    """An argument is invalid: a LoRA hyper-parameter, a model name, a layer
    pattern that matches nothing, a layer that cannot get LoRA, a request's shape."""


class UnregisteredArchitectureError(LoRAConfigError):
    """A model class has no registered LoRA variant (or is not a LoRA variant).

    Kept apart from :class:`LoRAConfigError` because callers fall back on it
    (``lora-ckpt export`` then builds the store's base model instead).
    """


class MergeStateError(LoRAError, RuntimeError):
    """The call does not fit the merge state (merging twice, serving another
    adapter while one is merged, unloading the merged adapter, ...)."""


class StoreError(LoRAError):
    """Files named by the caller, other than an adapter, are missing or wrong.

    An adapter store (no ``base.json``, unreachable, a download that kept
    changing), a base weights file (missing, or not this model's weights), a
    training checkpoint (missing or unreadable).
    """


class AdapterError(LoRAError):
    """Base class of errors about a saved adapter."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter directory does not exist or holds no committed adapter."""


class AdapterExistsError(AdapterError, FileExistsError):
    """A save would replace an existing adapter and overwrite was not asked for."""


class CorruptAdapterError(AdapterError):
    """An adapter cannot be read: its files are unreadable, truncated or do not
    match its config, or it was written in a format version this library
    does not read."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit the model (architecture, layer, shape, rank...)."""


class BaseModelMismatchError(AdapterMismatchError):
    """The model's base weights are not those the adapter was trained on."""


class PoolError(LoRAError):
    """Base class of errors about an AdapterPool's resident adapters."""


class AdapterNotLoadedError(PoolError, KeyError):
    """A request names an adapter that is not resident in the pool."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PoolFullError(PoolError):
    """Every slot of the pool is in use by running requests; nothing can be evicted."""


# Deprecated aliases: classes merged into the one a caller handles them with.
# Each old name is the same class object as its replacement, so every raise
# and except that uses it keeps working; the lead sweeps the usages, then
# these go.
KerasVersionError = MissingDependencyError
UnsupportedLayerError = LoRAConfigError
UnknownModelError = LoRAConfigError
LayerNotFoundError = LoRAConfigError
BaseWeightsError = StoreError
TrainingCheckpointError = StoreError
AdapterVersionError = CorruptAdapterError

_DEPRECATED_ALIASES = {
    "KerasVersionError": "MissingDependencyError",
    "UnsupportedLayerError": "LoRAConfigError",
    "UnknownModelError": "LoRAConfigError",
    "LayerNotFoundError": "LoRAConfigError",
    "BaseWeightsError": "StoreError",
    "TrainingCheckpointError": "StoreError",
    "AdapterVersionError": "CorruptAdapterError",
}

__all__ = [
    "AdapterError",
    "AdapterExistsError",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "AdapterNotLoadedError",
    "BaseModelMismatchError",
    "CorruptAdapterError",
    "KerasObjectError",
    "LoRAConfigError",
    "LoRAError",
    "MergeStateError",
    "MissingDependencyError",
    "PoolError",
    "PoolFullError",
    "StoreError",
    "UnregisteredArchitectureError",
]
