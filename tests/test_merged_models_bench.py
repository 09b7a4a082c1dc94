"""benchmarks/merged_models_bench.py runs on a tiny setting (slow lane); each
ratio it prints is the quotient of the figures it names (timings themselves
are not checked: these machines are noisy)."""

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.slow

BENCHMARK = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "benchmarks", "merged_models_bench.py"
)


def test_merged_models_benchmark_runs_on_a_tiny_setting(tmp_path):
    spec = importlib.util.spec_from_file_location("merged_models_bench", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "merged.json"
    result = module.main(["--tiny", "--counts", "2,3", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["n"].keys() == {"2", "3"}
    for n in (2, 3):
        r = result["n"][n]
        assert r["merged_vs_pool_memory"] == pytest.approx(
            r["merged_rss_bytes"] / r["pool_rss_bytes"]
        )
        times = r["times_s"]
        for kind in ("b1", "b8", "mixed8"):
            assert r[f"pool_vs_merged_{kind}_throughput"] == pytest.approx(
                times[f"merged_{kind}"] / times[f"pool_{kind}"]
            )
    pytest.importorskip("matplotlib")
    assert (tmp_path / "merged.png").stat().st_size > 0
