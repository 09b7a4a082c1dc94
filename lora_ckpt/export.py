"""Export a base model with one adapter merged as a plain TensorFlow SavedModel."""

from ._tf import tf
from .models import convert_to_regular_model


def export_merged_savedmodel(lora_model: tf.keras.Model, out_dir: str) -> str:
    """Saves ``lora_model`` (with its adapter loaded) merged, as a SavedModel.

    The adapter is folded into the kernels of the regular architecture, so
    the SavedModel needs neither lora_ckpt nor tfimm to load:
    ``tf.saved_model.load(out_dir).signatures["serving_default"](images=x)``
    returns ``{"logits": ...}``.

    Args:
        lora_model: A LoRA model of a registered architecture or a
            functional/Sequential LoRA model.
        out_dir: The SavedModel directory to write.

    Returns:
        ``out_dir``.
    """
    regular = convert_to_regular_model(lora_model)
    if hasattr(regular, "dummy_inputs"):
        shape = [None, *regular.dummy_inputs.shape[1:]]
    else:
        shape = [None, *regular.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    def serve(images):
        return {"logits": regular(images, training=False)}

    module = tf.Module()
    module.model = regular
    module.serve = serve
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve})
    return str(out_dir)
