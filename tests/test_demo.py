"""The demo's task adapters carry heads of their own tasks' widths (issue 21, item 6)."""

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import AdapterPool
from lora_ckpt.demo import ADAPTER_TASKS, run_demo
from lora_ckpt.serving.store import adapter_path, build_base_model, store_base_weights
from lora_ckpt.synthetic import TASKS


@pytest.mark.slow
def test_each_task_adapter_has_a_head_as_wide_as_its_labels(tmp_path, images):
    store = str(tmp_path / "store")
    lines = []
    rows = run_demo(store, quick=True, log=lines.append)
    assert [row["task"] for row in rows] == list(ADAPTER_TASKS)
    assert all(row["classes"] == TASKS[row["task"]] for row in rows)

    model, _ = build_base_model(store)
    pool = AdapterPool(model, capacity=len(ADAPTER_TASKS), max_classes=4)
    for task in ADAPTER_TASKS:
        path = adapter_path(store, task)
        summary = lora_ckpt.inspect_adapter(path)
        labels = summary["metadata"]["labels"]
        assert len(labels) == TASKS[task] == summary["metadata"]["classes"] == 3
        heads = {k: v for k, v in summary["variables"].items() if v["kind"] == "extra"}
        assert heads, f"{task}: no head saved"
        assert {v["shape"][-1] for v in heads.values()} == {len(labels)}
        state = lora_ckpt.read_lora_state(path)
        pool.load_state(task, state)
        assert pool.classes(task) == len(labels)
        served = pool.predict(images, adapter=task)
        assert served.shape == (len(images), len(labels))
        rebuilt = lora_ckpt.from_adapter(path, base_weights=store_base_weights(store))
        np.testing.assert_allclose(rebuilt(images).numpy(), served, rtol=1e-5, atol=1e-5)
    mixed = pool.predict(images[:3], adapters=list(ADAPTER_TASKS))
    assert mixed.shape == (3, 3)  # the widest adapter present, not the base's 4
    assert np.isfinite(mixed).all()
