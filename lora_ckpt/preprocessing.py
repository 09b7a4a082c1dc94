"""The one definition of how an encoded image becomes a model input.

The HTTP service, the exported SavedModel (``--with-preprocessing``) and
training from folders all call :func:`preprocess_image`, so an adapter is
trained on exactly the tensors it is later asked about: decoded by
TensorFlow, resized bilinearly to the model's input size, mapped to
``pixel / 127.5 - 1``.
"""

from ._tf import tf


def preprocess_image(data, shape) -> tf.Tensor:
    """An encoded image (PNG/JPEG/GIF/BMP bytes) as a float32 model input.

    Args:
        data: The encoded image, a scalar string tensor or ``bytes``.
        shape: The model's input shape ``(height, width, channels)`` (a
            leading batch dimension is ignored).

    Returns:
        A ``[height, width, channels]`` float32 tensor in ``[-1, 1]``.

    Raises:
        tf.errors.InvalidArgumentError: If the data is not an image TensorFlow decodes.
    """
    shape = list(shape)[-3:]
    image = tf.io.decode_image(data, channels=shape[-1], expand_animations=False)
    resized = tf.image.resize(tf.cast(image, tf.float32), shape[:2])
    return resized / 127.5 - 1.0
