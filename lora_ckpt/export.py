"""Export a base model with one adapter merged as a plain TensorFlow SavedModel."""

import os

from ._tf import tf
from .models import convert_to_regular_model
from .preprocessing import preprocess_image

__all__ = ["export_merged_savedmodel"]


def export_merged_savedmodel(
    lora_model: tf.keras.Model,
    out_dir: str,
    with_preprocessing: bool = False,
    labels: list[str] | None = None,
) -> str:
    """Saves ``lora_model`` (with its adapter loaded) merged, as a SavedModel.

    The adapter is folded into the kernels of the regular architecture, so
    the SavedModel needs neither lora_ckpt nor tfimm to load:
    ``tf.saved_model.load(out_dir).signatures["serving_default"](images=x)``
    returns ``{"logits": ...}``. ``out_dir`` can be a TF Serving model
    version directory (``MODELS/NAME/1``).

    Args:
        lora_model: A LoRA model of a registered architecture or a
            functional/Sequential LoRA model.
        out_dir: The SavedModel directory to write.
        with_preprocessing: The signature takes encoded images
            (``image_bytes``: PNG/JPEG strings, TF Serving's ``{"b64": ...}``)
            and does the service's preprocessing: RGB, resize, ``/ 127.5 - 1``.
        labels: Class names, written to ``assets/labels.txt``.

    Returns:
        ``out_dir``.
    """
    regular = convert_to_regular_model(lora_model)
    if hasattr(regular, "dummy_inputs"):
        shape = [None, *regular.dummy_inputs.shape[1:]]
    else:
        shape = [None, *regular.input_shape[1:]]

    if with_preprocessing:

        def decode(data):
            return preprocess_image(data, shape[1:])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(image_bytes):
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
            return {"logits": regular(images, training=False)}

    else:

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
        def serve(images):
            return {"logits": regular(images, training=False)}

    module = tf.Module()
    module.model = regular
    module.serve = serve
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve})
    if labels:
        assets = os.path.join(str(out_dir), "assets")
        tf.io.gfile.makedirs(assets)
        with tf.io.gfile.GFile(os.path.join(assets, "labels.txt"), "w") as handle:
            handle.write("".join(f"{label}\n" for label in labels))
    return str(out_dir)
