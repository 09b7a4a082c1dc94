"""A memory:// store (fsspec's in-process object store) behaves bitwise like the
same store on local disk: every public reader, the pool and the CLI listing.

Fast lane: no server; the object-store commit (fresh names, config last) is
the one a real S3 store uses."""

import contextlib
import io
import json
import uuid

import numpy as np
import pytest

from lora_ckpt import (
    AdapterPool,
    inspect_adapter,
    list_adapters,
    load_lora_state,
    read_lora_state,
    save_lora_state,
)
from lora_ckpt.cli import main as cli_main
from lora_ckpt.errors import AdapterNotFoundError, CorruptAdapterError, MissingDependencyError
from lora_ckpt.serving.store import adapter_path, build_base_model, upload_store
from lora_ckpt.storage import open_store

from .helpers.scale import images, make_tiny_store, vary


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    local = str(tmp_path_factory.mktemp("store") / "store")
    names = make_tiny_store(local)
    remote = f"memory://lora-{uuid.uuid4().hex[:8]}/store"
    assert upload_store(local, remote) == names
    return {"local": local, "memory": remote, "names": names}


def _listing(store):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["list", store, "--json"]) == 0
    return json.loads(out.getvalue())


def test_readers_give_the_same_bits_from_memory_as_from_disk(stores):
    for name in stores["names"]:
        local = read_lora_state(adapter_path(stores["local"], name))
        remote = read_lora_state(adapter_path(stores["memory"], name))
        assert remote.path == adapter_path(stores["memory"], name)
        assert sorted(remote.tensors) == sorted(local.tensors)
        for key, value in local.tensors.items():
            assert remote.tensors[key].tobytes() == value.tobytes(), key
        a = inspect_adapter(adapter_path(stores["local"], name), verify=True)
        b = inspect_adapter(adapter_path(stores["memory"], name), verify=True)
        differ = {k for k in a if a[k] != b[k]}
        # The checkpoint prefix differs (fresh names on an object store), so the
        # config's bytes do; everything a user reads about the adapter does not.
        assert differ == {"path", "config_sha256", "size_bytes"}, differ
        assert abs(a["size_bytes"] - b["size_bytes"]) < 64
    local_list = list_adapters(f"{stores['local']}/adapters")
    remote_list = list_adapters(f"{stores['memory']}/adapters")
    assert [e["name"] for e in remote_list] == [e["name"] for e in local_list] == stores["names"]
    assert [e["name"] for e in _listing(stores["memory"])] == stores["names"]


def test_save_load_and_pool_on_a_memory_store_equal_the_local_ones(stores, tmp_path):
    model, _ = build_base_model(stores["memory"])
    vary(model, 11)
    local_path = str(tmp_path / "task")
    # Its own memory store: the shared one's adapter list stays the fixture's.
    remote_path = f"memory://lora-{uuid.uuid4().hex[:8]}/adapters/task"
    save_lora_state(model, local_path)
    save_lora_state(model, remote_path)
    save_lora_state(model, remote_path, overwrite=True)  # the object-store overwrite
    store, _ = open_store(remote_path)
    config = read_lora_state(remote_path).config
    assert sorted(store.listdir(remote_path)) == sorted(["adapter_config.json", *config.files])

    x = images(4)
    fresh_local, _ = build_base_model(stores["local"])
    fresh_remote, _ = build_base_model(stores["memory"])
    load_lora_state(fresh_local, local_path)
    load_lora_state(fresh_remote, remote_path)
    want = model(x).numpy()
    assert fresh_local(x).numpy().tobytes() == want.tobytes()
    assert fresh_remote(x).numpy().tobytes() == want.tobytes()

    pools = {}
    for kind in ("local", "memory"):
        base, _ = build_base_model(stores[kind])
        pools[kind] = AdapterPool(base, capacity=len(stores["names"]))
        for name in stores["names"]:
            pools[kind].load(name, adapter_path(stores[kind], name))
    for name in stores["names"]:
        np.testing.assert_array_equal(
            pools["memory"].predict(x, adapter=name), pools["local"].predict(x, adapter=name)
        )


def test_missing_and_damaged_adapters_in_memory_are_refused(stores, tmp_path, monkeypatch):
    with pytest.raises(AdapterNotFoundError):
        read_lora_state(adapter_path(stores["memory"], "nope"))
    name = stores["names"][0]
    url = adapter_path(stores["memory"], f"{name}-damaged")
    from lora_ckpt.serving.store import copy_adapter

    copy_adapter(adapter_path(stores["memory"], name), url)
    store, _ = open_store(url)
    data = next(n for n in store.listdir(url) if ".data-" in n)
    store.write(f"{url}/{data}", store.read(f"{url}/{data}", 1 << 24)[:-4])
    # A fresh cache: the copy above cached the undamaged bytes, which (being the
    # bytes the config names) a read would rightly use instead.
    monkeypatch.setenv("LORA_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CorruptAdapterError):
        read_lora_state(url)
    with pytest.raises(CorruptAdapterError, match="bytes"):
        inspect_adapter(url)  # sizes are checked without reading the tensors
    broken = {e["name"]: e for e in list_adapters(f"{stores['memory']}/adapters")}
    assert "error" in broken[f"{name}-damaged"]
    store.remove(url)


def test_a_scheme_without_its_package_names_the_package():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(MissingDependencyError, match="pip install gcsfs"):
        read_lora_state("gs://bucket/adapters/a")


def test_the_service_serves_a_memory_store_like_the_local_one(stores):
    """What `lora-ckpt serve --store memory://...` runs: the app over the store."""
    from lora_ckpt.serving.app import create_app

    from .helpers.asgi import assert_app_answers_like

    base, _ = build_base_model(stores["local"])
    reference = AdapterPool(base, capacity=len(stores["names"]))
    for name in stores["names"]:
        reference.load(name, adapter_path(stores["local"], name))
    app = create_app(stores["memory"], capacity=3)
    assert_app_answers_like(app, reference, stores["names"], images(2, seed=5))
