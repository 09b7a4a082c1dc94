"""The partial-state subsystem: adapters as small tf.train.Checkpoint directories.

Names are imported on first use (PEP 562): listing and inspecting adapters
(:mod:`lora_ckpt.state.inspect`) needs no TensorFlow.
"""

from .._lazy import lazy_names

_EXPORTS = {
    "load_base_weights": "base_weights",
    "combine_adapters": "combine",
    "write_lora_state": "save",
    "LoadReport": "fit",
    "ModelSignature": "fit",
    "check_base": "fit",
    "check_fit": "fit",
    "CONFIG_FILE": "format",
    "FORMAT_VERSION": "format",
    "AdapterConfig": "format",
    "from_adapter": "adapter_model",
    "inspect_adapter": "inspect",
    "list_adapters": "inspect",
    "AdapterState": "load",
    "load_lora_state": "load",
    "read_config": "load",
    "read_lora_state": "load",
    "save_lora_state": "save",
    "LoraConfig": "peft_config",
    "get_lora_model": "peft_config",
    "export_peft": "peft_export",
    "import_peft": "peft_import",
    "AdapterCheckpoint": "training",
    "AdapterCheckpointManager": "training",
    "restore_training_checkpoint": "training",
    "StoreTrainingCheckpoint": "training",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
