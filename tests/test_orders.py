"""Unit tests of the replica directory's order log: pure Python, milliseconds."""

import pytest

from lora_ckpt.serving.orders import RELOAD, UNLOAD, OrderLog


def names(todo):
    return [(o["seq"], o["kind"], o["name"], o["version"]) for o in todo["orders"]]


def test_a_replica_gets_each_order_it_has_not_carried_out_oldest_first():
    log = OrderLog()
    assert log.since(log.epoch, 0) == {"epoch": log.epoch, "orders": []}
    assert log.add(RELOAD, "a", "v1") == 1
    assert log.add(UNLOAD, "b") == 2
    assert names(log.since(log.epoch, 0)) == [(1, RELOAD, "a", "v1"), (2, UNLOAD, "b", None)]
    assert names(log.since(log.epoch, 1)) == [(2, UNLOAD, "b", None)]
    assert names(log.since(log.epoch, 2)) == []


def test_a_newer_order_supersedes_an_older_one_for_the_same_adapter():
    log = OrderLog()
    log.add(RELOAD, "a", "v1")
    log.add(RELOAD, "b", "w1")
    log.add(RELOAD, "a", "v2")
    log.add(UNLOAD, "a")
    # Bounded by the number of adapters, whatever the number of orders.
    assert names(log.since(log.epoch, 0)) == [(2, RELOAD, "b", "w1"), (4, UNLOAD, "a", None)]
    assert log.seq == 4


def test_a_replica_of_another_epoch_starts_over():
    # The directory started again: its numbers start from 1, and a replica that
    # had carried out order 5 of the old log must not skip the new ones.
    old, new = OrderLog(), OrderLog()
    for _ in range(5):
        old.add(RELOAD, "a", "v")
    new.add(RELOAD, "a", "v9")
    assert old.epoch != new.epoch
    todo = new.since(old.epoch, 5)
    assert todo["epoch"] == new.epoch and names(todo) == [(1, RELOAD, "a", "v9")]
    assert names(new.since(None, 0)) == [(1, RELOAD, "a", "v9")]  # a replica that just started


def test_an_unknown_kind_is_refused_and_recorded_nowhere():
    log = OrderLog()
    with pytest.raises(ValueError, match="reload"):
        log.add("delete", "a")
    assert log.seq == 0 and log.since(None, 0)["orders"] == []
