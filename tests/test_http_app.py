"""The one HTTP app over a backend: every route reaches the backend's one
operation, errors become the same JSON statuses, request metrics are counted
in the app. A fake backend in plain Python: no model, no server, no Ray."""

import asyncio

import httpx
import numpy as np
import pytest

from lora_ckpt.errors import AdapterNotFoundError, CorruptAdapterError, PoolFullError
from lora_ckpt.serving.backend import Prediction, ServiceBackend
from lora_ckpt.serving.http_app import build_app
from lora_ckpt.serving.inputs import HTTPError
from lora_ckpt.serving.options import ServiceOptions

SHAPE = (4, 4, 3)


class FakeBackend(ServiceBackend):
    """Two adapters in its store, ``a`` resident; ``bad`` failed to load."""

    def __init__(self, options=None):
        super().__init__(options or ServiceOptions(max_body_bytes=10_000, top_k=2))
        self.calls = []
        self.raise_on_predict = None

    async def readiness(self):
        return {"ready": True, "resident": ["a"], "failed": ["bad"]}

    async def describe(self):
        return {"resident": ["a"], "store": ["a", "bad"], "failed": {"bad": "broken"}}

    async def load(self, name):
        self.calls.append(("load", name))
        return {"adapter": name, "outcome": "loaded", "resident": ["a", name]}

    async def unload(self, name):
        if name != "a":
            raise AdapterNotFoundError(f"{name} is not resident")
        return {"unloaded": name, "resident": []}

    async def input_shape(self):
        return SHAPE

    async def predict(self, name, images):
        self.calls.append(("predict", name, images.shape))
        if self.raise_on_predict is not None:
            raise self.raise_on_predict
        rows = [np.array([0.0, 2.0, 1.0], np.float32) + image.sum() for image in images]
        return Prediction(rows, ["x", "y", "z"], {"x-test": "fake"})

    async def resident(self):
        return ["a"]

    async def store_names(self):
        return ["a", "bad"]

    async def failure(self, name):
        return "broken" if name == "bad" else None

    async def adapter_metadata(self, name):
        return {"input_shape": SHAPE, "classes": 3, "labels": ["x", "y", "z"]}

    async def metrics_text(self):
        return "# HELP fake_gauge A gauge\n# TYPE fake_gauge gauge\nfake_gauge 1.0\n"

    def counts_as_known(self, name, status):
        return name == "a"

    def extra_endpoints(self):
        async def replicas():
            return {"replicas": []}

        return {"/replicas": replicas}


def call(backend, method, path, **kwargs) -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(app=build_app(backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


def test_reads_answer_the_backends_documents():
    backend = FakeBackend()
    assert call(backend, "GET", "/health").json() == {"status": "ok"}
    assert call(backend, "GET", "/ready").json()["resident"] == ["a"]
    assert call(backend, "GET", "/adapters").json()["failed"] == {"bad": "broken"}
    assert call(backend, "GET", "/replicas").json() == {"replicas": []}
    status = call(backend, "GET", "/v1/models/bad").json()["model_version_status"][0]
    assert status["state"] == "END" and status["status"]["error_message"] == "broken"
    meta = call(backend, "GET", "/v1/models/a/metadata").json()
    assert meta["metadata"]["input_shape"] == [4, 4, 3] and meta["metadata"]["classes"] == 3


def test_not_ready_is_503():
    class NotReady(FakeBackend):
        async def readiness(self):
            return {"ready": False, "reason": "loading"}

    response = call(NotReady(), "GET", "/ready")
    assert response.status_code == 503 and response.json()["reason"] == "loading"


def test_predict_parses_once_and_answers_with_the_backends_rows_labels_and_headers():
    backend = FakeBackend()
    x = np.ones(SHAPE, np.float32)
    response = call(backend, "POST", "/predict/a", json={"tensor": x.tolist()})
    assert response.status_code == 200 and response.headers["x-test"] == "fake"
    body = response.json()
    assert body["class"] == 1 and body["label"] == "y" and len(body["top_k"]) == 2
    assert backend.calls == [("predict", "a", (1, *SHAPE))]
    many = call(backend, "POST", "/v1/models/a:predict", json={"instances": [x.tolist()] * 3})
    assert len(many.json()["predictions"]) == 3


def test_errors_become_json_with_their_status():
    backend = FakeBackend()
    x = np.ones(SHAPE, np.float32).tolist()
    assert call(backend, "GET", "/v1/models/missing").status_code == 404
    assert call(backend, "DELETE", "/adapters/zzz").status_code == 404
    bad_name = call(backend, "POST", "/predict/..", json={"tensor": x})
    assert bad_name.status_code in (400, 404)
    too_big = call(backend, "POST", "/predict/a", content=b"[" * 20_000)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "TooLarge"
    for error, status in (
        (CorruptAdapterError("bad bytes"), 422),
        (PoolFullError("busy"), 503),
        (HTTPError(504, "LoadTimeout", "slow"), 504),
    ):
        backend.raise_on_predict = error
        response = call(backend, "POST", "/predict/a", json={"tensor": x})
        assert response.status_code == status
        assert response.json()["error"]["message"] == str(error)
    unknown = call(backend, "GET", "/nowhere")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "HTTPError"


def test_a_bug_is_not_answered_as_a_users_error():
    backend = FakeBackend()
    backend.raise_on_predict = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        call(backend, "POST", "/predict/a", json={"tensor": np.ones(SHAPE).tolist()})


def test_metrics_count_known_names_and_append_the_backends_text():
    backend = FakeBackend()
    x = np.ones(SHAPE, np.float32).tolist()
    call(backend, "POST", "/predict/a", json={"tensor": x})
    call(backend, "POST", "/predict/other", json={"tensor": x})
    text = call(backend, "GET", "/metrics").text
    assert 'lora_requests_total{adapter="a",status="ok"} 1.0' in text
    assert 'lora_requests_total{adapter="_unknown",status="ok"} 1.0' in text
    assert text.endswith("fake_gauge 1.0\n")
