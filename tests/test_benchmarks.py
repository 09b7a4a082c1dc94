"""Each benchmark runs on a tiny setting (slow lane); size figures are checked
against hand computations, and every ratio against the times it is made of
(timings themselves are not checked: these machines are noisy)."""

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.slow

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
    # Each printed ratio is the quotient of the two times it names.
    for rank in ("2", "4"):
        r = result["ranks"][rank]
        assert r["load_vs_switch"] == pytest.approx(r["load_lora_state_s"] / r["switch_s"])
        assert r["pool_load_vs_numpy"] == pytest.approx(
            r["pool_load_s"] / r["numpy_grouped_assign_s"]
        )
    first = result["ranks"]["2"]
    assert first["unmerged_vs_base"] == pytest.approx(
        first["unmerged_forward_s"] / first["base_forward_s"]
    )
    assert first["mixed_throughput_vs_single_adapter"] == pytest.approx(
        first["unmerged_forward_s"] / first["mixed_batch_s"]
    )
    assert first["mixed_speedup_vs_one_by_one"] == pytest.approx(
        first["one_by_one_with_swaps_s"] / first["mixed_batch_s"]
    )
    # A resident adapter costs the same slot bytes whatever the capacity.
    sweep = result["capacity_sweep"]["capacities"]
    assert len({entry["slot_bytes_per_adapter"] for entry in sweep.values()}) == 1


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
    storage = main["storage"]
    assert set(storage["ranks"]) == {"2", "4"}
    for row in storage["ranks"].values():
        assert row["vs_h5"] == pytest.approx(row["adapter_bytes"] / storage["full_h5_bytes"])
    # The tiny ConvNeXt (dims 8 and 16, one block each) holds 10 * d * r LoRA
    # numbers per block: rank 4 adds 2 * 240 float32 to rank 2; the config and
    # the checkpoint index differ by a few bytes only.
    extra = storage["ranks"]["4"]["adapter_bytes"] - storage["ranks"]["2"]["adapter_bytes"]
    assert 4 * 2 * 240 <= extra < 4 * 2 * 240 + 256, extra
