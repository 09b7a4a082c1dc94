"""Turning an HTTP request into model inputs, treating every byte as hostile.

Bodies are read as a stream and refused past the size limit (chunked and
multipart ones too) or past the time limit; JSON must be shallow and its
tensors numbers; images are checked from their header before any pixel is
decoded (Pillow reads the header), so a small file that claims 20000x20000 pixels costs
nothing; a tensor deeper than the model's input is refused by its shape. Every problem is an :class:`HTTPError` with its status.
"""

import asyncio
import base64
import binascii
import io
import json

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from .._tf import tf
from ..preprocessing import preprocess_image, preprocess_pixels

__all__ = [
    "HTTPError",
    "decode_base64",
    "decode_image",
    "multipart_image",
    "parse_json",
    "parse_tensor",
    "read_body",
]


class HTTPError(Exception):
    """An error answered with ``status`` and ``{"error": {"type", "message"}}``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused once it passes ``limit`` bytes or ``timeout`` seconds.

    Raises:
        HTTPError: 413 past the limit (declared or streamed), 408 too slow.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(
            413, "TooLarge", f"The request body is {declared} bytes; the limit is {limit}."
        )

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "TooLarge", f"The request body exceeds {limit} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(
            408, "RequestTimeout", f"The request body did not arrive within {timeout:g} s."
        ) from None


def decode_image(data: bytes, shape, max_pixels: int) -> np.ndarray:
    """A PNG/JPEG/GIF/BMP image as the model's input: resized, ``pixel / 127.5 - 1``.

    Pillow reads the header only (no pixel is decoded) to enforce the pixel
    limit; TensorFlow decodes, exactly as a SavedModel exported with
    ``lora-ckpt export --with-preprocessing`` does, so both answer alike. An
    animated image (GIF, APNG, WebP) is its first frame, as there, but
    decoded by Pillow alone: TensorFlow decodes every frame before it keeps
    the first, so 64 frames of 4096x4096 in a 1 MB body cost gigabytes. The
    resize runs on the 8-bit pixels (TensorFlow's bilinear resize gives the
    same floats as on a float copy, without the copy: 4 bytes a pixel).

    Raises:
        HTTPError: 400 for data that is not an image, 413 for more pixels than
            ``max_pixels`` (read from the header, before decoding).
    """
    try:
        opened = Image.open(io.BytesIO(data))
        width, height = opened.size
        animated = getattr(opened, "is_animated", False)  # reads one frame header more
    except Image.DecompressionBombError as exc:  # Pillow's own limit, met at open
        raise HTTPError(413, "ImageTooLarge", f"The image is too large: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HTTPError(400, "BadImage", f"Cannot decode the image: {exc}") from None
    if width * height > max_pixels:
        raise HTTPError(
            413,
            "ImageTooLarge",
            f"The image has {width}x{height} pixels; the limit is {max_pixels} pixels.",
        )
    try:
        if animated:
            return preprocess_pixels(_first_frame(opened, shape[-1]), shape).numpy()
        return preprocess_image(data, shape).numpy()
    except (tf.errors.InvalidArgumentError, ValueError, OSError) as exc:
        raise HTTPError(400, "BadImage", f"Cannot decode the image: {exc}") from None


def _first_frame(opened: Image.Image, channels: int) -> np.ndarray:
    """The first frame of an animated image, ``[h, w, channels]`` uint8."""
    opened.seek(0)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    frame = np.asarray(opened.convert(mode))
    return frame[..., None] if channels == 1 else frame


def parse_json(body: bytes):
    """A JSON document (the size was bounded when the body was read).

    Raises:
        HTTPError: 400 for invalid JSON, or JSON nested too deep to parse.
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPError(
            400, "BadJSON", "The body is not valid JSON (or is nested too deep)."
        ) from None


def parse_tensor(values, shape) -> np.ndarray:
    """One sample from a nested list of numbers (with or without a batch axis of 1).

    Raises:
        HTTPError: 400 unless it is numbers (not strings or booleans) of the
            model's input shape, all finite.
    """
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):
        raise HTTPError(400, "BadTensor", "A tensor must be a nested list of numbers.") from None
    if array.dtype.kind not in "iuf":
        raise HTTPError(
            400, "BadTensor", "A tensor must be a nested list of numbers (no strings, booleans)."
        )
    array = array.astype(np.float32)
    if array.shape == (1, *shape):
        array = array[0]
    if array.shape != tuple(shape):
        raise HTTPError(
            400, "BadTensor", f"A tensor has shape {list(array.shape)}; expected {list(shape)}."
        )
    if not np.all(np.isfinite(array)):
        raise HTTPError(400, "BadTensor", "A tensor holds NaN or infinite values.")
    return array


def decode_base64(text) -> bytes:
    """Base64 text (TF Serving's ``{"b64": ...}``) as bytes.

    Raises:
        HTTPError: 400 for anything else.
    """
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise HTTPError(400, "BadImage", "The image is not valid base64.") from None


async def multipart_image(request: Request, body: bytes) -> bytes:
    """The ``image`` field's bytes, from a multipart body that was already read (bounded).

    Raises:
        HTTPError: 400 for a body that does not parse or has no ``image`` file.
    """

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as exc:  # the multipart parser's own errors
        raise HTTPError(400, "BadRequest", f"The multipart body cannot be parsed: {exc}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPError(400, "BadRequest", "A multipart request needs a file field 'image'.")
    return await upload.read()
