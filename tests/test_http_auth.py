"""Keys on the service's app (lora_ckpt.serving.http_app with --auth): who
gets 401, 403, 404 and 429 on which route, over the plain-Python fake backend
of test_http_app. No model, no server."""

import asyncio
import hashlib
import json

import httpx
import numpy as np

from lora_ckpt.serving.http_app import build_app
from lora_ckpt.serving.options import ServiceOptions

from .test_http_app import SHAPE, FakeBackend, call

X = np.ones(SHAPE, np.float32).tolist()


def keys_file(tmp_path, **extra) -> str:
    def digest(key):
        return hashlib.sha256(key.encode()).hexdigest()

    keys = [
        {"sha256": digest("tenant-key"), "tenant": "acme", "adapters": ["a", "acme-*"]},
        {"sha256": digest("admin-key"), "tenant": "ops", "adapters": ["*"], "admin": True},
        {
            "sha256": digest("slow-key"),
            "tenant": "slow",
            "adapters": ["*"],
            "rate": 0.1,
            "burst": 2,
        },
    ]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": keys}))
    return str(path)


def backend(tmp_path, **changes) -> FakeBackend:
    options = ServiceOptions(max_body_bytes=10_000, top_k=2, auth=keys_file(tmp_path), **changes)
    return FakeBackend(options)


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_health_and_ready_stay_open_and_ready_names_no_adapter(tmp_path):
    fake = backend(tmp_path)
    assert call(fake, "GET", "/health").status_code == 200
    ready = call(fake, "GET", "/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_no_key_or_a_wrong_key_is_401_on_every_other_route(tmp_path):
    fake = backend(tmp_path)
    for method, path in (
        ("GET", "/adapters"),
        ("POST", "/predict/a"),
        ("POST", "/adapters/a"),
        ("GET", "/metrics"),
        ("GET", "/replicas"),
        ("GET", "/v1/models/a"),
        ("POST", "/v1/adapters:predict"),
    ):
        for headers in (
            {},
            bearer("wrong"),
            {"x-api-key": "wrong"},
            {"authorization": "tenant-key"},
        ):
            response = call(fake, method, path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
    v1 = call(fake, "GET", "/v1/models/a").json()
    assert list(v1) == ["error"] and isinstance(v1["error"], str)
    assert call(fake, "GET", "/adapters").json()["error"]["type"] == "Unauthorized"
    assert fake.calls == []


def test_admin_routes_need_an_admin_key(tmp_path):
    fake = backend(tmp_path)
    for method, path in (
        ("POST", "/adapters/a"),
        ("DELETE", "/adapters/a"),
        ("GET", "/metrics"),
        ("GET", "/replicas"),
    ):
        response = call(fake, method, path, headers=bearer("tenant-key"))
        assert response.status_code == 403 and response.json()["error"]["type"] == "Forbidden"
        response = call(fake, method, path, headers=bearer("admin-key"))
        assert response.status_code == 200, (path, response.text)
    assert fake.calls == [("load", "a")]  # the admin's load only
    public = backend(tmp_path, public_metrics=True)
    assert call(public, "GET", "/metrics").status_code == 200  # no key at all


def test_an_adapter_outside_the_globs_is_answered_as_one_not_in_the_store(tmp_path):
    fake = backend(tmp_path)
    tenant = bearer("tenant-key")
    # "bad" is in the store but not the tenant's; "zzz" is in no store.
    for path in ("/predict/bad", "/predict/zzz"):
        response = call(fake, "POST", path, json={"tensor": X}, headers=tenant)
        assert response.status_code == 404
    hidden = call(fake, "POST", "/predict/bad", json={"tensor": X}, headers=tenant).json()
    assert hidden == {
        "error": {"type": "AdapterNotFound", "message": "No adapter 'bad' in the store."}
    }
    for path in ("/v1/models/{}", "/v1/models/{}/metadata", "/v1/models/{}/versions/1"):
        hidden = call(fake, "GET", path.format("bad"), headers=tenant)
        missing = call(fake, "GET", path.format("zzz"), headers=tenant)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"] == missing.json()["error"].replace("zzz", "bad")
    body = {"instances": [X], "adapters": ["a", "bad"]}
    assert call(fake, "POST", "/v1/adapters:predict", json=body, headers=tenant).status_code == 404
    assert call(fake, "POST", "/adapters/bad", headers=bearer("admin-key")).status_code == 200
    assert [c for c in fake.calls if c[0] == "predict"] == []  # nothing ran for the tenant
    ok = call(fake, "POST", "/predict/a", json={"tensor": X}, headers={"x-api-key": "tenant-key"})
    assert ok.status_code == 200 and ok.json()["adapter"] == "a"


def test_the_tenants_adapter_list_holds_only_its_adapters(tmp_path):
    fake = backend(tmp_path)
    mine = call(fake, "GET", "/adapters", headers=bearer("tenant-key")).json()
    assert mine["resident"] == ["a"] and mine["store"] == ["a"] and mine["failed"] == {}
    assert mine["tenant"] == "acme" and mine["admin"] is False
    everything = call(fake, "GET", "/adapters", headers=bearer("admin-key")).json()
    assert everything["store"] == ["a", "bad"] and everything["failed"] == {"bad": "broken"}


def test_over_its_rate_a_key_gets_429_with_retry_after(tmp_path):
    app = build_app(backend(tmp_path))  # one app: its quotas last across requests
    slow = bearer("slow-key")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = [(await client.get("/adapters", headers=slow)).status_code for _ in range(2)]
            assert first == [200, 200]  # the burst
            response = await client.get("/adapters", headers=slow)
            assert response.status_code == 429
            assert 9 <= int(response.headers["retry-after"]) <= 10  # a token per 10 s
            assert response.json()["error"]["type"] == "TooManyRequests"
            v1 = await client.get("/v1/models/a", headers=slow)
            assert v1.status_code == 429 and "rate" in v1.json()["error"]
            assert "retry-after" in v1.headers
            # Other keys are not slowed by it.
            other = await client.get("/adapters", headers=bearer("tenant-key"))
            assert other.status_code == 200

    asyncio.run(main())


def test_no_answer_shows_a_key_or_its_digest(tmp_path):
    fake = backend(tmp_path)
    secrets = ["tenant-key", "admin-key", hashlib.sha256(b"tenant-key").hexdigest()]
    for key in ("tenant-key", "admin-key", "nope"):
        for method, path in (
            ("GET", "/adapters"),
            ("POST", "/adapters/zzz"),
            ("GET", "/v1/models/a"),
        ):
            text = call(fake, method, path, headers=bearer(key)).text
            assert not any(secret in text for secret in secrets)
