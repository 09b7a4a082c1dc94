"""A save that fails or dies at any step never leaves an adapter that loads wrong.

Fault injection (fast): every storage step of a save, as the local and the
in-memory (object-store-like) backends of lora_ckpt.storage perform it, is
made to fail in turn: the k-th call
raises, for every k up to the number of calls a save makes. Two ways to fail:

- ``crash``: the process dies at that step; no later step runs (the error
  handler's clean-up included), so the disk stays as the crash left it;
- ``io_error``: that one call raises OSError; the save's own clean-up runs.

After each failure a reader sees the complete old adapter (none before a
first save) up to the commit step and the complete new one from it on, never
a mix and never nothing where there was an adapter; work directories are
never listed as adapters; the model's variables are untouched; a retried save
succeeds and leaves no leftovers.

Two real SIGKILLs of a process in a save loop (slow lane) check the same
from outside.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt.errors import AdapterNotFoundError
from lora_ckpt.state import atomic
from lora_ckpt.storage import FsspecStore, open_store
from lora_ckpt.storage import local as local_backend

from .helpers.save_loop import build_model, fill_version

HELPER = os.path.join(os.path.dirname(__file__), "helpers", "save_loop.py")
OLD, NEW = 1, 2
CONFIG = "adapter_config.json"
ADAPTER_KEYS = [f"fc{i}/kernel_lora_{ab}" for i in (0, 1) for ab in "ab"]


class InjectedFault(OSError):
    """The failure a test injects at one step of a save."""


class Faults:
    """Wraps the storage calls a save makes; records them, and makes the call
    number ``fail_at`` (0-based) raise. With ``crash``, every later call
    raises too: the process is dead and the store stays as it was."""

    def __init__(self, fail_at=None, crash=True):
        self.fail_at, self.crash = fail_at, crash
        self.calls = []
        self.failed = False
        self.inside = False

    def _wrap(self, name, real, method=False):
        def step(*args, **kwargs):
            if self.inside:  # a call os.makedirs makes: part of that one step
                return real(*args, **kwargs)
            recorded = args[1:2] if method else args  # an object-store method: its path
            self.calls.append((name, recorded))
            if len(self.calls) - 1 == self.fail_at or (self.failed and self.crash):
                self.failed = True
                raise InjectedFault(f"injected at {name}{recorded}")
            self.inside = name == "os.makedirs"
            try:
                return real(*args, **kwargs)
            finally:
                self.inside = False

        return step

    def _wrap_open(self, real):
        wrapped = self._wrap("open(w)", real)

        def open_file(path, mode="r", *args, **kwargs):
            # Only writes are steps of a save; reads are not.
            opener = wrapped if any(m in mode for m in "wxa") else real
            return opener(path, mode, *args, **kwargs)

        return open_file

    def install(self, patch):
        os_ = local_backend.os
        for name in ("rename", "replace", "fsync", "mkdir", "makedirs", "unlink"):
            patch.setattr(os_, name, self._wrap(f"os.{name}", getattr(os_, name)))
        shutil_ = local_backend.shutil
        patch.setattr(shutil_, "rmtree", self._wrap("shutil.rmtree", shutil_.rmtree))
        patch.setattr(local_backend, "open", self._wrap_open(open), raising=False)
        for name in ("write", "remove", "remove_file"):
            real = getattr(FsspecStore, name)
            patch.setattr(FsspecStore, name, self._wrap(f"store.{name}", real, method=True))


def adapter_path(storage, tmp_path):
    """A fresh path per save: nothing of an earlier iteration can be read back."""
    if storage == "local":
        return str(tmp_path / uuid.uuid4().hex[:8] / "adapter")
    return f"memory://crash-{uuid.uuid4().hex[:8]}/adapter"


def read_version(path):
    """The version of the adapter at ``path``, or None if there is none.

    A reader must see one complete version: every tensor holds that version's
    number. A corrupt adapter (a mix the checks caught) fails the test."""
    try:
        state = lora_ckpt.read_lora_state(path)
    except AdapterNotFoundError:
        return None
    version = state.config.metadata["version"]
    assert sorted(state.tensors) == ADAPTER_KEYS
    for key, value in state.tensors.items():
        assert np.all(value == float(version)), f"{key} mixes versions"
    return version


def save(model, path, version):
    fill_version(model, version)
    lora_ckpt.save_lora_state(model, path, overwrite=True, metadata={"version": version})


def commit_step(calls, path, storage):
    """The index of the step that commits the new adapter: on local disk the
    rename of the temporary directory onto the path; file by file (memory://,
    object stores) the write of the new adapter_config.json."""
    if storage == "local":
        commits = [i for i, (n, args) in enumerate(calls) if n == "os.rename" and args[1] == path]
    else:
        commits = [
            i
            for i, (n, args) in enumerate(calls)
            if n == "store.write" and args[0] == f"{path}/{CONFIG}"
        ]
    assert len(commits) == 1, calls
    return commits[0]


def listed(parent):
    """Names list_adapters gives for a directory of adapters."""
    return [entry["name"] for entry in lora_ckpt.list_adapters(parent)]


@pytest.mark.parametrize("mode", ["crash", "io_error"])
@pytest.mark.parametrize("kind", ["first_save", "overwrite"])
@pytest.mark.parametrize("storage", ["local", "memory"])
def test_failure_at_every_step_leaves_old_or_new_adapter(
    storage, kind, mode, tmp_path, monkeypatch
):
    overwrite = kind == "overwrite"
    before_commit = OLD if overwrite else None
    model = build_model(width=8, rank=2)

    def prepare():
        path = adapter_path(storage, tmp_path)
        if overwrite:
            save(model, path, OLD)
        return path

    # A clean save, recorded: the steps to fail one by one.
    path = prepare()
    recorder = Faults()
    with monkeypatch.context() as patch:
        recorder.install(patch)
        save(model, path, NEW)
    assert read_version(path) == NEW
    steps = recorder.calls
    commit = commit_step(steps, path, storage)

    outcomes = []
    for k, (name, _) in enumerate(steps):
        path = prepare()
        parent = path.rsplit("/", 1)[0]
        fill_version(model, NEW)
        before = [v.numpy().copy() for v in model.weights]
        faults = Faults(fail_at=k, crash=mode == "crash")
        # Removing leftovers after the commit may fail without failing the save
        # (a warning says `lora-ckpt gc` will); every other failure raises.
        cleanup = k > commit and name in (
            "shutil.rmtree",
            "os.unlink",
            "store.remove",
            "store.remove_file",
        )
        expectation = (
            pytest.warns(UserWarning, match="gc") if cleanup else pytest.raises(InjectedFault)
        )
        with monkeypatch.context() as patch, expectation:
            faults.install(patch)
            lora_ckpt.save_lora_state(model, path, overwrite=True, metadata={"version": NEW})
        for var, value in zip(model.weights, before, strict=True):
            np.testing.assert_array_equal(var.numpy(), value, err_msg=var.name)
        # The same steps as the clean save, up to the failing one.
        assert [n for n, _ in faults.calls[: k + 1]] == [n for n, _ in steps[: k + 1]]

        version = read_version(path)
        outcomes.append((name, version))
        # Up to the commit the old adapter (or none, on a first save); from
        # the commit on the new one, even where a later step (fsync, clean-up)
        # failed and the save raised.
        expected = before_commit if k <= commit else NEW
        assert version == expected, (k, name, mode, outcomes)
        # Work directories and stray files are never listed as adapters.
        assert listed(parent) == ([] if version is None else ["adapter"]), (k, name)

        # A retried save repairs whatever the failure left, leftovers included.
        save(model, path, NEW)
        assert read_version(path) == NEW
        store, _ = open_store(path)
        assert sorted(store.listdir(parent)) == ["adapter"]
        assert len(store.listdir(path)) == 3, store.listdir(path)

    if overwrite:  # no step leaves the path without an adapter once it had one
        assert None not in [version for _, version in outcomes], outcomes


# --- two real kills --------------------------------------------------------


def kill_during_saves(path, seed, after_versions):
    """Starts the save loop, waits until ``after_versions`` saves returned,
    kills it with SIGKILL at a random moment after that and returns the last
    version whose save had returned (0: killed before any returned)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, HELPER, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(300, proc.kill)  # a hung helper fails the test, not CI
    watchdog.start()
    lines = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        while len(lines) < after_versions:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = proc.communicate(timeout=60)[0]
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, "the save loop ended before it was killed"
    versions = [int(line) for line in "".join(lines).split() + rest.split() if line.isdigit()]
    assert versions == list(range(1, len(versions) + 1))
    return versions[-1] if versions else 0


@pytest.mark.slow
@pytest.mark.parametrize("after_versions", [0, 3], ids=["any_moment", "after_3_saves"])
def test_killed_save_leaves_previous_or_next_version(tmp_path, after_versions):
    path = str(tmp_path / "adapter")  # a fresh path per kill
    last_done = kill_during_saves(path, seed=after_versions, after_versions=after_versions)
    version = read_version(path)
    if last_done == 0:
        # Killed before any save returned: nothing, or the first save, which
        # may have committed before its number was printed.
        assert version in (None, 1), version
    else:
        # The save in flight may have committed before its number was printed.
        assert version in (last_done, last_done + 1), (version, last_done)
    model = build_model()
    save(model, path, 1000)  # the next save replaces whatever the kill left
    assert read_version(path) == 1000


def test_leftover_symlinks_are_unlinked_never_followed(tmp_path):
    """A NAME.tmp-*/NAME.old-* symlink to another adapter: the next save and gc
    remove the link, and the adapter it points to stays whole."""
    model = build_model(width=8, rank=2)
    save(model, str(tmp_path / "kept"), OLD)
    save(model, str(tmp_path / "other"), OLD)
    for leftover in ("other.old-1234abcd", "other.tmp-5678abcd", "ghost.tmp-9999abcd"):
        os.symlink(tmp_path / "kept", tmp_path / leftover)
    save(model, str(tmp_path / "other"), NEW)
    assert atomic.collect_garbage(str(tmp_path)) == [str(tmp_path / "ghost.tmp-9999abcd")]
    assert sorted(os.listdir(tmp_path)) == ["kept", "other"]
    assert read_version(str(tmp_path / "kept")) == OLD
    assert read_version(str(tmp_path / "other")) == NEW
