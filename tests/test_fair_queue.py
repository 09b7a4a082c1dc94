"""The batcher's queue per adapter, taken round-robin: plain Python, milliseconds."""

import threading
import time

from lora_ckpt.serving.fair_queue import FairQueue


def fill(queue, items):
    for key, item in items:
        queue.put(key, item)


def test_a_flood_on_one_key_does_not_push_the_others_back():
    queue = FairQueue()
    fill(queue, [("hot", f"h{i}") for i in range(20)])
    fill(queue, [("a", "a0"), ("b", "b0"), ("a", "a1")])
    first = queue.take(4, 0.0)
    # One FIFO would answer h0..h3; in turns, every key waiting gets a place.
    assert first == ["h0", "a0", "b0", "h1"]
    assert queue.take(4, 0.0) == ["a1", "h2", "h3", "h4"]
    assert queue.depth() == 15 and queue.depths() == {"hot": 15}


def test_the_turn_carries_over_from_one_batch_to_the_next():
    queue = FairQueue()
    fill(queue, [(key, f"{key}{i}") for i in range(3) for key in "abc"])
    batches = [queue.take(2, 0.0) for _ in range(5)]
    assert batches == [["a0", "b0"], ["c0", "a1"], ["b1", "c1"], ["a2", "b2"], ["c2"]]
    assert queue.depth() == 0 and queue.depths() == {}


def test_items_of_one_key_keep_their_order():
    queue = FairQueue()
    fill(queue, [("only", i) for i in range(10)])
    assert queue.take(8, 0.0) + queue.take(8, 0.0) == list(range(10))


def test_a_first_item_waits_for_company_but_not_longer_than_max_wait():
    queue = FairQueue()
    queue.put("a", 1)
    threading.Timer(0.02, queue.put, ("b", 2)).start()
    started = time.monotonic()
    assert queue.take(2, 1.0) == [1, 2]  # company arrived: no need to wait the full second
    assert time.monotonic() - started < 0.5
    queue.put("a", 3)
    started = time.monotonic()
    assert queue.take(8, 0.05) == [3]
    assert 0.04 < time.monotonic() - started < 0.5


def test_take_blocks_until_an_item_arrives_or_its_timeout():
    queue = FairQueue()
    assert queue.take(1, 0.0, timeout=0.01) == []
    threading.Timer(0.02, queue.put, ("a", "late")).start()
    assert queue.take(1, 0.0, timeout=5) == ["late"]


def test_concurrent_producers_lose_nothing():
    queue = FairQueue()

    def produce(key):
        for i in range(500):
            queue.put(key, (key, i))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    taken = []
    while len(taken) < 2000:
        taken += queue.take(7, 0.0, timeout=5)
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted((k, i) for k in range(4) for i in range(500))
    for key in range(4):  # FIFO within each key
        assert [i for k, i in taken if k == key] == list(range(500))
