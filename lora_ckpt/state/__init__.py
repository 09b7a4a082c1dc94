"""The partial-state subsystem: adapters as small tf.train.Checkpoint directories."""

from .base_weights import load_base_weights
from .format import CONFIG_FILE, FORMAT_VERSION
from .inspect import inspect_adapter, list_adapters
from .load import AdapterState, LoadReport, load_lora_state, plan_load, read_lora_state
from .save import save_lora_state
from .selection import select_state
from .training import AdapterCheckpoint, AdapterCheckpointManager, restore_training_checkpoint

__all__ = [
    "AdapterCheckpoint",
    "AdapterCheckpointManager",
    "AdapterState",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LoadReport",
    "inspect_adapter",
    "list_adapters",
    "load_base_weights",
    "load_lora_state",
    "plan_load",
    "read_lora_state",
    "restore_training_checkpoint",
    "save_lora_state",
    "select_state",
]
