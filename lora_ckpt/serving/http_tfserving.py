"""TF Serving's REST routes of the service's app (:mod:`lora_ckpt.serving.http_app`),
over the backend; the documents and request shapes are :mod:`.tfserving`'s.

- ``POST /v1/models/{name}[/versions/{n}]:predict``: row (``instances`` ->
  ``predictions``) or columnar (``inputs`` -> ``outputs``) format.
- ``GET /v1/models/{name}[/versions/{n}]``: ``GetModelStatusResponse``.
- ``GET /v1/models/{name}[/versions/{n}]/metadata``: ``GetModelMetadataResponse``.
- ``POST /v1/adapters:predict``: ``{"instances" | "inputs": ..., "adapters":
  [a, b]}`` -> ``{"predictions" | "outputs": {a: [...], b: [...]}}``, every
  adapter's samples submitted together, so they ride one mixed batch.

``n`` is the adapter's version (:func:`~.tfserving.adapter_version`); any
other is 404, as TF Serving answers a version it does not hold.
"""

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import AdapterError
from .backend import ServiceBackend
from .http_common import (
    PREPROCESSING,
    adapter_name,
    off_the_loop,
    redact_paths,
    tfs_images,
    visible,
)
from .inputs import HTTPError, parse_json
from .pool import OFF
from .store import validate_adapter_name
from .tfserving import (
    PredictRequest,
    TFServingRequestError,
    adapter_version,
    metadata_document,
    not_found,
    parse_predict,
    status_document,
    version_number,
)

__all__ = ["TFServingEndpoints"]


def _servable(endpoint):
    """``endpoint`` with a 404 for its adapter (not in the store, not the
    key's, not resident) answered as TF Serving answers a model it does not
    serve: ``Servable not found for request: Latest(NAME)``."""

    async def wrapped(self, request: Request):
        try:
            return await endpoint(self, request)
        except Exception as exc:
            parts = self.backend.error_parts(exc)
            if parts is None or parts[0] != 404 or isinstance(exc, TFServingRequestError):
                raise
            version = request.path_params.get("version", "")
            number = int(version) if version.isascii() and version.isdigit() else None
            raise not_found(request.path_params["name"], number) from None

    return wrapped


class TFServingEndpoints:
    """The ``/v1`` routes' coroutines.

    Args:
        backend: The backend.
        common: The app's endpoints (body reading, metrics, ``require_known``).
    """

    def __init__(self, backend: ServiceBackend, common):
        self.backend = backend
        self.common = common
        self.options = backend.options

    async def _request(self, request: Request, mixed: bool) -> PredictRequest:
        body = await self.common.body(request)
        limit = self.options.max_instances
        return await off_the_loop(lambda: parse_predict(parse_json(body), limit, mixed))

    async def _version(self, name: str, request: Request) -> int:
        """The adapter's version (loading it), 404 unless it is the path's ``n``."""
        meta = await self.backend.adapter_metadata(name)
        version = adapter_version(meta)
        wanted = request.path_params.get("version")
        if wanted is not None and version_number(wanted) != version:
            raise not_found(name, version_number(wanted))
        return version

    @_servable
    async def predict(self, request: Request):
        name = visible(request, adapter_name(request))
        if "version" in request.path_params:
            version_number(request.path_params["version"])  # 400 before anything is read
        shape = await self.backend.input_shape()  # 503 before the body is read
        parsed = await self._request(request, mixed=False)
        if "version" in request.path_params:
            await self._version(name, request)
        images = await tfs_images(parsed, shape, self.options.max_pixels)
        result = await self.common.observed(name, self.backend.predict(name, images))
        return JSONResponse(
            parsed.answer([row.tolist() for row in result.rows]), headers=result.headers
        )

    async def mixed_predict(self, request: Request):
        shape = await self.backend.input_shape()
        parsed = await self._request(request, mixed=True)
        names = [visible(request, _name(name)) for name in parsed.adapters]
        images = await tfs_images(parsed, shape, self.options.max_pixels)
        # Submitted together: the batcher takes them as one mixed batch.
        results = await asyncio.gather(
            *(self.common.observed(name, self.backend.predict(name, images)) for name in names)
        )
        outputs = {
            name: [row.tolist() for row in r.rows] for name, r in zip(names, results, strict=True)
        }
        # Each adapter's answer may add headers (the Ray replica that answered):
        # one header per name, its values joined.
        headers: dict[str, list[str]] = {}
        for result in results:
            for header, value in (result.headers or {}).items():
                if value not in headers.setdefault(header, []):
                    headers[header].append(value)
        joined = {header: ",".join(values) for header, values in headers.items()}
        return JSONResponse(parsed.answer(outputs), headers=joined)

    @_servable
    async def status(self, request: Request):
        name = adapter_name(request)
        await self.common.require_known(request, name)
        wanted = request.path_params.get("version")
        if wanted is not None:
            version_number(wanted)
        failure = await self.backend.failure(name)
        version = 1
        if failure is None:
            try:
                version = await self._version(name, request)
            except (AdapterError, HTTPError) as exc:
                # It failed to load just now (422, from a replica too): its status says why.
                failure = await self.backend.failure(name)
                if failure is None or (isinstance(exc, HTTPError) and exc.status != 422):
                    raise
        elif wanted is not None and version_number(wanted) != version:
            raise not_found(name, version_number(wanted))
        reason = redact_paths(failure) if failure is not None else None
        return JSONResponse(status_document(version, reason))

    @_servable
    async def metadata(self, request: Request):
        name = adapter_name(request)
        await self.common.require_known(request, name)
        if "version" in request.path_params:
            version_number(request.path_params["version"])
        meta = await self.backend.adapter_metadata(name)
        version = adapter_version(meta)
        wanted = request.path_params.get("version")
        if wanted is not None and version_number(wanted) != version:
            raise not_found(name, version_number(wanted))
        extra = {
            "input_shape": list(meta["input_shape"]),
            "dtype": "float32",
            "classes": meta["classes"],
            "labels": meta["labels"],
            "preprocessing": PREPROCESSING,
        }
        return JSONResponse(
            metadata_document(name, version, meta["input_shape"], meta["classes"], extra)
        )


def _name(name: str) -> str:
    return name if name == OFF else validate_adapter_name(name)
