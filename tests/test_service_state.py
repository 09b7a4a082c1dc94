"""The service's state in process, no HTTP server and no Ray.

Two states over one store act as two Ray replicas holding the same adapter:
one reloads it after the store's copy changed, the other follows the
directory's order (the replica's heartbeat hands each order to exactly this
call); a failed reload keeps the old version serving; an unload order frees
the slot. And neither listing the store nor decoding an image holds up the
event loop."""

import asyncio
import base64
import io
import os
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from lora_ckpt import save_lora_state
from lora_ckpt.errors import CorruptAdapterError
from lora_ckpt.serving import http_common, service
from lora_ckpt.serving.app import create_app
from lora_ckpt.serving.options import ServiceOptions
from lora_ckpt.serving.orders import RELOAD, UNLOAD, Order
from lora_ckpt.serving.service import ServiceState
from lora_ckpt.serving.store import adapter_path, build_base_model
from tests.helpers.scale import images, make_tiny_store, vary

pytestmark = pytest.mark.slow


def started(store) -> ServiceState:
    state = ServiceState(store, ServiceOptions(capacity=2, preload=False))
    deadline = time.monotonic() + 120
    while state.pool is None and state.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.pool is not None, state.error
    return state


def predict(state, name, x) -> np.ndarray:
    return np.stack(asyncio.run(state.predict(name, x)))


def test_replicas_follow_reload_and_unload_orders(tmp_path):
    store = str(tmp_path / "store")
    make_tiny_store(store, ["a0", "a1"])
    x = images(3)
    first, second = started(store), started(store)
    old = predict(second, "a1", x)
    np.testing.assert_array_equal(predict(first, "a1", x), old)

    model, _ = build_base_model(store)  # a new version of a1, written over the store's copy
    vary(model, 99)
    save_lora_state(model, adapter_path(store, "a1"), overwrite=True)
    new = model(x).numpy()
    assert not np.allclose(new, old, atol=1e-3)

    assert asyncio.run(first.ensure_resident("a1", reload=True)) == "reloaded"
    version = first.pool.version("a1")
    np.testing.assert_allclose(predict(first, "a1", x), new, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(second, "a1", x), old)  # what the order is for

    reload = Order(1, RELOAD, "a1", version)
    assert asyncio.run(second.carry_out(reload)) == "reloaded"
    assert second.pool.version("a1") == version
    np.testing.assert_allclose(predict(second, "a1", x), new, rtol=1e-5, atol=1e-6)
    assert asyncio.run(second.carry_out(reload)) == "untouched"  # already at that version
    assert asyncio.run(second.carry_out(Order(2, RELOAD, "a0", "v"))) == "untouched"
    assert "a0" not in second.pool.names()  # an order loads nothing a replica does not hold

    # A third version arrives broken: the follower's reload fails, the version it
    # holds serves on.
    vary(model, 100)
    save_lora_state(model, adapter_path(store, "a1"), overwrite=True)
    data = os.path.join(adapter_path(store, "a1"), "adapter.data-00000-of-00001")
    with open(data, "r+b") as handle:
        handle.truncate(64)
    with pytest.raises(CorruptAdapterError):
        asyncio.run(second.carry_out(Order(3, RELOAD, "a1", "another version")))
    assert "a1" in second.failed
    np.testing.assert_allclose(predict(second, "a1", x), new, rtol=1e-5, atol=1e-6)

    assert asyncio.run(second.carry_out(Order(4, UNLOAD, "a1"))) == "unloaded"
    assert second.pool.names() == [] and second.pool.stats["loads"] == 2
    assert asyncio.run(second.carry_out(Order(5, UNLOAD, "a1"))) == "untouched"
    assert first.pool.names() == ["a1"]  # an order is carried out where it is handed


def test_listing_the_store_does_not_hold_up_other_requests(tmp_path, monkeypatch):
    # An object store that answers slowly (or not at all until its timeout):
    # the listing waits until /health has answered, which it can only do if
    # the listing is off the event loop. A cold load does not list at all.
    store = str(tmp_path / "store")
    make_tiny_store(store, ["a0"])
    listing, answered_first = service.store_adapters, []
    health_answered = threading.Event()

    def slow_listing(path):
        answered_first.append(health_answered.wait(10))
        return listing(path)

    monkeypatch.setattr(service, "store_adapters", slow_listing)
    app = create_app(store, capacity=2, preload=False)
    state = app.state.service

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            while (await client.get("/ready")).status_code != 200:
                await asyncio.sleep(0.05)
            x = images(1)[0]
            predict = asyncio.create_task(client.post("/predict/a0", json={"tensor": x.tolist()}))
            adapters = asyncio.create_task(client.get("/adapters"))
            await asyncio.sleep(0.2)  # /adapters is now listing the store
            health = await client.get("/health")
            health_answered.set()
            missing = await client.post("/predict/a9", json={"tensor": x.tolist()})
            return health, await predict, await adapters, missing

    health, predicted, adapters, missing = asyncio.run(main())
    assert health.status_code == 200
    assert predicted.status_code == 200, predicted.text
    assert adapters.json()["store"] == ["a0"]
    assert answered_first == [True]  # /adapters listed; the load of a0 did not
    assert state.pool.names() == ["a0"]
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "AdapterNotFound"


def test_decoding_an_image_does_not_hold_up_other_requests(tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    make_tiny_store(store, ["a0"])
    decode, answered_first = http_common.decode_image, []
    health_answered = threading.Event()

    def slow_decode(*args):
        answered_first.append(health_answered.wait(10))
        return decode(*args)

    monkeypatch.setattr(http_common, "decode_image", slow_decode)
    app = create_app(store, capacity=2)
    png = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            while (await client.get("/ready")).status_code != 200:
                await asyncio.sleep(0.05)
            one = asyncio.create_task(client.post("/predict/off", json={"image_base64": b64}))
            many = asyncio.create_task(
                client.post("/v1/models/a0:predict", json={"instances": [{"b64": b64}]})
            )
            await asyncio.sleep(0.2)  # both are decoding
            health = await client.get("/health")
            health_answered.set()
            return health, await one, await many

    health, one, many = asyncio.run(main())
    assert health.status_code == 200
    assert one.status_code == 200 and many.status_code == 200, (one.text, many.text)
    assert answered_first == [True, True]


def test_a_load_reads_the_adapter_once(tmp_path, monkeypatch):
    # read_lora_state is the one read of a load; the config alone is read only
    # to find that nothing needs reading (resident and unchanged, or failed).
    store = str(tmp_path / "store")
    make_tiny_store(store, ["a0", "a1"])
    reads = []
    read_state, read_config = service.read_lora_state, service.adapter_config_bytes
    monkeypatch.setattr(
        service, "read_lora_state", lambda p: reads.append("state") or read_state(p)
    )
    monkeypatch.setattr(
        service, "adapter_config_bytes", lambda s, n: reads.append("config") or read_config(s, n)
    )
    state = started(store)
    assert asyncio.run(state.ensure_resident("a0")) == "loaded"
    assert reads == ["state"]
    assert asyncio.run(state.ensure_resident("a0")) == "resident"
    assert asyncio.run(state.ensure_resident("a0", reload=True)) == "resident"
    assert reads == ["state", "config"]  # an unchanged copy: its config only

    data = os.path.join(adapter_path(store, "a1"), "adapter.data-00000-of-00001")
    with open(data, "r+b") as handle:
        handle.truncate(64)
    reads.clear()
    with pytest.raises(CorruptAdapterError):
        asyncio.run(state.ensure_resident("a1"))
    assert reads == ["state", "config"]  # the config says which copy failed
    with pytest.raises(service.AdapterFailedError):
        asyncio.run(state.ensure_resident("a1"))
    assert reads == ["state", "config", "config"]  # that copy is not read again
