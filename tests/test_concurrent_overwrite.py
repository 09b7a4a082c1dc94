"""Readers never fail while another process overwrites the adapter in a loop:
each read is one complete version, old or new (issue: readers failing during
an overwrite, 5 of 12,535 before). Slow lane: a writer subprocess, bounded."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt.errors import AdapterNotFoundError

from .helpers.save_loop import build_model

pytestmark = pytest.mark.slow

HELPER = os.path.join(os.path.dirname(__file__), "helpers", "save_loop.py")
READS = 20_000
POOL_LOADS = 1_000


@pytest.fixture
def writer(tmp_path):
    """``save_loop.py`` overwriting ``tmp_path/adapter`` until stopped; yields the path."""
    path = str(tmp_path / "adapter")
    proc = subprocess.Popen(
        [sys.executable, HELPER, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    watchdog = threading.Timer(600, proc.kill)  # a hung writer fails the test, not CI
    watchdog.start()
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "1"  # one committed version to start from
        yield path, proc
    finally:
        proc.kill()
        proc.wait(timeout=60)
        watchdog.cancel()


def _version(state) -> int:
    version = state.config.metadata["version"]
    for key, value in state.tensors.items():
        assert np.all(value == float(version)), f"{key} mixes versions"
    return version


def test_twenty_thousand_reads_during_overwrites_all_succeed(writer):
    path, proc = writer
    errors, seen, last = [], set(), 0
    for _ in range(READS):
        try:
            version = _version(lora_ckpt.read_lora_state(path))
        except (lora_ckpt.LoRAError, AdapterNotFoundError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        assert version >= last, "a reader went back to an older version"
        last = version
        seen.add(version)
    assert proc.poll() is None, "the writer stopped"
    assert errors == [], errors[:5]
    assert len(seen) > 10, "the writer did not overwrite during the reads"


def test_pool_loads_during_overwrites_all_succeed(writer):
    path, proc = writer
    # The writer's base is its own random model: only the adapter matters here.
    pool = lora_ckpt.AdapterPool(build_model(), capacity=2, check_base=False)
    errors, seen = [], set()
    for i in range(POOL_LOADS):
        try:
            pool.load(f"a{i % 2}", path)
            seen.add(pool.metadata(f"a{i % 2}")["version"])
        except lora_ckpt.LoRAError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    assert proc.poll() is None, "the writer stopped"
    assert errors == [], errors[:5]
    assert len(seen) > 5, "the writer did not overwrite during the loads"
