"""The console's routes over a fake backend (no model, no server): the page
and its files from this origin only, ``/whoami``, ``/adapters/{name}/info``
from the config alone (checked against the config's own bytes), and
``/console/stats`` from the requests the app counted, a tenant's key seeing
only its adapters. The browser tests are in test_console_browser.py."""

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from lora_ckpt.serving.console_routes import console_routes
from lora_ckpt.serving.http_app import build_app

from .test_http_app import SHAPE, FakeBackend

CONSOLE = Path(__file__).resolve().parent.parent / "lora_ckpt" / "serving" / "console"
REGRESSION = Path(__file__).resolve().parent / "regression" / "0.1.0"


def call(app, method, path, **kwargs) -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


def test_the_page_and_its_files_come_from_this_origin_only():
    app = build_app(FakeBackend())
    page = call(app, "GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert (
        "frame-ancestors 'none'" in policy and page.headers["x-content-type-options"] == "nosniff"
    )
    # Every file the page and its scripts name is served, with its type; nothing else is named.
    names = set(re.findall(r'(?:src|href)="/console/([\w.]+)"', page.text))
    for script in CONSOLE.glob("*.js"):
        names |= set(re.findall(r'from "\./([\w.]+)"', script.read_text()))
    assert names >= {"console.css", "console.js", "store.js", "try.js", "service.js", "util.js"}
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for name in names:
        response = call(app, "GET", f"/console/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].startswith(types[Path(name).suffix])
        assert response.content == (CONSOLE / name).read_bytes()
    for path in CONSOLE.iterdir():  # no URL of another host, no inline script or handler
        text = path.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name
        assert not re.search(r"<script(?![^>]*\bsrc=)", text) and " onclick=" not in text, path.name
    assert call(app, "GET", "/console/missing.js").status_code == 404
    assert call(app, "POST", "/").status_code == 404  # as before the console: not a route
    assert call(app, "HEAD", "/").status_code == 200


def test_the_files_are_package_data():
    import configparser

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    globs = config["options.package_data"]["lora_ckpt.serving"].split(",")
    shipped = {p.name for g in globs for p in (CONSOLE.parent).glob(g.strip())}
    assert shipped == {p.name for p in CONSOLE.iterdir()}


def test_whoami_without_keys_is_everyone_admin():
    body = call(build_app(FakeBackend()), "GET", "/whoami").json()
    assert body == {"auth": False, "tenant": None, "admin": True}


@pytest.fixture
def store(tmp_path):
    """A local store of three adapters written by lora_ckpt 0.1.0, and a truncated one."""
    adapters = tmp_path / "adapters"
    for name, fixture in (
        ("labels", "v1_convnext_lora_head_labels"),
        ("dora", "v2_convnext_dora"),
        ("rslora", "v2_vit_rslora"),
        ("truncated", "v1_convnext_lora_head_labels"),
    ):
        shutil.copytree(REGRESSION / fixture / "adapter", adapters / name)
    data = next((adapters / "truncated").glob("*.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    return tmp_path


def test_adapter_info_says_what_the_config_says(store):
    backend = FakeBackend()
    backend.store = str(store)
    app = build_app(backend)
    for name in ("labels", "dora", "rslora"):
        folder = store / "adapters" / name
        raw = (folder / "adapter_config.json").read_bytes()
        config = json.loads(raw)
        response = call(app, "GET", f"/adapters/{name}/info")
        assert response.status_code == 200, response.text
        info = response.json()
        assert info["name"] == name and info["version"] == hashlib.sha256(raw).hexdigest()
        assert info["size_bytes"] == sum(os.path.getsize(p) for p in folder.iterdir())
        assert info["format_version"] == config["format_version"]
        assert info["created"] == config["created"]
        assert info["layers"] == config["layers"]
        assert info["ranks"] == sorted({layer["rank"] for layer in config["layers"].values()})
        assert info["dora"] == (name == "dora") and info["rslora"] == (name == "rslora")
        assert info["base"]["fingerprint"] == config["base_model"]["fingerprint"]
        assert info["metadata"] == config["metadata"]
        assert str(store) not in response.text
    assert call(app, "GET", "/adapters/labels/info").json()["labels"] == ["red", "green", "blue"]
    assert call(app, "GET", "/adapters/labels/info").json()["classes"] == 3

    broken = call(app, "GET", "/adapters/truncated/info")
    assert broken.status_code == 422
    error = broken.json()["error"]
    assert error["type"] == "CorruptAdapterError" and "truncated" in error["message"]
    assert "has 100 bytes" in error["message"] and str(store) not in error["message"]
    assert call(app, "GET", "/adapters/nowhere/info").status_code == 404
    assert call(app, "GET", "/adapters/off/info").status_code == 404
    assert call(app, "GET", "/adapters/..%2Fx/info").status_code in (400, 404)


def test_a_backend_without_a_store_has_no_info():
    assert call(build_app(FakeBackend()), "GET", "/adapters/a/info").status_code == 404


def test_stats_count_what_the_app_answered():
    backend = FakeBackend()
    app = build_app(backend)
    x = np.ones(SHAPE, np.float32).tolist()
    for _ in range(3):
        assert call(app, "POST", "/predict/a", json={"tensor": x}).status_code == 200
    backend.raise_on_predict = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        call(app, "POST", "/predict/a", json={"tensor": x})
    stats = call(app, "GET", "/console/stats").json()
    assert stats["ready"] is True and stats["resident"] == ["a"]
    assert stats["failed"] == {"bad": "broken"}
    a = stats["adapters"]["a"]
    assert a["requests"] == 4 and a["errors"] == 1 and a["rps"] > 0
    assert 0 <= a["p50_ms"] <= a["p99_ms"] < 10_000
    assert sum(bucket["requests"] for bucket in stats["history"]) == 4
    assert len(stats["history"]) == 60 and stats["bucket_seconds"] == 5


def test_stats_before_ready_say_why():
    class NotReady(FakeBackend):
        async def readiness(self):
            return {"ready": False, "reason": "loading the base model"}

        async def describe(self):
            raise AssertionError("not asked before ready")

    stats = call(build_app(NotReady()), "GET", "/console/stats").json()
    assert stats["ready"] is False and stats["reason"] == "loading the base model"
    assert stats["resident"] == [] and stats["adapters"] == {}


class _Key:
    """A key as the app's key check leaves it on ``request.state.key``."""

    def __init__(self, tenant, globs, admin=False):
        self.tenant, self.globs, self.admin = tenant, globs, admin

    def allows(self, name):
        return name in self.globs


def _keyed_app(backend, key):
    """The console's routes behind a route factory that sets ``key``, as the app's key check does."""

    def route(path, endpoint, methods=("GET",)):
        async def keyed(request):
            request.state.key = key
            try:
                return await endpoint(request)
            except Exception as exc:
                from lora_ckpt.serving.http_common import error_response

                return error_response(*backend.error_parts(exc))

        return Route(path, keyed, methods=list(methods))

    return Starlette(routes=console_routes(backend, route))


def test_a_tenant_sees_only_its_adapters_in_the_consoles_routes(store):
    backend = FakeBackend()
    backend.store = str(store)
    now = time.monotonic()  # the clock the app records with
    for name in ("a", "bad", "labels", "_unknown"):
        backend.requests.recent.add(name, True, 0.010, now)
    backend.requests.recent.add("a", True, 0.030, now)
    tenant = _keyed_app(backend, _Key("acme", {"a", "labels"}))
    assert call(tenant, "GET", "/whoami").json() == {"auth": True, "tenant": "acme", "admin": False}
    stats = call(tenant, "GET", "/console/stats").json()
    assert stats["tenant"] == "acme" and stats["failed"] == {} and stats["resident"] == ["a"]
    assert sorted(stats["adapters"]) == ["a", "labels"] and stats["adapters"]["a"]["requests"] == 2
    assert sum(bucket["requests"] for bucket in stats["history"]) == 3  # totals: its own only
    assert stats["loads"] is None and stats["evictions"] is None  # counts over every adapter
    assert call(tenant, "GET", "/adapters/labels/info").status_code == 200
    assert call(tenant, "GET", "/adapters/dora/info").status_code == 404  # not its adapter

    admin = _keyed_app(backend, _Key("ops", {"a", "bad", "labels", "dora"}, admin=True))
    assert call(admin, "GET", "/whoami").json() == {"auth": True, "tenant": "ops", "admin": True}
    assert call(admin, "GET", "/console/stats").json()["failed"] == {"bad": "broken"}


def test_the_json_routes_refuse_a_request_without_a_key_when_the_app_has_keys():
    backend = FakeBackend()
    app = _keyed_app(backend, None)
    app.state.gate = object()  # the app has keys, but this request's check left none
    for path in ("/whoami", "/console/stats", "/adapters/a/info"):
        assert call(app, "GET", path).status_code == 401, path
