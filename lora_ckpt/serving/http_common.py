"""The pieces of the service's HTTP API (:mod:`lora_ckpt.serving.http_app`):
request bodies turned into model inputs, answers, TF Serving documents, the
status of each error, and the request metrics.

The Ray replicas use :func:`error_parts` too, to answer errors as data the
ingress turns into the same HTTP answer.
"""

import asyncio
import concurrent.futures
import re
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
from .tfserving import PredictRequest, Sample, error_document

__all__ = [
    "PREPROCESSING",
    "RequestMetrics",
    "adapter_name",
    "answer",
    "error_parts",
    "error_response",
    "not_in_store",
    "off_the_loop",
    "predict_image",
    "redact_paths",
    "status_of",
    "tfs_error_response",
    "tfs_images",
    "visible",
]


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


def error_response(
    status: int, kind: str, message: str, headers: dict | None = None
) -> JSONResponse:
    """``{"error": {"type", "message"}}`` with ``status`` (server paths cut
    from the message, see :func:`redact_paths`) and ``headers``."""
    return JSONResponse(
        {"error": {"type": kind, "message": redact_paths(message)}},
        status_code=status,
        headers={**_closing(status), **(headers or {})},
    )


def _closing(status: int) -> dict:
    # After a body refused unread (too large, too slow) the connection must close:
    # the rest of that body is not read, so nothing else can follow on it.
    return {"connection": "close"} if status in (408, 413) else {}


def tfs_error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """TF Serving's error answer, ``{"error": "<message>"}`` (routes under ``/v1``)."""
    return JSONResponse(
        error_document(redact_paths(message)),
        status_code=status,
        headers={**_closing(status), **(headers or {})},
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


def not_in_store(name: str) -> HTTPError:
    """The 404 of an adapter the store does not have, or that the request's key may not see."""
    return HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")


def visible(request: Request, name: str) -> str:
    """``name``, if the request's key may see it (``request.state.key``, set
    by the app; ``None`` without keys).

    Raises:
        HTTPError: 404, exactly as for a name not in the store.
    """
    key = getattr(request.state, "key", None)
    if key is not None and not key.allows(name):
        raise not_in_store(name)
    return name


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


async def tfs_images(request: PredictRequest, shape, max_pixels: int) -> np.ndarray:
    """The batch of a TF Serving predict request (:mod:`.tfserving`), decoded
    off the event loop.

    Raises:
        HTTPError: 400 for a bad tensor or image, 413 for too many pixels.
    """
    return await off_the_loop(_tfs_images, request.samples, shape, max_pixels)


def _tfs_images(samples: list[Sample], shape, max_pixels: int) -> np.ndarray:
    def sample(value: Sample) -> np.ndarray:
        if value.kind == "b64":
            return decode_image(decode_base64(value.value), shape, max_pixels)
        return parse_tensor(value.value, shape)

    return np.stack([sample(value) for value in samples])


# Absolute paths, URLs (s3://bucket/key) and relative paths of three parts or
# more (store/adapters/x): what an error may quote of the server's files.
_PATH = re.compile(
    r"(?<![\w/.:-])(?:[A-Za-z][\w+.-]*://[^\s'\"]*|/[^\s'\"/]+(?:/[^\s'\"]*)?"
    r"|[\w.~-]+/[\w.~-]+/[^\s'\"]+)"
)


def redact_paths(text: str) -> str:
    """``text`` with every server path or store URL in it cut to its last part
    (``.../adapter_config.json``): answers never show where the server keeps files."""

    def last_part(match: re.Match) -> str:
        path = match.group(0)
        tail = path.rstrip("/.,;:)").rsplit("/", 1)[-1]
        rest = path[len(path.rstrip("/.,;:)")) :]
        return f".../{tail}{rest}" if tail else f"...{rest}"

    return _PATH.sub(last_part, text)


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
