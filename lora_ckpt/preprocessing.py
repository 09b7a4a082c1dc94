"""The one definition of how an encoded image becomes a model input.

The HTTP service, the exported SavedModel (``--with-preprocessing``) and
training from folders all call :func:`preprocess_image`, so an adapter is
trained on exactly the tensors it is later asked about: decoded by
TensorFlow, resized bilinearly to the model's input size, mapped to
``pixel / 127.5 - 1``.
"""

from ._tf import tf

__all__ = ["preprocess_image", "preprocess_pixels"]


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
    return preprocess_pixels(image, shape)


def preprocess_pixels(image, shape) -> tf.Tensor:
    """Decoded 8-bit pixels ``[h, w, channels]`` as a float32 model input.

    Args:
        image: The pixels (uint8), e.g. the first frame of an animated image.
        shape: The model's input shape ``(height, width, channels)``.

    Returns:
        A ``[height, width, channels]`` float32 tensor in ``[-1, 1]``.
    """
    # Resized from the 8-bit pixels (float32 out): the same floats as resizing
    # a float32 copy, without holding that copy of a large image.
    resized = tf.image.resize(image, list(shape)[-3:-1])
    return resized / 127.5 - 1.0
