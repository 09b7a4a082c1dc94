"""AdapterPool with adapters of many ranks: each computes its own model, alone
and in mixed batches, and takes the memory of its own rank, not max_rank's."""

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import AdapterPool, tf
from lora_ckpt.serving.pages import RowAllocator

from .conftest import TINY_CONVNEXT, emptied

RANKS = [1, 4, 8, 16, 32, 64]  # every power-of-two class a store mixes, and rank 1
TOL = dict(rtol=1e-5, atol=1e-5)


# ---- the page allocator (plain Python) ------------------------------------------------------


def test_rows_are_handed_out_lowest_first_and_reused_after_release():
    rows = RowAllocator(limit=100)
    assert rows.assign(1, 3) == ([1, 2, 3], 4)  # row 0 is reserved
    assert rows.assign(2, 2)[0] == [4, 5]
    rows.release(1)
    assert rows.assign(3, 2) == ([1, 2], None)  # freed rows first, no growth
    assert rows.rows_of(3) == [1, 2] and rows.rows_of(1) == []
    assert rows.used == 4


def test_a_stack_grows_by_a_quarter_so_rows_stay_within_1_25x_of_those_used():
    rows = RowAllocator(limit=10_000)
    for slot in range(1, 400):
        rows.assign(slot, 16)
        assert rows.size - 1 <= max(1.25 * rows.used, rows.used + 16), (rows.size, rows.used)


def test_reassigning_a_slot_frees_its_old_rows_and_the_limit_holds():
    rows = RowAllocator(limit=9)
    rows.assign(1, 8)
    assert rows.assign(1, 8) == (list(range(1, 9)), None)  # its own rows, reused
    assert rows.assign(1, 0) == ([], None) and rows.used == 0
    rows.assign(1, 8)
    with pytest.raises(ValueError):
        rows.assign(2, 1)


# ---- a pool built for rank 64 -----------------------------------------------------------------


def convnext(rank, base_file):
    model = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=rank, lora_train_bias="lora_only", **TINY_CONVNEXT
    )
    lora_ckpt.load_base_weights(model, base_file)
    return model


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """One adapter per rank (with its own biases) on one base, with its model's outputs."""
    directory = tmp_path_factory.mktemp("ranks")
    tf.keras.utils.set_random_seed(5)
    base = str(directory / "base.h5")
    tfimm.create_model("convnext_tiny", **TINY_CONVNEXT).save_weights(base)
    x = np.random.default_rng(0).normal(size=(len(RANKS), 32, 32, 3)).astype("float32")
    paths, reference, sizes = {}, {}, {}
    for i, rank in enumerate(RANKS):
        model = convnext(rank, base)
        rng = np.random.default_rng(i)
        for _, layer in lora_ckpt.lora_layers(model):
            for var in (layer.kernel_lora_a, layer.kernel_lora_b, layer.bias):
                var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
        name = f"r{rank}"
        paths[name] = lora_ckpt.save_lora_state(model, str(directory / name))
        reference[name] = model(x).numpy()
        lora = {path for path, _ in lora_ckpt.lora_layers(model)}
        tensors = lora_ckpt.read_lora_state(paths[name]).tensors
        sizes[name] = sum(v.nbytes for k, v in tensors.items() if k.rsplit("/", 1)[0] in lora)
    pool = AdapterPool(convnext(max(RANKS), base), capacity=len(RANKS), max_rank=max(RANKS))
    return dict(x=x, paths=paths, reference=reference, sizes=sizes, pool=pool)


@pytest.fixture
def pool(ranked):
    return emptied(ranked["pool"])


@pytest.mark.slow
def test_every_rank_computes_its_own_model_alone_at_batch_1_and_in_one_mixed_batch(pool, ranked):
    x, reference = ranked["x"], ranked["reference"]
    for name, path in ranked["paths"].items():
        pool.load(name, path)
    for name in ranked["paths"]:
        np.testing.assert_allclose(pool.predict(x, adapter=name), reference[name], **TOL)
        np.testing.assert_allclose(pool.predict(x[:1], adapter=name), reference[name][:1], **TOL)
    names = list(ranked["paths"])  # sample i with rank RANKS[i]
    mixed = pool.predict(x, adapters=names)
    for i, name in enumerate(names):
        np.testing.assert_allclose(mixed[i], reference[name][i], err_msg=name, **TOL)
    # A batch of small ranks only: gathered up to rank 4, not 64.
    small = pool.predict(x[:3], adapters=["r4", "r1", "r4"])
    for i, name in enumerate(["r4", "r1", "r4"]):
        np.testing.assert_allclose(small[i], reference[name][i], err_msg=name, **TOL)
    assert pool.trace_count == 3  # the page stacks grew; nothing retraced
    # One slot-write graph for every rank (its inputs have no fixed length).
    assert pool._layers.write._write.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_a_resident_adapter_takes_its_own_tensors_bytes_whatever_max_rank(pool, ranked):
    for name, path in ranked["paths"].items():
        slot = pool.load(name, path)
        taken = sum(slots.slot_bytes(slot) for slots in pool._lora.values())
        # The LoRA layers' A, B and biases, nothing padded (the head is a full layer).
        assert taken == ranked["sizes"][name], name
    layers = list(pool._lora.values())
    used = sum(s.pages.used for s in layers)
    assert used == len(layers) * sum(RANKS)
    assert sum(s.pages.size - 1 for s in layers) <= 1.25 * used


@pytest.mark.slow
def test_unloaded_pages_are_reused_and_cleared_slots_read_as_zeros(pool, ranked):
    slot = pool.load("r64", ranked["paths"]["r64"])
    sizes = [s.pages.size for s in pool._lora.values()]
    pool.unload("r64")
    for slots in pool._lora.values():
        assert slots.ranks[slot].numpy() == 0 and slots.pages.used == 0
        assert not np.any(slots.a[slot].numpy()) and not np.any(slots.b[slot].numpy())
    for name in ["r32", "r16", "r8", "r4", "r1"]:  # 61 pages per layer: fit in the freed 64
        pool.load(name, ranked["paths"][name])
    assert [s.pages.size for s in pool._lora.values()] == sizes
    np.testing.assert_allclose(
        pool.predict(ranked["x"][:2], adapters=["r1", "r32"]),
        [ranked["reference"]["r1"][0], ranked["reference"]["r32"][1]],
        **TOL,
    )


@pytest.mark.slow
def test_merge_of_a_small_rank_in_a_rank_64_pool_restores_bitwise(pool, ranked):
    x = ranked["x"]
    pool.load("r4", ranked["paths"]["r4"])
    kernels = [layer.kernel.numpy() for _, layer in lora_ckpt.lora_layers(pool.model)]
    pool.merge("r4")
    np.testing.assert_allclose(pool.predict(x, adapter="r4"), ranked["reference"]["r4"], **TOL)
    pool.unmerge()
    for (_, layer), kernel in zip(lora_ckpt.lora_layers(pool.model), kernels, strict=True):
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
