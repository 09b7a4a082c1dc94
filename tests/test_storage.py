"""The storage layer on its own (plain Python, no TensorFlow): bounded reads of
regular files only, the local and object-store commits, the verified cache,
the one place a scheme is looked at."""

import hashlib
import os
import uuid

import pytest

from lora_ckpt.errors import MissingDependencyError
from lora_ckpt.storage import FsspecStore, LocalStore, UnsafeFileError, VerifiedCache, open_store


def test_open_store_is_where_schemes_are_told_apart(tmp_path):
    assert isinstance(open_store(str(tmp_path))[0], LocalStore)
    store, path = open_store(f"file://{tmp_path}/")
    assert isinstance(store, LocalStore) and path == str(tmp_path)
    store, path = open_store("memory://bucket/a/")
    assert isinstance(store, VerifiedCache) and path == "memory://bucket/a"
    with pytest.raises(MissingDependencyError, match="pip install adlfs"):
        open_store("az://container/a") if not _installed("adlfs") else pytest.skip("adlfs")


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_local_reads_are_bounded_and_regular_files_only(tmp_path):
    store = LocalStore()
    (tmp_path / "f").write_bytes(b"0123456789")
    assert store.read(str(tmp_path / "f"), 10) == b"0123456789"
    with pytest.raises(UnsafeFileError, match="more than the 9"):
        store.read(str(tmp_path / "f"), 9)
    os.symlink(tmp_path / "f", tmp_path / "link")
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        store.read(str(tmp_path / "link"), 100)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafeFileError):
        store.read(str(tmp_path / "fifo"), 100)  # refused, never waited on
    with pytest.raises(FileNotFoundError):
        store.read(str(tmp_path / "missing"), 100)
    os.symlink(tmp_path, tmp_path / "dirlink")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        store.listdir(str(tmp_path / "dirlink"))
    listed = store.listdir(str(tmp_path))
    assert listed["f"].kind == "file" and listed["f"].size == 10
    assert listed["link"].kind == "other" and listed["fifo"].kind == "other"


@pytest.mark.parametrize("url", ["local", "memory"])
def test_a_commit_replaces_the_directory_whole(url, tmp_path):
    path = str(tmp_path / "d") if url == "local" else f"memory://commit-{uuid.uuid4().hex}/d"
    store, path = open_store(path)
    first = store.atomic_directory(path, "marker")
    assert first.begin() == {}
    first.write(first.fresh_name("data"), b"one")
    first.finalize(b"1")
    second = store.atomic_directory(path, "marker")
    assert sorted(second.begin()) == sorted(["marker", first.fresh_name("data")])
    name = second.fresh_name("data")
    second.write(name, b"two")
    assert store.read(store.join(path, "marker"), 10) == b"1"  # not yet committed
    second.finalize(b"2")
    assert sorted(store.listdir(path)) == sorted(["marker", name])
    assert store.read(store.join(path, name), 10) == b"two"
    aborted = store.atomic_directory(path, "marker")
    aborted.begin()
    aborted.write(aborted.fresh_name("data"), b"three")
    aborted.abort()
    assert sorted(store.listdir(path)) == sorted(["marker", name])  # untouched


def test_the_cache_keeps_verified_bytes_and_refuses_what_is_not_a_digest(tmp_path):
    remote = FsspecStore("memory")
    cache = VerifiedCache(remote, root=str(tmp_path / "cache"))
    url = f"memory://cache-{uuid.uuid4().hex}/blob"
    remote.write(url, b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    assert cache.read_verified(url, 7, digest) == b"payload"
    assert (tmp_path / "cache" / "blobs" / digest).read_bytes() == b"payload"
    remote.remove(url)
    assert cache.read_verified(url, 7, digest) == b"payload"  # from the cache now
    with pytest.raises(UnsafeFileError, match="not a SHA-256"):
        cache.read_verified(url, 7, "../../" + digest[:58])
    (tmp_path / "cache" / "blobs" / digest).write_bytes(b"changed")  # same size, other bytes
    with pytest.raises(FileNotFoundError):
        cache.read_verified(url, 7, digest)  # refused from disk, fetched again: gone


def test_a_config_whose_file_digest_is_not_hex_is_refused():
    import json

    from lora_ckpt.errors import CorruptAdapterError
    from lora_ckpt.state.format import AdapterConfig

    fixture = os.path.join(
        os.path.dirname(__file__), "regression", "0.1.0", "v1_convnext_lora_head_labels"
    )
    with open(os.path.join(fixture, "adapter", "adapter_config.json")) as handle:
        document = json.load(handle)
    name = next(iter(document["checkpoint"]["files"]))
    document["checkpoint"]["files"][name]["sha256"] = "../../etc/passwd"
    with pytest.raises(CorruptAdapterError, match="hex"):
        AdapterConfig.from_json(json.dumps(document), "x")
