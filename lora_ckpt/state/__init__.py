"""The partial-state subsystem: adapters as small tf.train.Checkpoint directories."""

from .base_weights import load_base_weights
from .combine import combine_adapters, write_lora_state
from .fit import LoadReport, ModelSignature, check_base, check_fit
from .format import CONFIG_FILE, FORMAT_VERSION, AdapterConfig
from .from_adapter import from_adapter
from .inspect import inspect_adapter, list_adapters
from .load import AdapterState, load_lora_state, read_config, read_lora_state
from .save import save_lora_state
from .training import AdapterCheckpoint, AdapterCheckpointManager, restore_training_checkpoint

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "AdapterCheckpoint",
    "AdapterCheckpointManager",
    "AdapterConfig",
    "AdapterState",
    "LoadReport",
    "ModelSignature",
    "check_base",
    "check_fit",
    "combine_adapters",
    "from_adapter",
    "inspect_adapter",
    "list_adapters",
    "load_base_weights",
    "load_lora_state",
    "read_config",
    "read_lora_state",
    "restore_training_checkpoint",
    "save_lora_state",
    "write_lora_state",
]
