"""AdapterPool for multi-task traffic: per-task heads of any width, full layers
per slot, grouped mixed batches, slot bookkeeping that never leaks, NaN
adapters, mixed precision, scoped routing, threads."""

import random
import threading

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import AdapterPool, tf
from lora_ckpt.errors import (
    AdapterMismatchError,
    AdapterNotLoadedError,
    CorruptAdapterError,
    MergeStateError,
    PoolFullError,
)
from lora_ckpt.selection import select_state
from lora_ckpt.state import ModelSignature

TINY = dict(
    embed_dim=(8, 16), nb_blocks=(1, 1), input_size=(32, 32), init_scale=1.0, drop_path_rate=0.0
)
CLASSES = (3, 5, 10)


def task_model(classes, rank, base_file, seed):
    """A LoRA ConvNeXt with a head of ``classes`` trained in full, on the shared base."""
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=rank, nb_classes=classes, **TINY)
    base = lora_ckpt.create_model("convnext_tiny", lora_rank=rank, nb_classes=5, **TINY)
    lora_ckpt.load_base_weights(base, base_file)
    base_vars = ModelSignature.of(base).variables
    for key, var in ModelSignature.of(model).variables.items():
        if not key.startswith("fc/") and "lora" not in key:
            var.assign(base_vars[key])
    rng = np.random.default_rng(seed)
    for _, layer in lora_ckpt.lora_layers(model):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
    for var in (model.fc.kernel, model.fc.bias):
        var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
    return model


def serving_model(base_file, rank=4):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=rank, nb_classes=5, **TINY)
    lora_ckpt.load_base_weights(model, base_file)
    return model


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Three adapters with full heads of 3, 5 and 10 classes and ranks 2, 3, 4
    on one base, with their own models' outputs as references."""
    directory = tmp_path_factory.mktemp("tasks")
    tf.keras.utils.set_random_seed(7)
    base_file = str(directory / "base.h5")
    tfimm.create_model("convnext_tiny", nb_classes=5, **TINY).save_weights(base_file)
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype("float32")
    paths, reference = {}, {}
    for i, classes in enumerate(CLASSES):
        model = task_model(classes, rank=2 + i, base_file=base_file, seed=i)
        name = f"head{classes}"
        paths[name] = lora_ckpt.save_lora_state(model, str(directory / name))
        reference[name] = model(x).numpy()
    return {"base": base_file, "paths": paths, "reference": reference, "x": x, "dir": directory}


@pytest.fixture(scope="module")
def task_pool(tasks):
    # One spare slot: reloading an adapter never evicts another one here.
    pool = AdapterPool(serving_model(tasks["base"]), capacity=4, max_classes=10)
    for name, path in tasks["paths"].items():
        pool.load(name, path)
    return pool


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_heads_of_3_5_10_classes_per_request(tasks, task_pool):
    x = tasks["x"]
    for name, expected in tasks["reference"].items():
        out = task_pool.predict(x, adapter=name)
        assert out.shape == expected.shape
        assert_close(out, expected)
        assert task_pool.classes(name) == expected.shape[1]
        assert_close(task_pool.predict(x[:1], adapter=name), expected[:1])  # batch-1 graph


def test_mixed_batch_rows_equal_each_adapters_own_model_padded_with_minus_inf(tasks, task_pool):
    x, reference = tasks["x"], tasks["reference"]
    names = ["head3", "head10", "head5", "head10", "head3", "head5"]
    out = task_pool.predict(x, adapters=names)
    assert out.shape == (6, 10)
    for row, name in enumerate(names):
        classes = reference[name].shape[1]
        assert_close(out[row, :classes], reference[name][row])
        assert np.all(out[row, classes:] == -np.inf)
        assert out[row].argmax() == reference[name][row].argmax()
    narrow = task_pool.predict(x[:2], adapters=["head3", "head5"])
    assert narrow.shape == (2, 5)  # the widest adapter present, not max_classes


def test_base_rows_in_a_mixed_batch_use_the_base_head(tasks, task_pool):
    base = serving_model(tasks["base"])
    out = task_pool.predict(tasks["x"][:2], adapters=["off", "head10"])
    assert_close(out[0, :5], base(tasks["x"][:1]).numpy()[0])
    assert np.all(out[0, 5:] == -np.inf)


def test_no_retrace_across_loads_switches_and_mixes(tasks, task_pool):
    traces = task_pool.trace_count
    x = tasks["x"]
    for names in (["head3"] * 6, ["head10", "off"] * 3, ["head5", "head3", "head10"] * 2):
        task_pool.predict(x, adapters=names)
    task_pool.load("head3", tasks["paths"]["head3"])  # reload: a new slot
    task_pool.predict(x[:1], adapter="head3")
    assert task_pool.trace_count == traces == 3


@pytest.mark.slow
def test_a_head_wider_than_max_classes_is_refused(tasks):
    pool = AdapterPool(serving_model(tasks["base"]), capacity=2, max_classes=5)
    with pytest.raises(AdapterMismatchError, match="max_classes=5"):
        pool.load("head10", tasks["paths"]["head10"])
    pool.load("head3", tasks["paths"]["head3"])
    assert pool.names() == ["head3"]
    with pytest.raises(lora_ckpt.LoRAError, match="max_classes"):
        AdapterPool(serving_model(tasks["base"]), capacity=2, max_classes=4)


@pytest.mark.slow
def test_merged_mode_serves_the_adapters_head(tasks, task_pool):
    x = tasks["x"]
    task_pool.merge("head10")
    try:
        assert_close(task_pool.predict(x, adapter="head10"), tasks["reference"]["head10"])
        with pytest.raises(MergeStateError):
            task_pool.predict(x, adapter="head3")
    finally:
        task_pool.unmerge()
    assert_close(task_pool.predict(x, adapter="head3"), tasks["reference"]["head3"])


def _slot_states(pool):
    return [info["state"] for info in pool._table.snapshot()["slots"].values()]


def test_merge_reload_cycles_never_lose_a_slot(tasks):
    """The old pool served stale merged weights on reload and leaked the slot:
    three cycles left a 3-slot pool dead."""
    pool = AdapterPool(serving_model(tasks["base"]), capacity=3, max_classes=10)
    x, paths, reference = tasks["x"], tasks["paths"], tasks["reference"]
    for cycle in range(4):
        pool.load("a", paths["head3"])
        pool.merge("a")
        with pytest.raises(MergeStateError, match="unmerge"):
            pool.load("a", paths["head10"])
        assert_close(pool.predict(x, adapter="a"), reference["head3"])
        pool.unmerge()
        pool.load("a", paths["head10"])  # now the new weights serve
        assert_close(pool.predict(x, adapter="a"), reference["head10"])
        pool._table.check_invariants()
        assert _slot_states(pool).count("live") == 1, cycle
    for name in ("b", "c"):
        pool.load(name, paths["head5"])
    assert pool.names() == ["a", "b", "c"]
    assert sorted(_slot_states(pool)) == ["live"] * 3


@pytest.mark.slow
def test_eviction_of_the_active_adapter_resets_active(tasks):
    pool = AdapterPool(serving_model(tasks["base"]), capacity=1, max_classes=10)
    pool.load("first", tasks["paths"]["head3"])
    pool.activate("first")
    pool.load("second", tasks["paths"]["head5"])  # evicts "first"
    assert pool.names() == ["second"] and pool.active == "off"
    base = serving_model(tasks["base"])
    assert_close(pool.predict(tasks["x"]), base(tasks["x"]).numpy())


def _write_nan_adapter(tasks, name):
    model = task_model(5, rank=2, base_file=tasks["base"], seed=9)
    layer = lora_ckpt.lora_layers(model)[0][1]
    values = layer.kernel_lora_b.numpy()
    values[0, 0] = np.nan
    layer.kernel_lora_b.assign(values)
    return lora_ckpt.save_lora_state(model, str(tasks["dir"] / name), overwrite=True)


def test_a_nan_adapter_is_refused_and_good_adapters_keep_serving(tasks, task_pool):
    path = _write_nan_adapter(tasks, "nan_adapter")
    resident = task_pool.names()
    with pytest.raises(CorruptAdapterError, match="NaN"):
        task_pool.load("nan", path)
    with pytest.raises(CorruptAdapterError, match="NaN"):
        lora_ckpt.load_lora_state(serving_model(tasks["base"], rank=2), path, strict=False)
    assert task_pool.names() == resident
    out = task_pool.predict(tasks["x"], adapters=["head3", "head5"] * 3)
    assert np.isfinite(out[:, :3]).all()
    task_pool._table.check_invariants()


@pytest.mark.slow
def test_unloaded_slots_are_cleared(tasks):
    pool = AdapterPool(serving_model(tasks["base"]), capacity=2, max_classes=10)
    slot = pool.load("a", tasks["paths"]["head10"])
    lora = next(iter(pool._lora.values()))
    head = pool._full["fc"]
    assert np.abs(lora.b[slot].numpy()).sum() > 0
    pool.unload("a")
    assert np.all(lora.a[slot].numpy() == 0) and np.all(lora.b[slot].numpy() == 0)
    assert np.array_equal(head.slots["kernel"][slot].numpy(), head.slots["kernel"][0].numpy())
    assert _slot_states(pool) == ["free", "free"]


@pytest.mark.slow
def test_pool_under_mixed_float16(tasks):
    reference = tasks["reference"]["head5"]
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = serving_model(tasks["base"])
        pool = AdapterPool(model, capacity=2, max_classes=10)
        pool.load("head5", tasks["paths"]["head5"])
        pool.load("head10", tasks["paths"]["head10"])
        single = pool.predict(tasks["x"], adapter="head5")
        mixed = pool.predict(tasks["x"][:2], adapters=["head5", "head10"])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert single.dtype == model.compute_dtype == "float16"
    scale = np.abs(reference).max()
    np.testing.assert_allclose(single, reference, atol=5e-3 * scale)
    np.testing.assert_allclose(mixed[0, :5], reference[0], atol=5e-3 * scale)


def conv_net(rank):
    """A functional model with Conv2D LoRA (3x3 stride 2, 1x1), a BatchNorm and
    a Dense head trained in full. Seeded initialisers: one base for every rank."""
    init = lambda i: tf.keras.initializers.GlorotUniform(seed=i)  # noqa: E731
    inputs = tf.keras.Input((12, 12, 3))
    h = tf.keras.layers.Conv2D(
        6, 3, strides=2, padding="same", name="conv_a", kernel_initializer=init(1)
    )(inputs)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    h = tf.keras.layers.Conv2D(8, 1, name="conv_b", kernel_initializer=init(2))(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    outputs = tf.keras.layers.Dense(3, name="fc", kernel_initializer=init(3))(h)
    return lora_ckpt.convert_to_lora_model(
        tf.keras.Model(inputs, outputs),
        target_layers=["conv_*"],
        lora_rank=rank,
        lora_train_bias="lora_only",
        lora_trainable_layers=["bn", "fc"],
    )


@pytest.fixture(scope="module")
def conv_adapters(tmp_path_factory):
    directory = tmp_path_factory.mktemp("conv")
    x = np.random.default_rng(0).normal(size=(5, 12, 12, 3)).astype("float32")
    paths, reference = {}, {}
    for i in range(4):
        model = conv_net(rank=1 + i % 2)
        rng = np.random.default_rng(i)
        saved = select_state(model).variables.values()
        for var in saved:
            value = rng.normal(0, 0.3, var.shape)
            if "variance" in var.name:
                value = np.abs(value) + 0.5
            var.assign(value.astype("float32"))
        paths[f"c{i}"] = lora_ckpt.save_lora_state(model, str(directory / f"c{i}"))
        reference[f"c{i}"] = model(x).numpy()
    return {"paths": paths, "reference": reference, "x": x}


def test_conv_layers_and_batchnorm_per_slot_in_mixed_batches(conv_adapters):
    pool = AdapterPool(conv_net(rank=2), capacity=3)
    assert sorted(pool._full) == ["bn", "fc"]
    for name in ("c0", "c1", "c2"):
        pool.load(name, conv_adapters["paths"][name])
    names = ["c0", "c2", "c1", "c2", "c0"]
    out = pool.predict(conv_adapters["x"], adapters=names)
    for row, name in enumerate(names):
        assert_close(out[row], conv_adapters["reference"][name][row])


@pytest.mark.slow
def test_routing_of_one_pool_does_not_reach_another_models_layers(conv_adapters):
    model_a, model_b = conv_net(rank=2), conv_net(rank=2)
    pool_a = AdapterPool(model_a, capacity=1)
    pool_a.load("c0", conv_adapters["paths"]["c0"])
    plain_b = model_b(conv_adapters["x"]).numpy()
    with pool_a._graphs.routing.route(tf.constant(1)):
        assert np.array_equal(model_b(conv_adapters["x"]).numpy(), plain_b)
        routed_a = model_a(conv_adapters["x"]).numpy()
    assert_close(routed_a, conv_adapters["reference"]["c0"])


@pytest.mark.slow
def test_threads_with_loads_unloads_and_merges_never_lose_a_slot(conv_adapters):
    """8 threads x 200 operations at capacity 3: requests (single and mixed),
    loads, unloads, merges. Every answer matches its adapter; no slot is lost."""
    pool = AdapterPool(conv_net(rank=2), capacity=3, load_timeout=5.0)
    x, paths, reference = conv_adapters["x"], conv_adapters["paths"], conv_adapters["reference"]
    names = sorted(paths)
    for name in names[:3]:
        pool.load(name, paths[name])
    errors, served = [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(200):
            op = rng.random()
            try:
                if op < 0.15:
                    name = rng.choice(names)
                    pool.load(name, paths[name])
                elif op < 0.2:
                    pool.unload(rng.choice(names))
                elif op < 0.23:
                    pool.merge(rng.choice(names))
                    pool.unmerge()
                else:
                    # Mostly what is resident now: it may still go before the request runs.
                    resident = pool.names() + ["off"]
                    chosen = [rng.choice(resident) for _ in range(len(x))]
                    if op < 0.6:
                        chosen = [chosen[0]] * len(x)
                    out = pool.predict(x, adapters=chosen)
                    for row, name in enumerate(chosen):
                        if name != "off" and not np.allclose(
                            out[row], reference[name][row], rtol=1e-5, atol=1e-5
                        ):
                            errors.append(f"wrong answer for {name}")
                    served.append(len(chosen))
            except (AdapterNotLoadedError, MergeStateError, PoolFullError):
                pass  # evicted or unloaded meanwhile, another merge running: expected
            except Exception as exc:  # collected and reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(served) > 600  # most of the 8 * 200 * 0.77 requests were answered
    pool._table.check_invariants()
    assert pool.merged is None
    for name in names[:3]:
        pool.load(name, paths[name])  # every slot can still be had
    assert pool.names() == names[:3]
