"""The dynamic batcher on a stand-in pool (plain numpy): it batches, isolates a
bad request, and keeps running whatever a request does."""

import asyncio
import threading

import numpy as np
import pytest

from lora_ckpt.errors import LoRAConfigError
from lora_ckpt.serving.batching import MicroBatcher


class RowSumPool:
    """``predict_rows``: each image's sum times its adapter's factor; an
    adapter named ``bad`` raises, as an adapter evicted under a batch would."""

    factors = {"one": 1.0, "two": 2.0}

    def __init__(self):
        self.batches = []

    def predict_rows(self, images, adapters):
        if "bad" in adapters:
            raise ValueError("bad adapter")
        self.batches.append(len(images))
        return [
            np.atleast_1d(image.sum() * self.factors[a])
            for image, a in zip(images, adapters, strict=True)
        ]


def test_concurrent_requests_are_answered_in_batches_each_with_its_adapter():
    pool = RowSumPool()
    batcher = MicroBatcher(pool, max_batch=8, max_wait=0.05)
    images = np.arange(24, dtype="float32").reshape(6, 2, 2)

    async def main():
        return await asyncio.gather(
            *(batcher.predict(image, "one" if i % 2 else "two") for i, image in enumerate(images))
        )

    outputs = asyncio.run(main())
    expected = [image.sum() * (1.0 if i % 2 else 2.0) for i, image in enumerate(images)]
    np.testing.assert_array_equal(np.concatenate(outputs), expected)
    assert sum(pool.batches) == 6 and len(pool.batches) < 6


def test_a_failing_request_and_an_odd_shape_fail_alone():
    pool = RowSumPool()
    batcher = MicroBatcher(pool, max_batch=8, max_wait=0.05)

    async def main():
        return await asyncio.gather(
            batcher.predict(np.ones((2, 2), "float32"), "one"),
            batcher.predict(np.ones((2, 2), "float32"), "bad"),
            batcher.predict(np.ones((3, 3), "float32"), "two"),  # cannot be stacked with the rest
            return_exceptions=True,
        )

    good, bad, odd = asyncio.run(main())
    np.testing.assert_array_equal(good, [4.0])
    assert isinstance(bad, ValueError)
    np.testing.assert_array_equal(odd, [18.0])


def test_a_request_whose_event_loop_closed_does_not_stop_later_ones():
    pool = RowSumPool()
    release = threading.Event()
    blocked = pool.predict_rows

    def slow(images, adapters):
        release.wait(5)
        return blocked(images, adapters)

    pool.predict_rows = slow
    batcher = MicroBatcher(pool, max_batch=1, max_wait=0.0)

    async def abandon():
        # Queued, then its loop closes before the batcher answers it.
        asyncio.ensure_future(batcher.predict(np.ones((1,), "float32"), "one"))
        await asyncio.sleep(0.01)

    asyncio.run(abandon())
    release.set()

    async def later():
        return await asyncio.wait_for(batcher.predict(np.ones((1,), "float32"), "two"), 5)

    np.testing.assert_array_equal(asyncio.run(later()), [2.0])


def test_a_pool_answering_no_rows_or_a_failing_metrics_callback_do_not_stop_the_thread():
    pool = RowSumPool()
    real = pool.predict_rows
    broken = iter([True, False])
    pool.predict_rows = lambda images, adapters: [] if next(broken) else real(images, adapters)

    def on_batch(size):
        raise RuntimeError("metrics are down")

    batcher = MicroBatcher(pool, max_batch=1, max_wait=0.0, on_batch=on_batch)

    async def twice():
        first = await asyncio.gather(
            batcher.predict(np.ones((1,), "float32"), "one"), return_exceptions=True
        )
        second = await asyncio.wait_for(batcher.predict(np.ones((1,), "float32"), "two"), 5)
        return first[0], second

    first, second = asyncio.run(twice())
    assert isinstance(first, IndexError)  # a pool that answered no rows
    np.testing.assert_array_equal(second, [2.0])


@pytest.mark.parametrize(
    "options", [{"max_batch": 0}, {"max_batch": True}, {"max_wait": -1}, {"max_wait": float("nan")}]
)
def test_bad_batching_options_are_refused(options):
    with pytest.raises(LoRAConfigError):
        MicroBatcher(RowSumPool(), **options)


def test_a_flood_on_one_adapter_does_not_starve_another():
    # The pool runs one batch at a time; 24 requests for "one" arrive first,
    # then one for "two": it rides the next batch, not the fourth.
    pool = RowSumPool()
    gate = threading.Event()
    order = []
    real = pool.predict_rows

    def gated(images, adapters):
        gate.wait(5)
        order.append(list(adapters))
        return real(images, adapters)

    pool.predict_rows = gated
    batcher = MicroBatcher(pool, max_batch=8, max_wait=0.0)

    async def main():
        flood = [batcher.predict(np.ones((1,), "float32"), "one") for _ in range(24)]
        tasks = [asyncio.ensure_future(request) for request in flood]
        await asyncio.sleep(0.05)  # the first batch is taken and waits at the gate
        light = asyncio.ensure_future(batcher.predict(np.ones((1,), "float32"), "two"))
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(light, *tasks), 5)

    outputs = asyncio.run(main())
    np.testing.assert_array_equal(outputs[0], [2.0])
    assert len(outputs) == 25
    batch_of_two = next(i for i, batch in enumerate(order) if "two" in batch)
    assert batch_of_two == 1, order
