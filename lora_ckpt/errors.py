"""Errors a user of lora_ckpt can cause.

Every error raised for bad input is a :class:`LoRAError`; each subclass
stands for one kind of mistake. Where tfimm's LoRA module raised
``ValueError`` for the same mistake, the subclass is also a ``ValueError`` so
code written against tfimm keeps catching it. This module imports nothing,
so pure-Python parts (the slot table) can use it without TensorFlow.
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


class KerasVersionError(LoRAError, ImportError):
    """TensorFlow runs with Keras 3, or tf_keras is missing."""


class KerasObjectError(LoRAError, TypeError):
    """A Keras 3 layer or model was passed; lora_ckpt works with tf_keras (Keras 2) objects."""


class MissingDependencyError(LoRAError, ImportError):
    """An optional package a call needs (such as timm for pretrained weights) is missing."""


class LoRAConfigError(LoRAError, ValueError):
    """An argument is invalid: a LoRA hyper-parameter, a name, a request's shape."""


class UnsupportedLayerError(LoRAError, ValueError):
    """A layer cannot be converted to a LoRA layer."""


class UnknownModelError(LoRAError, ValueError):
    """A model name is not known to tfimm."""


class UnregisteredArchitectureError(LoRAError, ValueError):
    """A model class has no registered LoRA variant (or is not a LoRA variant)."""


class MergeStateError(LoRAError, RuntimeError):
    """The call does not fit the merge state (merging twice, serving another
    adapter while one is merged, unloading the merged adapter, ...)."""


class LayerNotFoundError(LoRAError, ValueError):
    """A layer name or pattern given by the user matches no layer of the model."""


class BaseWeightsError(LoRAError):
    """A base weights file is missing or does not hold this model's base weights."""


class TrainingCheckpointError(LoRAError):
    """A training checkpoint (adapter, optimizer and epoch) is missing or unreadable."""


class StoreError(LoRAError):
    """An adapter store is missing or malformed (no ``base.json``, ...)."""


class AdapterError(LoRAError):
    """Base class of errors about a saved adapter."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter directory does not exist or holds no committed adapter."""


class AdapterExistsError(AdapterError, FileExistsError):
    """A save would replace an existing adapter and overwrite was not asked for."""


class CorruptAdapterError(AdapterError):
    """An adapter's files are unreadable, truncated or do not match its config."""


class AdapterVersionError(AdapterError):
    """The adapter was written in a format version this library cannot read."""


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
