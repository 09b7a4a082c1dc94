"""AdapterPool: slots, mixed batches, merge, no retracing, threads, errors."""

import random
import threading
import time

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import AdapterPool, tf
from lora_ckpt.errors import (
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterNotLoadedError,
    BaseModelMismatchError,
    LoRAConfigError,
    MergeStateError,
    PoolFullError,
)

from .conftest import TINY_CONVNEXT, TINY_VIT, emptied

CONVNEXT = TINY_CONVNEXT
MAX_RANK = 4


def convnext(rank, base_file):
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=rank,
        lora_train_bias="lora_only",
        lora_train_classifier=False,
        **CONVNEXT,
    )
    lora_ckpt.load_base_weights(model, base_file)
    return model


def conv_net(rank):
    """A functional model with Conv2D LoRA (3x3 stride 2, 1x1) and Dense LoRA.
    Base layers use seeded initialisers, so every rank shares one base."""
    init = lambda i: tf.keras.initializers.GlorotUniform(seed=i)  # noqa: E731
    inputs = tf.keras.Input((12, 12, 3))
    h = tf.keras.layers.Conv2D(
        6, 3, strides=2, padding="same", name="conv_a", kernel_initializer=init(1)
    )(inputs)
    h = tf.keras.layers.Activation("relu")(h)
    h = tf.keras.layers.Conv2D(8, 1, name="conv_b", kernel_initializer=init(2))(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    outputs = tf.keras.layers.Dense(3, name="fc", kernel_initializer=init(3))(h)
    model = tf.keras.Model(inputs, outputs)
    return lora_ckpt.convert_to_lora_model(
        model, target_layers=["conv_*", "fc"], lora_rank=rank, lora_train_bias="lora_only"
    )


def fill_adapter(model, seed):
    rng = np.random.default_rng(seed)
    for _, layer in lora_ckpt.lora_layers(model):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b, layer.bias):
            var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))


@pytest.fixture(scope="module")
def convnext_adapters(tmp_path_factory):
    """Adapters of ranks 1..4 (and a second rank 4) on one ConvNeXt base, with
    the outputs of the models they were saved from as references."""
    directory = tmp_path_factory.mktemp("pool")
    tf.keras.utils.set_random_seed(3)
    tfimm.create_model("convnext_tiny", **CONVNEXT).save_weights(str(directory / "base.h5"))
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype("float32")
    adapters, reference, models = {}, {}, {}
    for i, rank in enumerate([1, 2, 3, 4, 4, 2]):
        if rank not in models:
            models[rank] = convnext(rank, str(directory / "base.h5"))
        model = models[rank]
        fill_adapter(model, seed=i)
        name = f"task{i}"
        adapters[name] = lora_ckpt.save_lora_state(model, str(directory / name))
        reference[name] = model(x).numpy()
    return {
        "base": str(directory / "base.h5"),
        "adapters": adapters,
        "reference": reference,
        "x": x,
    }


@pytest.fixture(scope="module")
def shared_pool(convnext_adapters):
    """One pool for the module: building one traces its graphs (about a second)."""
    return AdapterPool(convnext(MAX_RANK, convnext_adapters["base"]), capacity=4, max_rank=MAX_RANK)


@pytest.fixture
def pool(shared_pool):
    """The module's pool, emptied."""
    return emptied(shared_pool)


def test_pool_outputs_match_the_saved_models_for_ranks_1_to_4(pool, convnext_adapters):
    x = convnext_adapters["x"]
    for name in ["task0", "task1", "task2", "task3"]:
        pool.load(name, convnext_adapters["adapters"][name])
    assert pool.names() == ["task0", "task1", "task2", "task3"]
    for name in pool.names():
        np.testing.assert_allclose(
            pool.predict(x, adapter=name),
            convnext_adapters["reference"][name],
            rtol=1e-5,
            atol=1e-5,
        )


def test_off_gives_the_base_model(pool, convnext_adapters):
    x = convnext_adapters["x"]
    base = convnext(MAX_RANK, convnext_adapters["base"])
    lora_ckpt.set_lora_enabled(base, False)
    pool.load("task0", convnext_adapters["adapters"]["task0"])
    np.testing.assert_array_equal(pool.predict(x, adapter="off"), base(x).numpy())
    np.testing.assert_array_equal(pool.predict(x), base(x).numpy())  # "off" is the default


def assert_mixed_equals_per_sample(pool, x, names):
    mixed = pool.predict(x, adapters=names)
    for i, name in enumerate(names):
        alone = pool.predict(x[i : i + 1], adapter=name)[0]
        np.testing.assert_allclose(mixed[i], alone, rtol=1e-5, atol=1e-5, err_msg=name)
    return mixed


def test_mixed_batch_equals_per_sample_dense(pool, convnext_adapters):
    for name in ["task0", "task1", "task2", "task3"]:
        pool.load(name, convnext_adapters["adapters"][name])
    names = ["task3", "off", "task0", "task2", "task1", "task3"]
    mixed = assert_mixed_equals_per_sample(pool, convnext_adapters["x"], names)
    for i, name in enumerate(names):
        if name != "off":
            np.testing.assert_allclose(
                mixed[i], convnext_adapters["reference"][name][i], rtol=1e-5, atol=1e-5
            )


def check_pool_of(build, ranks, x, directory, mix):
    """Saves one adapter per rank from models ``build(rank)``, serves them all
    from one pool built with the largest rank, and checks single-adapter
    outputs against the saved models and a mixed batch against per-sample runs."""
    references = {}
    for i, rank in enumerate(ranks):
        model = build(rank)
        fill_adapter(model, seed=10 + i)
        lora_ckpt.save_lora_state(model, str(directory / f"a{i}"))
        references[f"a{i}"] = model(x).numpy()
    pool = AdapterPool(build(max(ranks)), capacity=len(ranks))
    for name, expected in references.items():
        pool.load(name, str(directory / name))
        np.testing.assert_allclose(pool.predict(x, adapter=name), expected, rtol=1e-5, atol=1e-5)
    assert_mixed_equals_per_sample(pool, x, mix)


def test_mixed_batch_equals_per_sample_conv2d(tmp_path):
    x = np.random.default_rng(1).normal(size=(5, 12, 12, 3)).astype("float32")
    check_pool_of(conv_net, [1, 3, 2], x, tmp_path, ["a2", "a0", "off", "a1", "a0"])


def test_switching_loading_evicting_never_retrace(pool, convnext_adapters):
    x = convnext_adapters["x"]
    # One graph per kind of request (one adapter, batch of 1, mixed), traced
    # when the pool is built and never again.
    assert pool.trace_count == 3
    evictions = pool.stats["evictions"]
    for name in [
        "task0",
        "task1",
        "task2",
        "task3",
        "task4",
        "task5",
        "task0",
    ]:  # 7 loads, capacity 4
        pool.load(name, convnext_adapters["adapters"][name])
        pool.activate(name)
        pool.predict(x[:2])
        pool.predict(x[:3], adapters=[name, "off", name])
    assert pool.stats["evictions"] - evictions == 3
    assert pool.trace_count == 3


# The benchmark (benchmarks/run.py) runs 1000 cycles; a handful catch drift here.
MERGE_CYCLES = 6


def test_merge_unmerge_cycles_restore_base_bitwise(pool, convnext_adapters):
    x = convnext_adapters["x"]
    names = ["task1", "task3", "task4"]
    for name in names:
        pool.load(name, convnext_adapters["adapters"][name])
    layers = [layer for _, layer in lora_ckpt.lora_layers(pool.model)]
    kernels = [layer.kernel.numpy().copy() for layer in layers]
    biases = [layer.bias.numpy().copy() for layer in layers]
    unmerged = {name: pool.predict(x, adapter=name) for name in names}
    for cycle in range(MERGE_CYCLES):
        name = names[cycle % len(names)]
        pool.merge(name)
        np.testing.assert_allclose(
            pool.predict(x, adapter=name), unmerged[name], rtol=1e-5, atol=1e-5
        )
        assert any(
            not np.array_equal(layer.kernel.numpy(), kernel)
            for layer, kernel in zip(layers, kernels, strict=True)
        ), "merge left every kernel as it was"
        pool.unmerge()
    for layer, kernel, bias in zip(layers, kernels, biases, strict=True):
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
        np.testing.assert_array_equal(layer.bias.numpy(), bias)
    np.testing.assert_array_equal(pool.predict(x, adapter="task3"), unmerged["task3"])


def test_merged_pool_refuses_other_adapters(pool, convnext_adapters):
    for name in ["task1", "task2"]:
        pool.load(name, convnext_adapters["adapters"][name])
    pool.merge("task1")
    with pytest.raises(MergeStateError, match="merged"):
        pool.predict(convnext_adapters["x"], adapter="task2")
    with pytest.raises(MergeStateError, match="already merged"):
        pool.merge("task2")
    pool.unmerge()
    with pytest.raises(MergeStateError, match="nothing to unmerge"):
        pool.unmerge()
    pool.predict(convnext_adapters["x"], adapter="task2")


def test_loading_while_another_adapter_is_merged(pool, convnext_adapters, tmp_path):
    """Issue 21 item 8: a load into a free slot leaves the merged kernels alone,
    and its base check sees W0, not the merged kernels. B saves no biases, so
    its fingerprint covers the LoRA layers' biases too, which the merge changed."""
    x, adapters, reference = (convnext_adapters[k] for k in ("x", "adapters", "reference"))
    model_b = convnext(2, convnext_adapters["base"])
    rng = np.random.default_rng(7)
    for _, layer in lora_ckpt.lora_layers(model_b):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
    lora_ckpt.save_lora_state(model_b, str(tmp_path / "b"), include_bias="none")
    expected_b = model_b(x).numpy()

    pool.load("a", adapters["task1"])
    pool.merge("a")
    merged_a = pool.predict(x, adapter="a")
    np.testing.assert_allclose(merged_a, reference["task1"], rtol=1e-5, atol=1e-5)
    pool.load("b", str(tmp_path / "b"))
    assert pool.merged == "a" and pool.names() == ["a", "b"]
    np.testing.assert_array_equal(pool.predict(x, adapter="a"), merged_a)  # kernels untouched
    with pytest.raises(MergeStateError, match="must wait for pool.unmerge"):
        pool.predict(x, adapter="b")  # served unmerged only: see AdapterPool.merge
    pool.unmerge()
    np.testing.assert_allclose(pool.predict(x, adapter="b"), expected_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        pool.predict(x, adapter="a"), reference["task1"], rtol=1e-5, atol=1e-5
    )


def test_the_base_check_refuses_another_base_while_merged(pool, convnext_adapters, tmp_path):
    other = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=2, lora_train_classifier=False, **CONVNEXT
    )  # a fresh base, not the file
    fill_adapter(other, seed=5)
    lora_ckpt.save_lora_state(other, str(tmp_path / "other"), include_bias="none")
    pool.load("a", convnext_adapters["adapters"]["task1"])
    pool.merge("a")
    with pytest.raises(BaseModelMismatchError, match="other base weights"):
        pool.load("other", str(tmp_path / "other"))
    assert pool.names() == ["a"] and pool.merged == "a"


@pytest.mark.slow
def test_concurrent_requests_while_loading(convnext_adapters):
    """8 threads x 200 requests over 6 adapters, capacity 3, while a loader
    thread keeps loading: every answer equals the single-threaded one."""
    adapters = convnext_adapters["adapters"]
    x = convnext_adapters["x"][:1]
    pool = AdapterPool(convnext(MAX_RANK, convnext_adapters["base"]), capacity=3, max_rank=MAX_RANK)
    expected = {}
    for name, path in adapters.items():  # single-threaded reference, through the pool itself
        pool.load(name, path)
        expected[name] = pool.predict(x, adapter=name)
    names = sorted(adapters)
    errors, done = [], threading.Event()
    deadline = time.monotonic() + 50

    def client(seed):
        rng = random.Random(seed)
        for _ in range(200):
            name = rng.choice(names)
            while True:
                try:
                    out = pool.predict(x, adapter=name)
                    break
                except AdapterNotLoadedError:
                    try:
                        pool.load(name, adapters[name])
                    except PoolFullError:
                        time.sleep(0.001)
                if time.monotonic() > deadline:
                    errors.append("timeout")
                    return
            if not np.array_equal(out, expected[name]):
                errors.append(name)

    def loader():
        rng = random.Random(99)
        while not done.is_set():
            name = rng.choice(names)
            try:
                pool.load(name, adapters[name])
            except PoolFullError:
                pass

    loader_thread = threading.Thread(target=loader)
    loader_thread.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    done.set()
    loader_thread.join()
    assert errors == []
    assert pool.stats["requests"] >= 8 * 200 + len(adapters)
    assert pool.stats["evictions"] > 0
    assert pool.trace_count == 3


def test_bad_requests_raise_and_the_pool_keeps_serving(pool, convnext_adapters, tmp_path):
    x = convnext_adapters["x"]
    pool.load("task1", convnext_adapters["adapters"]["task1"])
    expected = pool.predict(x, adapter="task1")

    with pytest.raises(AdapterNotLoadedError, match="'nope' is not loaded.*task1"):
        pool.predict(x, adapter="nope")
    with pytest.raises(LoRAConfigError, match="one adapter name per sample"):
        pool.predict(x, adapters=["task1", "off"])
    with pytest.raises(LoRAConfigError, match="Expected a batch of shape"):
        pool.predict(x[:, :16])

    too_big = convnext(MAX_RANK + 1, convnext_adapters["base"])
    lora_ckpt.save_lora_state(too_big, str(tmp_path / "rank5"))
    with pytest.raises(AdapterMismatchError, match=f"max_rank={MAX_RANK}"):
        pool.load("big", str(tmp_path / "rank5"))

    other = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=2,
        lora_train_bias="lora_only",
        lora_train_classifier=False,
        **CONVNEXT,
    )  # fresh base, not the file
    fill_adapter(other, seed=5)
    lora_ckpt.save_lora_state(other, str(tmp_path / "other_base"))
    with pytest.raises(BaseModelMismatchError, match="other base weights"):
        pool.load("other", str(tmp_path / "other_base"))
    with pytest.raises(AdapterMismatchError, match="was trained on a"):
        model = conv_net(2)
        lora_ckpt.save_lora_state(model, str(tmp_path / "conv"))
        pool.load("conv", str(tmp_path / "conv"))
    with pytest.raises(AdapterNotFoundError):
        pool.load("missing", str(tmp_path / "does_not_exist"))
    with pytest.raises(LoRAConfigError, match="other than 'off'"):
        pool.load("off", convnext_adapters["adapters"]["task1"])

    np.testing.assert_array_equal(pool.predict(x, adapter="task1"), expected)  # still serving
    assert pool.names() == ["task1"]

    busy = ["task0", "task1", "task2", "task3"]  # capacity 4
    for name in busy:
        pool.load(name, convnext_adapters["adapters"][name])
    # Every slot busy with running requests:
    with pool.using(busy), pytest.raises(PoolFullError, match="nothing can be evicted"):
        pool.load("task5", convnext_adapters["adapters"]["task5"])
    assert pool.names() == busy
    pool.load("task5", convnext_adapters["adapters"]["task5"])  # now one can be evicted
    assert len(pool.names()) == 4 and "task5" in pool.names()
    np.testing.assert_allclose(
        pool.predict(x, adapter="task5"),
        convnext_adapters["reference"]["task5"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_adapter_with_full_layers_is_refused(pool, convnext_adapters, tmp_path):
    model = convnext(2, convnext_adapters["base"])
    lora_ckpt.save_lora_state(model, str(tmp_path / "with_head"), extra_layers=["fc"])
    # Only a pool built with full_layers=[...] keeps per-adapter heads.
    with pytest.raises(
        AdapterMismatchError, match="fc/kernel: a pool keeps per-adapter copies only of LoRA layers"
    ):
        pool.load("with_head", str(tmp_path / "with_head"))


def test_unload_and_reload(pool, convnext_adapters):
    pool.load("task1", convnext_adapters["adapters"]["task1"])
    pool.activate("task1")
    pool.unload("task1")
    assert pool.names() == [] and pool.active == "off"
    with pytest.raises(AdapterNotLoadedError):
        pool.predict(convnext_adapters["x"], adapter="task1")
    pool.load("task1", convnext_adapters["adapters"]["task2"])  # a name can be reused
    np.testing.assert_allclose(
        pool.predict(convnext_adapters["x"], adapter="task1"),
        convnext_adapters["reference"]["task2"],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.slow
def test_vit_pool_with_attention_lora(tmp_path):
    config = TINY_VIT
    tf.keras.utils.set_random_seed(0)
    tfimm.create_model("vit_tiny_patch16_224", **config).save_weights(str(tmp_path / "base.h5"))

    def vit(rank):
        model = lora_ckpt.create_model(
            "vit_tiny_patch16_224",
            lora_rank=rank,
            lora_layer_groups=("attention", "head"),
            lora_train_bias="lora_only",
            **config,
        )
        lora_ckpt.load_base_weights(model, str(tmp_path / "base.h5"))
        return model

    x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype("float32")
    check_pool_of(vit, [2, 4], x, tmp_path, ["a1", "off", "a0", "a1"])
