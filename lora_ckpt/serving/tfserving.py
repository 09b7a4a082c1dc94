"""TF Serving's REST API, exactly as its documentation shows it
(https://www.tensorflow.org/tfx/serving/api_rest): request shapes, response
documents and error bodies. Plain Python: turning a sample into a tensor or a
decoded image is the caller's (:mod:`lora_ckpt.serving.http_common`).

An adapter is served as a TF Serving model with one signature,
``serving_default``, whose inputs are ``images`` (``DT_FLOAT``, the
preprocessed batch ``[-1, H, W, C]``) or ``image_bytes`` (``DT_STRING``,
encoded images as ``{"b64": ...}``), one of them per instance, and whose one
output is ``logits`` (``[-1, classes]``). A predict request is:

- row format ``{"instances": [...]}`` -> ``{"predictions": [...]}``: each
  instance a tensor, ``{"b64": ...}``, or named by the signature's inputs
  (``{"images": tensor}``, ``{"image_bytes": {"b64": ...}}``);
- columnar format ``{"inputs": ...}`` -> ``{"outputs": [...]}``: a batch of
  tensors (or of ``{"b64": ...}``), or ``{"images": batch}`` /
  ``{"image_bytes": [{"b64": ...}, ...]}``.

``signature_name`` may be given and must be ``serving_default`` (else 400).
The model's version is the adapter's (:func:`adapter_version`). Errors on
``/v1`` routes are ``{"error": "<message>"}``, as TF Serving answers them.
"""

from dataclasses import dataclass

__all__ = [
    "PredictRequest",
    "Sample",
    "TFServingRequestError",
    "adapter_version",
    "error_document",
    "metadata_document",
    "not_found",
    "parse_predict",
    "status_document",
    "version_number",
]


SIGNATURE = "serving_default"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
LOGITS = "logits"
_INPUTS = (IMAGES, IMAGE_BYTES)


class TFServingRequestError(Exception):
    """A request TF Serving would refuse: ``status`` (400, 404, 413) and ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Sample:
    """One sample of a predict request, not yet decoded.

    Attributes:
        kind: ``"tensor"`` (a nested list of numbers) or ``"b64"`` (base64 image bytes).
        value: The nested list, or the base64 text.
    """

    kind: str
    value: object


@dataclass(frozen=True)
class PredictRequest:
    """A predict request's samples and the format to answer in.

    Attributes:
        samples: In the request's order.
        columnar: Whether it came as ``inputs`` (answer ``outputs``) or
            ``instances`` (answer ``predictions``).
        adapters: The adapters named by ``POST /v1/adapters:predict``
            (empty for a model's own ``:predict``).
    """

    samples: list[Sample]
    columnar: bool
    adapters: tuple[str, ...] = ()

    def answer(self, outputs) -> dict:
        """The response document: ``{"predictions": outputs}`` or ``{"outputs": outputs}``."""
        return {"outputs" if self.columnar else "predictions": outputs}


def parse_predict(payload, max_samples: int, mixed: bool = False) -> PredictRequest:
    """The samples of a parsed ``:predict`` body.

    Args:
        payload: The parsed JSON body.
        max_samples: The most samples a request may hold (times its adapters, if ``mixed``).
        mixed: ``POST /v1/adapters:predict``: the body also names ``"adapters"``.

    Returns:
        The request.

    Raises:
        TFServingRequestError: 400 for a body of another shape or another
            signature, 413 for too many samples.
    """
    if not isinstance(payload, dict):
        raise TFServingRequestError(400, "The request body must be a JSON object.")
    allowed = {"signature_name", "instances", "inputs"} | ({"adapters"} if mixed else set())
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise TFServingRequestError(400, f"Unknown fields {unknown}; known: {sorted(allowed)}.")
    signature = payload.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise TFServingRequestError(
            400,
            f"Serving signature name: {signature!r} not found in signature def; "
            f"this model has {SIGNATURE!r}.",
        )
    if ("instances" in payload) == ("inputs" in payload):
        raise TFServingRequestError(
            400,
            "Send either 'instances' (row format) or 'inputs' (columnar format), not both."
            if "inputs" in payload
            else "Missing 'inputs' or 'instances' key.",
        )
    adapters = _adapters(payload.get("adapters")) if mixed else ()
    if "instances" in payload:
        samples, columnar = _rows(payload["instances"]), False
    else:
        samples, columnar = _columns(payload["inputs"]), True
    total = len(samples) * max(1, len(adapters))
    if total > max_samples:
        what = (
            f"{len(samples)} instances x {len(adapters)} adapters"
            if mixed
            else f"{total} instances"
        )
        raise TFServingRequestError(413, f"{what}; the limit is {max_samples} per request.")
    return PredictRequest(samples, columnar, adapters)


def _adapters(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise TFServingRequestError(400, "Send 'adapters': a list of one or more adapter names.")
    if len(set(value)) != len(value):
        raise TFServingRequestError(400, "'adapters' names an adapter twice.")
    return tuple(value)


def _rows(instances) -> list[Sample]:
    if not isinstance(instances, list) or not instances:
        raise TFServingRequestError(400, "'instances' must be a list of one or more instances.")
    return [_named(instance) if _is_named(instance) else _value(instance) for instance in instances]


def _is_named(value) -> bool:
    return isinstance(value, dict) and bool(set(value) & set(_INPUTS))


def _named(instance: dict) -> Sample:
    """``{"images": tensor}`` or ``{"image_bytes": {"b64": ...}}``: one input per instance."""
    names = sorted(instance)
    if len(names) != 1 or names[0] not in _INPUTS:
        raise TFServingRequestError(
            400,
            f"An instance names one input of the signature, {IMAGES!r} or {IMAGE_BYTES!r}; "
            f"got {names}.",
        )
    return _input(names[0], instance[names[0]])


def _input(name: str, value) -> Sample:
    if name == IMAGE_BYTES:
        if not _is_b64(value):
            raise TFServingRequestError(400, f"{IMAGE_BYTES!r} takes {{'b64': '<base64 image>'}}.")
        return Sample("b64", value["b64"])
    if not (isinstance(value, list) or _is_number(value)):
        raise TFServingRequestError(400, f"{IMAGES!r} takes a nested list of numbers.")
    return Sample("tensor", value)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _value(value) -> Sample:
    """An unnamed instance: a tensor (a number or nested list), or ``{"b64": ...}`` image bytes."""
    if _is_b64(value):
        return Sample("b64", value["b64"])
    if isinstance(value, list) or _is_number(value):
        return Sample("tensor", value)
    raise TFServingRequestError(
        400,
        "An instance is a nested list of numbers, {'b64': '<base64 image>'}, "
        f"{{{IMAGES!r}: [...]}} or {{{IMAGE_BYTES!r}: {{'b64': ...}}}}.",
    )


def _columns(inputs) -> list[Sample]:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        names = sorted(inputs)
        if len(names) != 1 or names[0] not in _INPUTS:
            raise TFServingRequestError(
                400,
                f"'inputs' names one input of the signature, {IMAGES!r} or "
                f"{IMAGE_BYTES!r}; got {names}.",
            )
        name, batch = names[0], inputs[names[0]]
        if not isinstance(batch, list) or not batch:
            raise TFServingRequestError(
                400, f"'inputs'.{name} must be a list of one or more samples."
            )
        return [_input(name, value) for value in batch]
    if not isinstance(inputs, list) or not inputs:
        raise TFServingRequestError(
            400, "'inputs' must be a batch (a list) or {input name: batch}."
        )
    return [_value(value) for value in inputs]


def version_number(text: str) -> int:
    """The ``N`` of ``/versions/N``.

    Raises:
        TFServingRequestError: 400 unless it is a whole number (as TF Serving's
            ``Malformed request``).
    """
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise TFServingRequestError(400, f"Malformed request: version {text!r} is not a number.")
    return int(text)


def adapter_version(metadata: dict) -> int:
    """An adapter's version: the save counter its config records (``"version"``),
    1 for adapters saved before there was one."""
    version = metadata.get("version")
    return (
        version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else 1
    )


def not_found(name: str, version: int | None = None) -> TFServingRequestError:
    """TF Serving's 404 for a model (or a version of it) it does not serve."""
    which = f"Latest({name})" if version is None else f"Specific({name}, {version})"
    return TFServingRequestError(404, f"Servable not found for request: {which}")


def status_document(version: int, failure: str | None) -> dict:
    """``GET /v1/models/NAME``: ``GetModelStatusResponse`` as JSON.

    Args:
        version: The adapter's version.
        failure: Why it failed to load (state ``END``), or ``None`` (``AVAILABLE``).
    """
    status = {"error_code": "OK", "error_message": ""}
    if failure is not None:
        status = {"error_code": "FAILED_PRECONDITION", "error_message": failure}
    state = "END" if failure is not None else "AVAILABLE"
    return {"model_version_status": [{"version": str(version), "state": state, "status": status}]}


def _tensor_info(name: str, dtype: str, shape) -> dict:
    return {
        "dtype": dtype,
        "tensor_shape": {
            "dim": [{"size": str(size), "name": ""} for size in shape],
            "unknown_rank": False,
        },
        "name": f"{name}:0",
    }


def metadata_document(name: str, version: int, input_shape, classes: int, extra: dict) -> dict:
    """``GET /v1/models/NAME/metadata``: ``GetModelMetadataResponse`` as JSON,
    nested as TF Serving nests it (``metadata.signature_def.signature_def``).

    Args:
        name: The adapter.
        version: Its version.
        input_shape: The model's input shape, without the batch axis.
        classes: The adapter's outputs.
        extra: More fields of ``metadata`` beside ``signature_def`` (labels,
            preprocessing: what a client needs that a signature cannot say).
    """
    signature = {
        "inputs": {
            IMAGES: _tensor_info(IMAGES, "DT_FLOAT", [-1, *input_shape]),
            IMAGE_BYTES: _tensor_info(IMAGE_BYTES, "DT_STRING", [-1]),
        },
        "outputs": {LOGITS: _tensor_info(LOGITS, "DT_FLOAT", [-1, classes])},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}, **extra},
    }


def error_document(message: str) -> dict:
    """TF Serving's error body."""
    return {"error": message}
