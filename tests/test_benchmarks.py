"""Each benchmark runs; size figures (not timings) are checked where cheap."""

import importlib.util
import json
import os

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapter_size_benchmark_convnext_tiny_rank4(tmp_path):
    out = tmp_path / "adapter_size.json"
    result = load_benchmark("adapter_size").main(["--out", str(out)])
    assert json.loads(out.read_text()) == result
    # LoRA A/B of convnext_tiny at rank 4: 10 * d * r per block, by hand.
    assert result["trainable_params"] == sum(
        n * 10 * d * 4 for n, d in zip((3, 3, 9, 3), (96, 192, 384, 768), strict=True)
    )
    assert result["adapter_vs_h5"] < 0.015
    assert result["adapter_vs_tf_checkpoint"] < 0.015


def test_pool_benchmark_runs_on_a_tiny_setting(tmp_path):
    out = tmp_path / "pool.json"
    result = load_benchmark("pool_bench").main(
        ["--tiny", "--ranks", "2,4", "--repeat", "2", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    assert set(result["ranks"]) == {"2", "4"}
    first = result["ranks"]["2"]
    for key in (
        "switch_s",
        "pool_load_vs_numpy",
        "unmerged_vs_base",
        "merged_vs_base",
        "mixed_throughput_vs_single_adapter",
        "mixed_speedup_vs_one_by_one",
    ):
        assert first[key] > 0, key


def test_full_benchmark_runs_on_a_tiny_setting(tmp_path):
    result = load_benchmark("run").main(["--tiny", "--repeat", "2", "--out", str(tmp_path)])
    assert (
        json.loads((tmp_path / "run.json").read_text())["models"].keys() == result["models"].keys()
    )
    table = (tmp_path / "table.md").read_text()
    for figure in (
        "(a) tfimm way",
        "(c) `load_lora_state`",
        "(e) switch",
        "merge / unmerge",
        "resident rank-4",
    ):
        assert figure in table
    main = result["models"]["convnext_tiny"]
    assert main["forward"]["max_abs_error_after_1000_cycles"] == 0.0
    assert set(main["storage"]["ranks"]) == {"2", "4"}
