"""Adapter stores in S3-compatible object storage, against a real S3 server
(moto's standalone server on 127.0.0.1): listed and loaded like local stores
(bitwise the same answers), corrupted objects refused like corrupted files,
saves committed atomically (config last), checkpoint files kept in a local
cache keyed by their SHA-256, one GET per object on a cold read.

Slow: a server and TensorFlow models per module (about half a minute)."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

from lora_ckpt import AdapterPool, inspect_adapter, read_lora_state, save_lora_state
from lora_ckpt.cli import main as cli_main
from lora_ckpt.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CorruptAdapterError,
    StoreError,
)
from lora_ckpt.serving.store import (
    adapter_path,
    build_base_model,
    copy_adapter,
    store_adapters,
    store_base_weights,
    upload_store,
)
from lora_ckpt.state.format import CONFIG_FILE
from lora_ckpt.storage import CACHE_ENV, FsspecStore, open_store
from tests.helpers.scale import images, make_tiny_store, moto_s3, vary

pytestmark = pytest.mark.slow

pytest.importorskip("s3fs", reason="needs the scale extra: pip install 'lora_ckpt[scale]'")
pytest.importorskip("moto", reason="needs the scale extra: pip install 'lora_ckpt[scale]'")

REMOTE = "s3://lora/store"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    try:
        with moto_s3() as env:
            yield {"env": env, "cache": str(cache)}
    finally:
        if saved is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "store")
    return {"path": path, "names": make_tiny_store(path)}


@pytest.fixture(scope="module")
def remote_store(s3, local_store):
    assert upload_store(local_store["path"], REMOTE) == local_store["names"]
    return REMOTE


def _pool(store, names):
    model, _ = build_base_model(store)
    pool = AdapterPool(model, capacity=len(names))
    for name in names:
        pool.load(name, adapter_path(store, name))
    return pool


def _cli_json(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


def test_uploaded_store_is_listed_and_answers_bitwise_like_the_local_one(local_store, remote_store):
    names = local_store["names"]
    assert store_adapters(remote_store) == names
    listed = _cli_json("list", remote_store)
    assert [a["name"] for a in listed] == names
    local = {a["name"]: a for a in _cli_json("list", local_store["path"])}
    for entry in listed:
        assert entry["path"] == f"{remote_store}/adapters/{entry['name']}"
        assert entry["num_parameters"] == local[entry["name"]]["num_parameters"]
        assert entry["metadata"] == local[entry["name"]]["metadata"]
    inspected = _cli_json("inspect", f"{remote_store}/adapters/{names[0]}")
    assert inspected["base_fingerprint"] == local[names[0]]["base_fingerprint"]

    local_pool, remote_pool = _pool(local_store["path"], names), _pool(remote_store, names)
    x = images(4)
    for name in [*names, "off"]:
        np.testing.assert_array_equal(
            remote_pool.predict(x, adapter=name), local_pool.predict(x, adapter=name)
        )
    mixed = [names[i % len(names)] for i in range(4)]
    np.testing.assert_array_equal(
        remote_pool.predict(x, adapters=mixed), local_pool.predict(x, adapters=mixed)
    )
    # The tensors themselves, read through the cache by the hardened loader:
    # the public read_lora_state and inspect_adapter take the URL as they are.
    remote_state = read_lora_state(adapter_path(remote_store, names[1]))
    assert inspect_adapter(adapter_path(remote_store, names[1]))["path"] == (
        adapter_path(remote_store, names[1])
    )
    local_state = read_lora_state(adapter_path(local_store["path"], names[1]))
    assert remote_state.path == adapter_path(remote_store, names[1])
    assert sorted(remote_state.tensors) == sorted(local_state.tensors)
    for key, value in local_state.tensors.items():
        np.testing.assert_array_equal(remote_state.tensors[key], value)


def _read_object(url: str) -> bytes:
    store, url = open_store(url)
    return store.read(url, 1 << 24)


def _write_object(url: str, data: bytes) -> None:
    store, url = open_store(url)
    store.write(url, data)


def _objects(url: str) -> list[str]:
    store, url = open_store(url)
    return sorted(store.listdir(url))


class S3Requests:
    """Counts the S3 API calls this process makes (botocore's own event hook)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.client = open_store("s3://")[0].remote.fs.s3
        self.client.meta.events.register("before-call.s3", self._count)
        return self

    def _count(self, model, **kwargs):
        self.calls.append(model.name)

    def __exit__(self, *exc):
        self.client.meta.events.unregister("before-call.s3", self._count)


def test_a_cold_read_gets_each_object_once_and_a_warm_read_only_the_config(
    s3, remote_store, local_store, monkeypatch
):
    monkeypatch.setenv(CACHE_ENV, str(s3["cache"]) + "-cold")
    url = adapter_path(remote_store, local_store["names"][0])
    config = json.loads(_read_object(f"{url}/{CONFIG_FILE}"))
    with S3Requests() as cold:
        read_lora_state(url)
    # The config, then each checkpoint object: one GET each, no listing, no HEAD.
    assert cold.calls == ["GetObject"] * (1 + len(config["checkpoint"]["files"]))
    for name, record in config["checkpoint"]["files"].items():
        blob = os.path.join(s3["cache"] + "-cold", "blobs", record["sha256"])
        with open(blob, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == record["sha256"], name

    def no_download(*args, **kwargs):
        raise AssertionError("a cache hit downloaded a checkpoint object")

    monkeypatch.setattr(FsspecStore, "read_verified", no_download)
    with S3Requests() as warm:
        read_lora_state(url)
    assert warm.calls == ["GetObject"]  # the config only: it says which version to read

    # The base weights are cached too, once per object version.
    base = store_base_weights(remote_store)
    assert base.startswith(os.path.join(s3["cache"] + "-cold", "files"))
    monkeypatch.setattr(
        open_store("s3://")[0].remote.fs.__class__,
        "get_file",
        lambda *a, **k: pytest.fail("a cached base.h5 was downloaded again"),
    )
    assert store_base_weights(remote_store) == base


def test_a_save_lists_the_prefix_once(s3, remote_store):
    model, _ = build_base_model(remote_store)
    url = "s3://lora/counted/task"
    with S3Requests() as first:
        save_lora_state(model, url)
    assert first.calls.count("ListObjectsV2") <= 1, first.calls
    assert first.calls.count("PutObject") == 3  # index, data, then the config
    with S3Requests() as again:
        save_lora_state(model, url, overwrite=True)
    assert again.calls.count("ListObjectsV2") <= 1, again.calls
    assert again.calls.count("DeleteObject") + again.calls.count("DeleteObjects") >= 1


def _corrupt(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "emptied", "larger", "bad config"])
def test_a_corrupted_object_is_refused_like_a_corrupted_file(
    s3, local_store, remote_store, tmp_path, damage, monkeypatch
):
    # An empty cache: a verified copy of the same bytes would rightly be used instead.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    name = local_store["names"][2]
    source = adapter_path(local_store["path"], name)
    # The same damage to a local copy and to an uploaded copy.
    local_copy = str(tmp_path / name)
    shutil.copytree(source, local_copy)
    url = f"s3://lora/damaged-{damage.replace(' ', '-')}/{name}"
    copy_adapter(source, url)
    remote_config = json.loads(_read_object(f"{url}/{CONFIG_FILE}"))
    data_name = next(n for n in remote_config["checkpoint"]["files"] if ".data-" in n)
    local_data_name = next(n for n in os.listdir(local_copy) if ".data-" in n)
    if damage == "bad config":
        target, local_target, change = CONFIG_FILE, CONFIG_FILE, lambda d: d[: len(d) // 2]
    else:
        target, local_target = data_name, local_data_name
        change = {
            "flipped byte": _corrupt,
            "truncated": lambda d: d[:-8],
            "emptied": lambda d: b"",
            "larger": lambda d: d + b"\0" * 64,
        }[damage]
    _write_object(f"{url}/{target}", change(_read_object(f"{url}/{target}")))
    with open(os.path.join(local_copy, local_target), "rb") as handle:
        local_bytes = handle.read()
    with open(os.path.join(local_copy, local_target), "wb") as handle:
        handle.write(change(local_bytes))

    with pytest.raises(CorruptAdapterError):
        read_lora_state(local_copy)
    with pytest.raises(CorruptAdapterError):
        read_lora_state(url)
    # Nothing of a refused download stays in the cache.
    assert not os.path.exists(tmp_path / "cache" / "blobs") or (
        sorted(os.listdir(tmp_path / "cache" / "blobs"))
        == sorted(
            r["sha256"] for n, r in remote_config["checkpoint"]["files"].items() if n != target
        )
    )
    # And a pool refuses it the same way, keeping its resident adapters.
    model, _ = build_base_model(remote_store)
    pool = AdapterPool(model, capacity=2)
    pool.load("good", adapter_path(remote_store, local_store["names"][0]))
    with pytest.raises(CorruptAdapterError):
        pool.load("bad", url)
    assert pool.names() == ["good"]


def test_missing_adapters_and_stores_say_so(s3, remote_store):
    with pytest.raises(AdapterNotFoundError):
        read_lora_state(f"{remote_store}/adapters/nope")
    with pytest.raises(StoreError, match="not an adapter store"):
        build_base_model("s3://lora/no-store-here")
    assert store_adapters("s3://lora/no-store-here") == []
    with pytest.raises(AdapterNotFoundError):
        read_lora_state("s3://no-such-bucket-anywhere/a")


def test_an_unreachable_store_says_what_to_check_within_30_seconds(s3, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for call in (
        lambda: store_adapters("s3://lora/store"),
        lambda: read_lora_state("s3://lora/store/adapters/a0"),
        lambda: inspect_adapter("s3://lora/store/adapters/a0"),
    ):
        started = time.monotonic()
        with pytest.raises(StoreError, match="AWS_ENDPOINT_URL"):
            call()
        assert time.monotonic() - started < 30


def test_a_cache_copy_changed_on_disk_is_downloaded_again(s3, local_store, remote_store):
    url = adapter_path(remote_store, local_store["names"][1])
    read_lora_state(url)  # now in the cache
    config = json.loads(_read_object(f"{url}/{CONFIG_FILE}"))
    data = next(r for n, r in config["checkpoint"]["files"].items() if ".data-" in n)
    with open(os.path.join(s3["cache"], "blobs", data["sha256"]), "r+b") as handle:
        handle.write(b"\xff\xff\xff\xff")
    state = read_lora_state(url)  # refused from the cache, then fetched again
    expected = read_lora_state(adapter_path(local_store["path"], local_store["names"][1]))
    for key, value in expected.tensors.items():
        np.testing.assert_array_equal(state.tensors[key], value)


def _tensors(url):
    return read_lora_state(url).tensors


def test_save_to_s3_commits_atomically(s3, remote_store, monkeypatch):
    model, _ = build_base_model(remote_store)
    url = "s3://lora/saves/task"
    vary(model, 1)
    save_lora_state(model, url, metadata={"version": 1})
    first = _tensors(url)
    with pytest.raises(AdapterExistsError):
        save_lora_state(model, url)

    # A failure after the new checkpoint is uploaded, before the config (the commit).
    vary(model, 2)
    real_write = FsspecStore.write

    def fail(self, path, data):
        if path.endswith(CONFIG_FILE):
            raise OSError("connection lost before the commit")
        return real_write(self, path, data)

    monkeypatch.setattr(FsspecStore, "write", fail)
    with pytest.raises(OSError, match="before the commit"):
        save_lora_state(model, url, overwrite=True, metadata={"version": 2})
    monkeypatch.undo()
    # The old checkpoint and its config; the uncommitted files were removed.
    assert len(_objects(url)) == 3
    assert json.loads(_read_object(f"{url}/{CONFIG_FILE}"))["metadata"] == {"version": 1}
    for key, value in _tensors(url).items():
        np.testing.assert_array_equal(value, first[key])

    # The next save commits, and removes the old files.
    save_lora_state(model, url, overwrite=True, metadata={"version": 2})
    config = json.loads(_read_object(f"{url}/{CONFIG_FILE}"))
    assert config["metadata"] == {"version": 2}
    assert _objects(url) == sorted([CONFIG_FILE, *config["checkpoint"]["files"]])
    second = _tensors(url)
    changed = [k for k in second if not np.array_equal(second[k], first[k])]
    assert changed, "the second save holds other values"


def test_garbage_of_killed_saves_is_collected(s3, local_store):
    url = "s3://lora/gc/adapters/task"
    copy_adapter(adapter_path(local_store["path"], local_store["names"][0]), url)
    orphan = f"{url}/adapter-0123456789abcdef.index"
    _write_object(orphan, b"left by a killed save")
    assert cli_main(["gc", "s3://lora/gc"]) == 0
    assert orphan.rsplit("/", 1)[1] not in _objects(url)
    assert len(_objects(url)) == 3
    read_lora_state(url)  # still whole


def test_the_single_process_service_serves_an_s3_store(local_store, remote_store):
    from lora_ckpt.serving.app import create_app

    from .helpers.asgi import assert_app_answers_like

    reference = _pool(local_store["path"], local_store["names"])
    app = create_app(remote_store, capacity=3)
    assert_app_answers_like(app, reference, local_store["names"], images(2, seed=3))
