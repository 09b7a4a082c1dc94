"""TF Serving's REST API exactly as its documentation prints it: each request
and response below is quoted from https://www.tensorflow.org/tfx/serving/api_rest
(tensorflow_serving/g3doc/api_rest.md) or from TF Serving's own handler test
(tensorflow_serving/model_servers/http_rest_api_handler_test.cc and its
testdata saved_model_half_plus_two_2_versions_metadata.json), answered by the
service's app over a plain-Python backend computing the documented toy models
(half_plus_three: y = x / 2 + 3; half_plus_two: y = x / 2 + 2). No model, no
server."""

import json

import numpy as np
import pytest

from lora_ckpt.serving.backend import Prediction
from lora_ckpt.serving.inputs import HTTPError
from lora_ckpt.serving.options import ServiceOptions
from lora_ckpt.serving.tfserving import (
    TFServingRequestError,
    metadata_document,
    parse_predict,
)

from .test_http_app import FakeBackend, call


class HalfPlus(FakeBackend):
    """The documented toy models: scalar inputs (or ``shape``), ``y = x / 2 + offset``."""

    def __init__(self, offset: float, shape=(), version: int = 123):
        super().__init__(ServiceOptions(max_body_bytes=100_000))
        self.offset, self.shape, self.version = offset, shape, version

    async def input_shape(self):
        return self.shape

    async def predict(self, name, images):
        if name not in await self.store_names() and name != "off":
            raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")
        self.calls.append(("predict", name, images.shape))
        return Prediction([np.asarray(x / 2 + self.offset) for x in images], None)

    async def resident(self):
        return ["half_plus_three", "half_plus_two"]

    async def store_names(self):
        return ["half_plus_three", "half_plus_two"]

    async def failure(self, name):
        return None

    async def adapter_metadata(self, name):
        return {"input_shape": self.shape, "classes": 1, "labels": None, "version": self.version}


def post(backend, path, body):
    return call(backend, "POST", path, content=json.dumps(body))


def test_the_documented_predict_call():
    # api_rest.md, "Make REST API calls to ModelServer":
    # curl -d '{"instances": [1.0,2.0,5.0]}' -X POST .../v1/models/half_plus_three:predict
    response = post(
        HalfPlus(3), "/v1/models/half_plus_three:predict", {"instances": [1.0, 2.0, 5.0]}
    )
    assert response.status_code == 200
    assert response.json() == {"predictions": [3.5, 4.0, 5.5]}


def test_the_handler_tests_row_and_columnar_requests_with_versions_and_signature():
    model = "/v1/models/half_plus_two"
    backend = HalfPlus(2, shape=(2,))
    # Query latest version.
    body = {"instances": [[1.0, 2.0], [3.0, 4.0]]}
    assert post(backend, f"{model}:predict", body).json() == {
        "predictions": [[2.5, 3.0], [3.5, 4.0]]
    }
    backend = HalfPlus(2)
    # Query specific versions.
    body = {"instances": [1.0, 2.0]}
    assert post(backend, f"{model}/versions/123:predict", body).json() == {
        "predictions": [2.5, 3.0]
    }
    # Query specific versions with explicit signature_name.
    body = {"signature_name": "serving_default", "instances": [3.0, 4.0]}
    assert post(backend, f"{model}/versions/123:predict", body).json() == {
        "predictions": [3.5, 4.0]
    }
    # Query specific versions with explicit signature_name and columnar inputs.
    body = {"signature_name": "serving_default", "inputs": [3.0, 4.0]}
    response = post(backend, f"{model}/versions/123:predict", body)
    assert response.json() == {"outputs": [3.5, 4.0]}
    assert response.headers["content-type"] == "application/json"


def test_the_documented_status_document():
    # api_rest.md: curl http://localhost:8501/v1/models/half_plus_three
    documented = {
        "model_version_status": [
            {
                "version": "123",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    backend = HalfPlus(3)
    assert call(backend, "GET", "/v1/models/half_plus_three").json() == documented
    # GetStatus of a specific version (the handler test) is the same document.
    assert call(backend, "GET", "/v1/models/half_plus_three/versions/123").json() == documented


# The serving_default signature of TF Serving's metadata testdata, and its nesting.
DOCUMENTED_METADATA = {
    "model_spec": {
        "name": "saved_model_half_plus_two_2_versions",
        "signature_name": "",
        "version": "123",
    },
    "metadata": {
        "signature_def": {
            "signature_def": {
                "serving_default": {
                    "inputs": {
                        "x": {
                            "dtype": "DT_FLOAT",
                            "tensor_shape": {
                                "dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}],
                                "unknown_rank": False,
                            },
                            "name": "x:0",
                        }
                    },
                    "outputs": {
                        "y": {
                            "dtype": "DT_FLOAT",
                            "tensor_shape": {
                                "dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}],
                                "unknown_rank": False,
                            },
                            "name": "y:0",
                        }
                    },
                    "method_name": "tensorflow/serving/predict",
                    "defaults": {},
                }
            }
        }
    },
}


def test_metadata_is_nested_exactly_as_tf_servings():
    backend = HalfPlus(2, shape=(1,))
    document = call(backend, "GET", "/v1/models/half_plus_two/versions/123/metadata").json()
    assert call(backend, "GET", "/v1/models/half_plus_two/metadata").json() == document
    assert document["model_spec"] == {**DOCUMENTED_METADATA["model_spec"], "name": "half_plus_two"}
    ours = document["metadata"]["signature_def"]["signature_def"]
    theirs = DOCUMENTED_METADATA["metadata"]["signature_def"]["signature_def"]
    assert list(ours) == list(theirs) == ["serving_default"]
    assert set(ours["serving_default"]) == set(theirs["serving_default"])
    # Same dtype and shape as the documented [-1, 1] tensors: equal but for the names.
    image = ours["serving_default"]["inputs"]["images"]
    assert image == {**theirs["serving_default"]["inputs"]["x"], "name": "images:0"}
    logits = ours["serving_default"]["outputs"]["logits"]
    assert logits == {**theirs["serving_default"]["outputs"]["y"], "name": "logits:0"}
    assert ours["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    for field in ("method_name", "defaults"):
        assert ours["serving_default"][field] == theirs["serving_default"][field]
    # What a client needs beside the signature sits beside it.
    assert document["metadata"]["input_shape"] == [1] and document["metadata"]["classes"] == 1


def test_metadata_document_for_an_image_model():
    document = metadata_document("cats", 4, (32, 32, 3), 10, {})
    inputs = document["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    dims = [d["size"] for d in inputs["images"]["tensor_shape"]["dim"]]
    assert dims == ["-1", "32", "32", "3"] and document["model_spec"]["version"] == "4"


def test_the_documented_not_found_error_and_other_versions():
    # api_rest.md: curl -i -d '{"instances": [1.0,5.0]}' -X POST .../v1/models/half:predict
    # HTTP/1.1 404 Not Found ... { "error": "Servable not found for request: Latest(half)" }
    backend = HalfPlus(3)
    response = post(backend, "/v1/models/half:predict", {"instances": [1.0, 5.0]})
    assert response.status_code == 404
    assert response.json() == {"error": "Servable not found for request: Latest(half)"}
    for path in (
        "/v1/models/half_plus_three/versions/99",
        "/v1/models/half_plus_three/versions/99/metadata",
    ):
        response = call(backend, "GET", path)
        assert response.status_code == 404
        assert response.json() == {
            "error": "Servable not found for request: Specific(half_plus_three, 99)"
        }
    response = post(backend, "/v1/models/half_plus_three/versions/99:predict", {"instances": [1.0]})
    assert response.status_code == 404 and backend.calls == []  # nothing ran
    response = call(backend, "GET", "/v1/models/half_plus_three/versions/HELLO")
    assert response.status_code == 400 and "Malformed request" in response.json()["error"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"signature_name": "classify_x_to_y", "instances": [1.0]}, "not found in signature def"),
        ({"instances": [1.0], "inputs": [1.0]}, "not both"),
        ({"examples": [1.0]}, "Unknown fields"),
        ({}, "Missing 'inputs' or 'instances' key"),
        ({"instances": []}, "one or more"),
        ({"instances": ["foo"]}, "An instance is"),
        ({"inputs": {"images": [1.0], "image_bytes": [{"b64": ""}]}}, "names one input"),
    ],
)
def test_bad_bodies_are_400_with_tf_servings_error_body(body, words):
    response = post(HalfPlus(3), "/v1/models/half_plus_three:predict", body)
    assert response.status_code == 400
    assert list(response.json()) == ["error"] and words in response.json()["error"]


def test_v1_errors_are_a_message_and_other_routes_keep_type_and_message():
    backend = HalfPlus(3)
    response = call(backend, "POST", "/v1/models/half_plus_three:predict", content=b"{")
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    response = call(backend, "GET", "/v1/nowhere")
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    response = call(backend, "POST", "/predict/half_plus_three", content=b"{")
    assert response.json()["error"]["type"] == "BadJSON"


def test_row_and_columnar_forms_of_the_same_batch_parse_alike():
    # api_rest.md: "Columnar representation of the previous example", for our inputs.
    images = [[[1, 2]], [[3, 4]]]  # "List of 2 tensors each of [1, 2] shape"
    b64 = [{"b64": "aW1hZ2UgYnl0ZXM="}, {"b64": "YXdlc29tZSBpbWFnZSBieXRlcw=="}]
    row = parse_predict({"instances": images}, 64)
    named_row = parse_predict({"instances": [{"images": x} for x in images]}, 64)
    columnar = parse_predict({"inputs": {"images": images}}, 64)
    bare_columnar = parse_predict({"inputs": images}, 64)
    assert row.samples == named_row.samples == columnar.samples == bare_columnar.samples
    assert not row.columnar and columnar.columnar
    assert row.answer([1]) == {"predictions": [1]} and columnar.answer([1]) == {"outputs": [1]}
    named_bytes = parse_predict({"instances": [{"image_bytes": v} for v in b64]}, 64)
    assert named_bytes.samples == parse_predict({"inputs": {"image_bytes": b64}}, 64).samples
    assert [s.kind for s in named_bytes.samples] == ["b64", "b64"]
    assert named_bytes.samples == parse_predict({"instances": b64}, 64).samples


def test_limits_and_the_mixed_request():
    with pytest.raises(TFServingRequestError) as info:
        parse_predict({"instances": [[1]] * 5}, 4)
    assert info.value.status == 413
    mixed = parse_predict({"instances": [[1]] * 2, "adapters": ["a", "b"]}, 4, mixed=True)
    assert mixed.adapters == ("a", "b")
    for body in (
        {"instances": [[1]] * 3, "adapters": ["a", "b"]},  # 6 samples > 4
        {"instances": [[1]], "adapters": ["a", "a"]},
        {"instances": [[1]], "adapters": []},
        {"instances": [[1]], "adapters": ["a"], "extra": 1},
    ):
        with pytest.raises(TFServingRequestError):
            parse_predict(body, 4, mixed=True)
    with pytest.raises(TFServingRequestError, match="Unknown fields"):
        parse_predict({"instances": [[1]], "adapters": ["a"]}, 4)  # only on /v1/adapters:predict


def test_several_adapters_one_input():
    backend = HalfPlus(3)
    body = {"instances": [1.0, 2.0], "adapters": ["half_plus_three", "off"]}
    response = post(backend, "/v1/adapters:predict", body)
    assert response.status_code == 200
    assert response.json() == {"predictions": {"half_plus_three": [3.5, 4.0], "off": [3.5, 4.0]}}
    columnar = post(backend, "/v1/adapters:predict", {"inputs": [1.0], "adapters": ["off"]})
    assert columnar.json() == {"outputs": {"off": [3.5]}}
    bad = post(backend, "/v1/adapters:predict", {"instances": [1.0], "adapters": ["../x"]})
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


def test_several_adapters_keep_each_answers_headers_once():
    backend = FakeBackend()
    x = np.ones((4, 4, 3), np.float32).tolist()
    response = post(backend, "/v1/adapters:predict", {"instances": [x], "adapters": ["a", "b"]})
    assert response.status_code == 200 and response.headers["x-test"] == "fake"
    assert sorted(call[1] for call in backend.calls) == ["a", "b"]
