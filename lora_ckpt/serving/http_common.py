"""The pieces of the service's HTTP API (:mod:`lora_ckpt.serving.http_app`):
request bodies turned into model inputs, answers, TF Serving documents, the
status of each error, and the request metrics.

The Ray replicas use :func:`error_parts` too, to answer errors as data the
ingress turns into the same HTTP answer.
"""

import asyncio
import concurrent.futures
import time

import numpy as np
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import (
    AdapterError,
    AdapterNotFoundError,
    AdapterNotLoadedError,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    PoolFullError,
)
from .console_stats import RecentRequests
from .inputs import (
    HTTPError,
    decode_base64,
    decode_image,
    multipart_image,
    parse_json,
    parse_tensor,
)
from .pool import OFF
from .store import validate_adapter_name

PREPROCESSING = "RGB, resized to the model's input size (bilinear), pixel / 127.5 - 1"

_STATUS = [  # most specific first
    (AdapterNotLoadedError, 404),
    (AdapterNotFoundError, 404),
    (PoolFullError, 503),
    (LoRAConfigError, 400),
    (MergeStateError, 409),
    (AdapterError, 422),
    (LoRAError, 400),
]


def status_of(exc: LoRAError) -> int:
    """The HTTP status a LoRAError is answered with."""
    return next(code for cls, code in _STATUS if isinstance(exc, cls))


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    """``{"error": {"type", "message"}}`` with ``status``."""
    # After a body refused unread (too large, too slow) the connection must close:
    # the rest of that body is not read, so nothing else can follow on it.
    headers = {"connection": "close"} if status in (408, 413) else None
    return JSONResponse(
        {"error": {"type": kind, "message": message}}, status_code=status, headers=headers
    )


def error_parts(exc: Exception) -> tuple[int, str, str] | None:
    """``(status, type, message)`` for an HTTPError or LoRAError, else ``None``."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.kind, exc.message
    if isinstance(exc, LoRAError):
        return status_of(exc), type(exc).__name__, str(exc)
    return None


def adapter_name(request: Request) -> str:
    """The ``{name}`` of the path, validated (``off`` is the base alone)."""
    name = request.path_params["name"]
    return name if name == OFF else validate_adapter_name(name)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def answer(name: str, logits: np.ndarray, labels, top_k: int) -> dict:
    """The ``/predict`` answer: class, label, top-k probabilities and logits."""
    probabilities = _softmax(logits.astype(np.float64))
    order = np.argsort(-logits)[:top_k]

    def label(index: int):
        return labels[index] if labels and index < len(labels) else None

    best = int(order[0])
    return {
        "adapter": name,
        "class": best,
        "label": label(best),
        "top_k": [
            {"class": int(i), "label": label(int(i)), "probability": float(probabilities[i])}
            for i in order
        ],
        "logits": logits.tolist(),
    }


async def predict_image(request: Request, body: bytes, shape, max_pixels: int) -> np.ndarray:
    """The one image of a ``/predict`` request: JSON ``tensor`` or
    ``image_base64``, or a multipart ``image`` upload.

    Raises:
        HTTPError: 400 for anything else, 413 for too many pixels.
    """
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        upload = await multipart_image(request, body)
        return await off_the_loop(decode_image, upload, shape, max_pixels)
    return await off_the_loop(_json_image, body, shape, max_pixels)


def _json_image(body: bytes, shape, max_pixels: int) -> np.ndarray:
    payload = parse_json(body)
    if not isinstance(payload, dict) or not ({"tensor", "image_base64"} & set(payload)):
        raise HTTPError(400, "BadRequest", "Send {'tensor': [...]} or {'image_base64': '...'}.")
    if "tensor" in payload:
        return parse_tensor(payload["tensor"], shape)
    return decode_image(decode_base64(payload["image_base64"]), shape, max_pixels)


# Parsing and decoding take up to seconds (a 4096x4096 image), so they run on
# threads of their own, never on the event loop: two, so that a burst of
# large images holds at most two decoded images in memory at once.
_DECODERS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lora-ckpt-decode")


async def off_the_loop(function, *args):
    """``function(*args)`` on a decoding thread, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_DECODERS, function, *args)


async def tfs_instances(body: bytes, shape, max_pixels: int, max_instances: int) -> np.ndarray:
    """The samples of a TF Serving ``:predict`` body ``{"instances": [...]}``.

    Raises:
        HTTPError: 400 for a bad body or instance, 413 for too many instances.
    """
    return await off_the_loop(_tfs_instances, body, shape, max_pixels, max_instances)


def _tfs_instances(body: bytes, shape, max_pixels: int, max_instances: int) -> np.ndarray:
    payload = parse_json(body)
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise HTTPError(400, "BadRequest", "Send {'instances': [...]}, one or more samples.")
    if len(instances) > max_instances:
        raise HTTPError(
            413, "TooManyInstances", f"{len(instances)} instances; the limit is {max_instances}."
        )

    def instance(value) -> np.ndarray:
        if isinstance(value, dict):
            if set(value) != {"b64"}:
                raise HTTPError(400, "BadRequest", "An image instance is {'b64': '<base64>'}.")
            return decode_image(decode_base64(value["b64"]), shape, max_pixels)
        return parse_tensor(value, shape)

    return np.stack([instance(value) for value in instances])


def tfs_status(failure: str | None) -> dict:
    """TF Serving's model status document (``failure``: why the adapter failed to load)."""
    status = {"error_code": "OK", "error_message": ""}
    if failure is not None:
        status = {"error_code": "FAILED_PRECONDITION", "error_message": failure}
    state = "END" if failure is not None else "AVAILABLE"
    return {"model_version_status": [{"version": "1", "state": state, "status": status}]}


def tfs_metadata(name: str, input_shape, classes: int, labels) -> dict:
    """TF Serving's metadata document for adapter ``name``."""
    return {
        "model_spec": {"name": name, "signature_name": "serving_default", "version": "1"},
        "metadata": {
            "signature_def": {
                "inputs": {"images": {"dtype": "DT_FLOAT", "shape": [-1, *input_shape]}},
                "outputs": {"logits": {"dtype": "DT_FLOAT", "shape": [-1, classes]}},
            },
            "input_shape": list(input_shape),
            "dtype": "float32",
            "classes": classes,
            "labels": labels,
            "preprocessing": PREPROCESSING,
        },
    }


class RequestMetrics:
    """Prediction requests and their latency per adapter, in one Prometheus
    registry, and the last minutes of them in :attr:`recent` (the console's
    ``GET /console/stats``)."""

    def __init__(self, registry):
        self.requests = Counter(
            "lora_requests", "Prediction requests", ["adapter", "status"], registry=registry
        )
        self.latency = Histogram(
            "lora_request_latency_seconds", "Prediction latency", ["adapter"], registry=registry
        )
        self.recent = RecentRequests()

    async def observed(self, name: str, work, known):
        """Awaits ``work``, counting it under ``name`` if ``known(name, status)``
        says so, else under ``_unknown``: names from requests must not grow the series."""
        started, status = time.perf_counter(), "error"
        try:
            result = await work
            status = "ok"
            return result
        finally:
            label = name if known(name, status) else "_unknown"
            elapsed = time.perf_counter() - started
            self.requests.labels(adapter=label, status=status).inc()
            self.latency.labels(adapter=label).observe(elapsed)
            self.recent.add(label, status == "ok", elapsed, time.monotonic())
