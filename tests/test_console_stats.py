"""The console's ring of recent requests (plain Python, milliseconds): rates
and percentiles against numpy, buckets that age out, memory bounded
whatever the traffic, and a tenant's view of only its adapters."""

import ast
from pathlib import Path

import numpy as np
import pytest

from lora_ckpt.serving.console_stats import OTHER, RecentRequests, percentile

MODULE = Path(__file__).resolve().parent.parent / "lora_ckpt" / "serving" / "console_stats.py"


def test_it_imports_no_tensorflow_or_numpy():
    tree = ast.parse(MODULE.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imported <= {"math", "random", "threading", "collections"}, imported


@pytest.mark.parametrize("n", [1, 2, 7, 100, 256])
def test_percentiles_are_numpys(n):
    values = list(np.random.default_rng(n).exponential(20.0, n))
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert percentile([], 50) is None


def test_rates_and_latencies_per_adapter_over_the_window():
    recent = RecentRequests(bucket_seconds=5, buckets=60)
    rng = np.random.default_rng(0)
    latencies = {"a": rng.uniform(0.001, 0.050, 120), "b": rng.uniform(0.010, 0.200, 30)}
    ends = {name: 1005 + 59 * np.arange(len(s)) / len(s) for name, s in latencies.items()}
    for name, seconds in latencies.items():
        for i, (latency, end) in enumerate(zip(seconds, ends[name], strict=True)):
            recent.add(name, ok=i % 10 != 0, seconds=float(latency), now=float(end))
    # At 1064 the window is the current bucket (from 1060, 4 s old) and the 11
    # before it: [1005, 1064], 59 s, every request above.
    summary = recent.summary(1064.0, window=60)
    assert summary["window_seconds"] == 60 and summary["bucket_seconds"] == 5
    for name, seconds in latencies.items():
        got = summary["adapters"][name]
        ms = seconds * 1000
        assert got["requests"] == len(seconds) and got["errors"] == len(seconds) // 10
        assert got["rps"] == pytest.approx(len(seconds) / 59.0)
        assert got["p50_ms"] == pytest.approx(np.percentile(ms, 50))
        assert got["p99_ms"] == pytest.approx(np.percentile(ms, 99))
    history = summary["history"]
    assert len(history) == 60 and sum(b["requests"] for b in history) == 150
    assert history[-1]["age_seconds"] == 4 and history[0]["age_seconds"] == 59 * 5 + 4
    for back, bucket in enumerate(reversed(history)):  # each holds the requests that ended in it
        start = 1060 - 5 * back
        want = {n: int(((e >= start) & (e < start + 5)).sum()) for n, e in ends.items()}
        assert bucket["adapters"] == {n: c for n, c in want.items() if c}, start
        assert bucket["rps"] == pytest.approx(sum(want.values()) / (4 if back == 0 else 5))
    assert summary["history"][-2]["p99_ms"] == pytest.approx(
        np.percentile(
            [
                ms
                for n, s in latencies.items()
                for ms, e in zip(s * 1000, ends[n], strict=True)
                if 1055 <= e < 1060
            ],
            99,
        )
    )
    # Past the window: only what ended in the last 11 buckets and this one.
    assert recent.summary(1080.0, window=60)["adapters"]["a"]["requests"] < 120


def test_the_window_moves_on_and_old_buckets_age_out():
    recent = RecentRequests(bucket_seconds=5, buckets=4)
    recent.add("a", True, 0.010, now=100.0)
    assert recent.summary(102.0, window=60)["adapters"]["a"]["requests"] == 1
    later = recent.summary(100.0 + 5 * 4, window=60)  # the history is 4 buckets: gone
    assert later["adapters"] == {} and sum(b["requests"] for b in later["history"]) == 0
    short = recent.summary(111.0, window=5)  # only the current bucket
    assert short["adapters"] == {} and short["window_seconds"] == 5


def test_memory_is_bounded_whatever_the_traffic():
    recent = RecentRequests(bucket_seconds=5, buckets=3, samples=50, max_adapters=4, seed=1)
    rng = np.random.default_rng(1)
    latencies = rng.uniform(0.001, 0.101, 5000)
    for i, latency in enumerate(latencies):
        recent.add("a", True, float(latency), now=i / 1000)  # 5000 requests in one bucket
    for i in range(10):
        recent.add(f"n{i}", True, 0.001, now=4.0)
    cells = recent._ring[-1][1]
    assert len(recent._ring[-1][1]["a"].latencies) == 50 and cells["a"].count == 5000
    assert sorted(cells) == sorted(["a", "n0", "n1", "n2", OTHER]) and cells[OTHER].count == 7
    # The reservoir is a uniform sample: its median is near the true one (100 ms spread).
    got = recent.summary(4.5)["adapters"]["a"]["p50_ms"]
    assert abs(got - np.percentile(latencies * 1000, 50)) < 15
    for step in range(100):  # a long run keeps 3 buckets
        recent.add("a", True, 0.001, now=5.0 * step)
    assert len(recent._ring) == 3


def test_include_gives_a_tenant_its_adapters_only():
    recent = RecentRequests()
    recent.add("mine", True, 0.010, now=1.0)
    recent.add("theirs", True, 0.500, now=1.0)
    summary = recent.summary(2.0, include=lambda name: name == "mine")
    assert list(summary["adapters"]) == ["mine"]
    bucket = summary["history"][-1]
    assert bucket["requests"] == 1 and bucket["p99_ms"] == pytest.approx(10.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RecentRequests(bucket_seconds=0)
    with pytest.raises(ValueError):
        RecentRequests(samples=0)
