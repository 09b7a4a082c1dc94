"""Unit tests of the slot table: pure Python, milliseconds.

Every table here is a :class:`CheckedTable`, which runs ``check_invariants``
after each public call, so a broken invariant fails the test at the call that
broke it.
"""

import functools
import random
import sys
import threading
import time

import pytest

from lora_ckpt.errors import (
    AdapterNotLoadedError,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    PoolFullError,
)
from lora_ckpt.serving.slot_table import OFF, Reservation, SlotTable


class CheckedTable(SlotTable):
    """A SlotTable that checks its invariants after every public call."""


def _checked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self.check_invariants()

    return wrapper


for _name in (
    "acquire",
    "release",
    "reserve",
    "commit",
    "abort",
    "unload",
    "pin",
    "unpin",
    "take_dirty",
    "cleared",
    "activate",
    "check_name",
):
    setattr(CheckedTable, _name, _checked(getattr(SlotTable, _name)))


def table(capacity, *names):
    """A checked table with ``names`` loaded in order (slots 1, 2, ...)."""
    t = CheckedTable(capacity)
    for name in names:
        load(t, name)
    return t


def load(t, name):
    r = t.reserve()
    t.commit(name, r.slot)
    return r.slot


def states(t):
    return {s: v["state"] for s, v in t.snapshot()["slots"].items()}


def refs(t):
    return {s: v["refs"] for s, v in t.snapshot()["slots"].items()}


def recover_all(t):
    """Unloads everything and zeroes what is dirty; every slot must end free."""
    for name in t.names():
        t.unload(name)
    t.cleared(t.take_dirty())
    assert states(t) == dict.fromkeys(range(1, t.capacity + 1), "free")


# ---- basics --------------------------------------------------------------------


def test_fresh_table():
    t = CheckedTable(3)
    t.check_invariants()
    assert t.capacity == 3
    assert t.names() == []
    assert t.active == OFF
    assert t.merged is None
    assert t.stats == {"loads": 0, "evictions": 0}
    assert t.slot_of(OFF) == 0
    assert OFF in t and "a" not in t and 3 not in t
    assert t.take_dirty() == []
    assert t.snapshot()["slots"] == {
        s: {"state": "free", "name": None, "refs": 0} for s in (1, 2, 3)
    }


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "3", True, None])
def test_invalid_capacity(capacity):
    with pytest.raises(LoRAConfigError, match="capacity"):
        SlotTable(capacity)


def test_reserve_commit_acquire_release():
    t = CheckedTable(3)
    r = t.reserve()
    assert r == Reservation(1, None)
    assert states(t) == {1: "loading", 2: "free", 3: "free"}
    assert t.names() == []  # a load in progress is invisible
    t.commit("a", 1)
    assert t.reserve() == Reservation(2, None)  # lowest free slot
    with pytest.raises(AdapterNotLoadedError):
        t.acquire(["b"])
    t.commit("b", 2)
    assert t.names() == ["a", "b"] and "a" in t
    assert (t.slot_of("a"), t.slot_of("b")) == (1, 2)
    assert t.stats == {"loads": 2, "evictions": 0}

    slots = t.acquire(["a", OFF, "b", "a"])
    assert slots == [1, 0, 2, 1]
    assert refs(t) == {1: 1, 2: 1, 3: 0}  # once per distinct slot
    again = t.acquire(["a"])
    assert refs(t) == {1: 2, 2: 1, 3: 0}
    t.release(slots)
    assert refs(t) == {1: 1, 2: 0, 3: 0}
    t.release(again)
    assert refs(t) == {1: 0, 2: 0, 3: 0}
    assert states(t) == {1: "live", 2: "live", 3: "free"}


def test_using_releases_even_on_error():
    t = table(2, "a", "b")
    with t.using(["b", "a"]) as slots:
        assert slots == [2, 1]
        assert refs(t) == {1: 1, 2: 1}
    assert refs(t) == {1: 0, 2: 0}
    with pytest.raises(ValueError, match="request failed"), t.using(["a"]):
        assert refs(t) == {1: 1, 2: 0}
        raise ValueError("request failed")
    assert refs(t) == {1: 0, 2: 0}


def test_activate():
    t = table(2, "a")
    t.activate("a")
    assert t.active == "a"
    t.activate(OFF)
    assert t.active == OFF
    with pytest.raises(AdapterNotLoadedError, match="'b'"):
        t.activate("b")
    assert t.active == OFF


# ---- reload, retire, zero ----------------------------------------------------


def test_reload_while_in_use_retires_then_frees_on_last_release():
    t = table(3, "a")
    t.activate("a")
    old = t.acquire(["a"])
    assert old == [1]
    assert load(t, "a") == 2
    snap = t.snapshot()["slots"]
    assert snap[1] == {"state": "retired", "name": "a", "refs": 1}
    assert snap[2] == {"state": "live", "name": "a", "refs": 0}
    assert t.slot_of("a") == 2 and t.names() == ["a"]
    assert t.active == "a"  # a reload keeps the default adapter
    assert t.acquire(["a"]) == [2]  # new requests see the new weights
    t.release([2])

    assert t.reserve() == Reservation(3, None)  # a retired slot is never taken
    t.abort(3)
    assert states(t) == {1: "retired", 2: "live", 3: "dirty"}
    t.release(old)
    assert states(t) == {1: "dirty", 2: "live", 3: "dirty"}
    assert t.snapshot()["slots"][1] == {"state": "dirty", "name": None, "refs": 0}

    assert t.take_dirty() == [1, 3]
    assert states(t) == {1: "clearing", 2: "live", 3: "clearing"}
    assert t.take_dirty() == []  # nobody zeroes a slot twice
    # while being zeroed a slot cannot be reserved: the idle 'a' is evicted instead
    assert t.reserve() == Reservation(2, "a")
    t.abort(2)
    t.cleared([1, 3])
    assert states(t) == {1: "free", 2: "dirty", 3: "free"}
    assert t.reserve() == Reservation(1, None)


def test_reload_of_an_idle_adapter_makes_the_old_slot_dirty():
    t = table(2, "a")
    assert load(t, "a") == 2
    assert states(t) == {1: "dirty", 2: "live"}
    assert t.take_dirty() == [1]
    assert t.stats == {"loads": 2, "evictions": 0}


def test_reserve_prefers_free_then_dirty_then_eviction():
    t = table(3, "a", "b")
    t.unload("a")
    assert states(t) == {1: "dirty", 2: "live", 3: "free"}
    assert t.reserve() == Reservation(3, None)  # free before dirty
    assert t.reserve() == Reservation(1, None)  # dirty before evicting 'b'
    assert t.take_dirty() == []  # the reserved dirty slot is not handed out to zero
    assert t.stats["evictions"] == 0
    assert t.reserve() == Reservation(2, "b")
    assert states(t) == {1: "loading", 2: "loading", 3: "loading"}


# ---- eviction ------------------------------------------------------------------


def test_eviction_picks_the_least_recently_used_idle_adapter():
    t = table(3, "a", "b", "c")
    t.release(t.acquire(["a"]))  # LRU order now: b, c, a
    assert t.reserve() == Reservation(2, "b")
    assert "b" not in t and t.names() == ["a", "c"]
    with pytest.raises(AdapterNotLoadedError):
        t.slot_of("b")
    assert t.stats == {"loads": 3, "evictions": 1}
    t.commit("d", 2)  # LRU order: c, a, d
    with t.using(["c"]):  # referenced: skipped
        assert t.reserve() == Reservation(1, "a")
    t.commit("e", 1)  # LRU order: d, c (touched by the request), e
    t.release(t.acquire(["e", "d"]))  # the last name used is the most recent: c, e, d
    assert t.reserve() == Reservation(3, "c")
    t.commit("f", 3)
    assert t.reserve() == Reservation(1, "e")


def test_eviction_never_takes_a_referenced_or_merged_slot():
    t = table(3, "a", "b", "c")
    assert t.pin("a") == 1
    held = t.acquire(["b"])
    assert t.reserve() == Reservation(3, "c")
    with pytest.raises(PoolFullError):
        t.reserve()
    assert states(t) == {1: "live", 2: "live", 3: "loading"}
    assert t.names() == ["a", "b"]
    t.release(held)
    assert t.reserve() == Reservation(2, "b")


def test_eviction_resets_active():
    t = table(2, "a", "b")
    t.activate("a")
    assert t.reserve() == Reservation(1, "a")
    assert t.active == OFF
    t.commit("c", 1)
    t.activate("b")
    assert t.reserve() == Reservation(2, "b")
    assert t.active == OFF


def test_pool_full_when_every_slot_is_referenced():
    t = table(2, "a", "b")
    held = t.acquire(["a", "b"])
    before = t.snapshot()
    with pytest.raises(PoolFullError, match="All 2 slots .* raise capacity"):
        t.reserve()
    assert t.snapshot() == before
    t.release(held)
    assert t.reserve() == Reservation(1, "a")


def test_pool_full_when_every_slot_is_loading_or_clearing():
    t = table(2, "a")
    t.unload("a")
    assert t.take_dirty() == [1]
    assert t.reserve() == Reservation(2, None)
    with pytest.raises(PoolFullError):
        t.reserve()
    t.cleared([1])
    assert t.reserve() == Reservation(1, None)


# ---- waiting for a slot ------------------------------------------------------


def _in_background(delay, action):
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


@pytest.mark.parametrize("wake", ["release", "unpin", "cleared", "abort", "commit"])
def test_reserve_waits_until_a_slot_becomes_available(wake):
    t = table(2, "a", "b")
    held = t.acquire(["a"])
    if wake == "release":
        t.acquire(["b"])
        expected = Reservation(2, "b")
        action = functools.partial(t.release, [2])
    elif wake == "unpin":
        t.pin("b")
        expected = Reservation(2, "b")
        action = t.unpin
    else:
        t.unload("b")
        expected = Reservation(2, None)
        if wake == "cleared":
            assert t.take_dirty() == [2]
            action = functools.partial(t.cleared, [2])
        else:
            assert t.reserve() == Reservation(2, None)
            if wake == "abort":
                action = functools.partial(t.abort, 2)
            else:  # another load finishes: its adapter is idle, so evictable
                action = functools.partial(t.commit, "c", 2)
                expected = Reservation(2, "c")
    with pytest.raises(PoolFullError):
        t.reserve()
    timer = _in_background(0.05, action)
    start = time.monotonic()
    assert t.reserve(timeout=5.0) == expected
    elapsed = time.monotonic() - start
    timer.join()
    assert 0.03 < elapsed < 2.0
    t.release(held)


def test_reserve_gives_up_after_the_timeout():
    t = table(1, "a")
    held = t.acquire(["a"])
    before = t.snapshot()
    start = time.monotonic()
    with pytest.raises(PoolFullError, match="All 1 slots"):
        t.reserve(timeout=0.08)
    elapsed = time.monotonic() - start
    assert 0.07 < elapsed < 1.0
    assert t.snapshot() == before
    t.release(held)


# ---- merge ---------------------------------------------------------------------


def test_pin_and_unpin():
    t = table(3, "a", "b")
    held = t.acquire(["a"])
    assert t.pin("a") == 1
    assert t.merged == "a" and t.snapshot()["merged"] == "a"
    assert refs(t) == {1: 1, 2: 0, 3: 0}  # pinning is not a request's reference
    with pytest.raises(MergeStateError, match="'a' is already merged"):
        t.pin("b")
    assert t.merged == "a"
    assert t.unpin() == "a"
    assert t.merged is None
    assert states(t) == {1: "live", 2: "live", 3: "free"}
    assert refs(t) == {1: 1, 2: 0, 3: 0}
    with pytest.raises(MergeStateError, match="No adapter is merged"):
        t.unpin()
    with pytest.raises(LoRAConfigError):
        t.pin(OFF)
    with pytest.raises(AdapterNotLoadedError, match="'c'"):
        t.pin("c")
    assert t.merged is None
    t.release(held)


def test_merged_adapter_cannot_be_unloaded_or_reloaded():
    t = table(3, "a")
    t.pin("a")
    with pytest.raises(MergeStateError, match="'a' is merged"):
        t.unload("a")
    r = t.reserve()
    assert r == Reservation(2, None)
    with pytest.raises(MergeStateError, match=r"'a' is merged; call unmerge\(\) before reloading"):
        t.commit("a", r.slot)
    assert states(t) == {1: "live", 2: "loading", 3: "free"}  # the caller aborts
    assert t.slot_of("a") == 1
    t.commit("b", r.slot)  # the reservation is still good for another name
    assert t.names() == ["a", "b"]


def test_merge_cycles_lose_no_slot():
    # The old inline bookkeeping retired the merged slot on reload and never
    # freed it: three such cycles left a 3-slot pool dead.
    t = table(3)
    slot = load(t, "a")
    for _ in range(10):
        assert t.pin("a") == slot
        r = t.reserve()
        with pytest.raises(MergeStateError):
            t.commit("a", r.slot)
        t.abort(r.slot)
        assert t.unpin() == "a"
        new = load(t, "a")
        assert new != slot and t.slot_of("a") == new
        assert states(t)[slot] == "dirty"
        t.cleared(t.take_dirty())
        slot = new
        counts = {}
        for state in states(t).values():
            counts[state] = counts.get(state, 0) + 1
        assert counts == {"live": 1, "free": 2}
    assert t.stats == {"loads": 11, "evictions": 0}
    loaded = [load(t, name) for name in ("b", "c", "d")]
    assert sorted(loaded) == [1, 2, 3]
    assert t.names() == ["b", "c", "d"]  # 'a' was the least recently used
    assert t.stats == {"loads": 14, "evictions": 1}


# ---- unload --------------------------------------------------------------------


def test_unload():
    t = table(3, "a", "b")
    t.activate("a")
    t.unload("a")
    assert t.active == OFF
    assert states(t) == {1: "dirty", 2: "live", 3: "free"}
    held = t.acquire(["b"])
    t.activate("b")
    t.unload("b")
    assert t.active == OFF
    assert states(t) == {1: "dirty", 2: "retired", 3: "free"}
    assert t.names() == []
    with pytest.raises(AdapterNotLoadedError):
        t.unload("b")
    t.release(held)
    assert t.take_dirty() == [1, 2]


def test_unload_off_and_unknown():
    t = table(2, "a")
    with pytest.raises(LoRAConfigError, match="'off'"):
        t.unload(OFF)
    with pytest.raises(AdapterNotLoadedError, match=r"'x'.*\['a'\]"):
        t.unload("x")
    assert t.names() == ["a"]


# ---- bad input -----------------------------------------------------------------


def test_unknown_names_change_nothing():
    t = table(2, "b", "a")
    before = t.snapshot()
    with pytest.raises(AdapterNotLoadedError) as info:
        t.acquire(["b", "ghost"])
    message = str(info.value)
    assert "'ghost'" in message and "['a', 'b']" in message and "Load it" in message
    assert t.snapshot() == before
    with pytest.raises(AdapterNotLoadedError):
        t.slot_of("ghost")
    with pytest.raises(AdapterNotLoadedError):
        t.acquire([["unhashable"]])
    assert isinstance(info.value, KeyError)
    # a failed acquire does not touch the LRU order either: 'b' is still the oldest
    assert t.reserve() == Reservation(1, "b")


def test_acquire_rejects_a_bare_string():
    t = table(2, "ab")
    with pytest.raises(LoRAConfigError):
        t.acquire("ab")
    assert refs(t) == {1: 0, 2: 0}


@pytest.mark.parametrize("name", ["", OFF, None, 3, b"a"])
def test_invalid_names_are_refused_and_the_slot_stays_reserved(name):
    t = table(2)
    r = t.reserve()
    with pytest.raises(LoRAConfigError, match="non-empty string"):
        t.commit(name, r.slot)
    assert states(t) == {1: "loading", 2: "free"}
    assert t.stats["loads"] == 0
    t.abort(r.slot)
    assert states(t) == {1: "dirty", 2: "free"}


@pytest.mark.parametrize("name", ["", OFF, None, 3, b"a"])
def test_check_name_refuses_what_commit_would_and_changes_nothing(name):
    t = table(2, "a")
    before = t.snapshot()
    with pytest.raises(LoRAConfigError, match="non-empty string"):
        t.check_name(name)
    assert t.snapshot() == before


def test_check_name_refuses_only_the_merged_name():
    t = table(2, "a", "b")
    t.check_name("a")
    t.pin("a")
    with pytest.raises(MergeStateError, match=r"'a' is merged; call unmerge\(\) before reloading"):
        t.check_name("a")
    t.check_name("b")
    t.check_name("new")
    t.unpin()
    t.check_name("a")


def test_release_underflow_is_a_programming_error():
    t = table(3, "a", "b")
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        t.release([1])
    held = t.acquire(["a"])
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        t.release([1, 2])
    assert refs(t) == {1: 1, 2: 0, 3: 0}  # nothing released
    with pytest.raises(RuntimeError):
        t.release([7])
    t.release(held)
    with pytest.raises(RuntimeError):
        t.release(held)
    with pytest.raises(RuntimeError):
        t.release([0])  # 'off' was not acquired either
    t.release(t.acquire([OFF]))


def test_slot_state_errors_are_programming_errors():
    t = table(2, "a")
    with pytest.raises(RuntimeError, match="not loading"):
        t.commit("b", 1)  # live, not reserved
    with pytest.raises(RuntimeError, match="not loading"):
        t.commit("b", 2)  # free, not reserved
    with pytest.raises(RuntimeError, match="not loading"):
        t.abort(0)
    with pytest.raises(RuntimeError, match="not clearing"):
        t.cleared([2])
    t.unload("a")
    with pytest.raises(RuntimeError, match="not clearing"):
        t.cleared([1])  # dirty but not taken
    assert states(t) == {1: "dirty", 2: "free"}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t._refs.__setitem__(2, 1), "free slot 2 has 1 references"),
        (lambda t: t._refs.__setitem__(1, -1), "slot 1 has -1 references"),
        (lambda t: t._state.__setitem__(2, "bogus"), "unknown state"),
        (lambda t: t._state.__setitem__(1, "retired"), "retired slot 1 has no reference"),
        (lambda t: t._slot_of.__setitem__("z", 2), "does not match"),
        (lambda t: t._name.__setitem__(2, "a"), "still names"),
        (lambda t: setattr(t, "_pinned", 2), "merged slot 2 is not live"),
        (lambda t: setattr(t, "_active", "z"), "'z' is not resident"),
    ],
)
def test_check_invariants_catches_corruption(corrupt, message):
    t = SlotTable(2)
    t.commit("a", t.reserve().slot)
    t.check_invariants()
    corrupt(t)
    with pytest.raises(AssertionError, match=message):
        t.check_invariants()


# ---- model-based random test ---------------------------------------------------


class Model:
    """The table's specification, written as plainly as possible."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.state = dict.fromkeys(range(1, capacity + 1), "free")
        self.name = dict.fromkeys(range(1, capacity + 1))
        self.refs = dict.fromkeys(range(capacity + 1), 0)
        self.lru = []  # live names, least recently used first
        self.merged = None
        self.active = OFF
        self.stats = {"loads": 0, "evictions": 0}

    def slot(self, name):
        if name == OFF:
            return 0
        for s, state in self.state.items():
            if state == "live" and self.name[s] == name:
                return s
        raise AdapterNotLoadedError(name)

    def touch(self, name):
        if name != OFF:
            self.lru.remove(name)
            self.lru.append(name)

    def retire(self, s):
        self.lru.remove(self.name[s])
        if self.refs[s]:
            self.state[s] = "retired"
        else:
            self.state[s], self.name[s] = "dirty", None

    def acquire(self, names):
        slots = [self.slot(n) for n in names]
        for s in set(slots):
            self.refs[s] += 1
        for n in names:
            self.touch(n)
        return slots

    def release(self, slots):
        for s in set(slots):
            self.refs[s] -= 1
            if s and self.refs[s] == 0 and self.state[s] == "retired":
                self.state[s], self.name[s] = "dirty", None

    def reserve(self):
        for wanted in ("free", "dirty"):
            slots = [s for s, state in self.state.items() if state == wanted]
            if slots:
                self.state[min(slots)], self.name[min(slots)] = "loading", None
                return Reservation(min(slots), None)
        for name in self.lru:
            s = self.slot(name)
            if self.refs[s] == 0 and name != self.merged:
                self.lru.remove(name)
                self.state[s], self.name[s] = "loading", None
                self.stats["evictions"] += 1
                if self.active == name:
                    self.active = OFF
                return Reservation(s, name)
        raise PoolFullError()

    def commit(self, name, s):
        if not isinstance(name, str) or name in ("", OFF):
            raise LoRAConfigError()
        if name == self.merged:
            raise MergeStateError()
        if name in self.lru:
            self.retire(self.slot(name))
        self.state[s], self.name[s] = "live", name
        self.lru.append(name)
        self.stats["loads"] += 1

    def abort(self, s):
        self.state[s] = "dirty"

    def unload(self, name):
        if name == OFF:
            raise LoRAConfigError()
        s = self.slot(name)
        if name == self.merged:
            raise MergeStateError()
        self.retire(s)
        if self.active == name:
            self.active = OFF

    def pin(self, name):
        if name == OFF:
            raise LoRAConfigError()
        if self.merged is not None:
            raise MergeStateError()
        s = self.slot(name)
        self.merged = name
        return s

    def unpin(self):
        if self.merged is None:
            raise MergeStateError()
        name, self.merged = self.merged, None
        return name

    def take_dirty(self):
        slots = sorted(s for s, state in self.state.items() if state == "dirty")
        for s in slots:
            self.state[s] = "clearing"
        return slots

    def cleared(self, slots):
        for s in slots:
            self.state[s] = "free"

    def activate(self, name):
        self.slot(name)
        self.active = name

    def snapshot(self):
        return {
            "active": self.active,
            "merged": self.merged,
            "stats": dict(self.stats),
            "slots": {
                s: {"state": self.state[s], "name": self.name[s], "refs": self.refs[s]}
                for s in self.state
            },
        }


def _outcome(call):
    try:
        return call()
    except LoRAError as error:
        return type(error)


NAMES = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_follow_the_model(seed):
    rng = random.Random(seed)
    capacity = 3
    t, m = CheckedTable(capacity), Model(capacity)
    held, reserved, clearing = [], [], []
    counts = {}

    def both(op, *args):
        got = _outcome(lambda: getattr(t, op)(*args))
        want = _outcome(lambda: getattr(m, op)(*args))
        assert got == want, (op, args)
        counts[op, isinstance(got, type)] = counts.get((op, isinstance(got, type)), 0) + 1
        return got

    for step in range(3000):
        op = rng.choice(
            ["reserve", "commit", "commit", "abort", "acquire", "acquire", "release", "release"]
            + ["unload", "pin", "unpin", "take_dirty", "cleared", "activate"]
        )
        some_name = rng.choice([*NAMES, OFF, "ghost"])
        if op == "reserve":
            r = both("reserve")
            if isinstance(r, Reservation):
                reserved.append(r.slot)
        elif op == "commit" and reserved:
            slot = rng.choice(reserved)
            name = rng.choice([*NAMES, *NAMES, "", OFF])
            if both("commit", name, slot) is None:
                reserved.remove(slot)
        elif op == "abort" and reserved:
            slot = reserved.pop(rng.randrange(len(reserved)))
            both("abort", slot)
        elif op == "acquire":
            names = [rng.choice([*NAMES, *NAMES, OFF, "ghost"]) for _ in range(rng.randint(1, 3))]
            slots = both("acquire", names)
            if isinstance(slots, list):
                held.append(slots)
        elif op == "release" and held:
            both("release", held.pop(rng.randrange(len(held))))
        elif op in ("unload", "pin", "activate"):
            both(op, some_name)
        elif op == "unpin":
            both("unpin")
        elif op == "take_dirty":
            clearing.extend(both("take_dirty"))
        elif op == "cleared" and clearing:
            done = rng.sample(clearing, rng.randint(1, len(clearing)))
            both("cleared", done)
            clearing = [s for s in clearing if s not in done]
        assert t.snapshot() == m.snapshot(), step

    # The random walk must have reached every outcome worth testing.
    for key in [
        ("reserve", False),
        ("reserve", True),
        ("commit", False),
        ("commit", True),
        ("acquire", True),
        ("unload", False),
        ("unload", True),
        ("pin", False),
        ("pin", True),
        ("unpin", False),
    ]:
        assert counts.get(key, 0) > 5, key
    assert t.stats["evictions"] > 10

    # Everything released, every slot comes back.
    for slots in held:
        t.release(slots)
    for slot in reserved:
        t.abort(slot)
    t.cleared(clearing)
    if t.merged is not None:
        t.unpin()
    assert all(v == 0 for v in refs(t).values())
    recover_all(t)
    assert [t.reserve() for _ in range(capacity)] == [Reservation(s, None) for s in (1, 2, 3)]


# ---- threads -------------------------------------------------------------------


def test_threads_lose_no_slot_and_never_share_one():
    capacity, threads, steps = 4, 8, 200
    t = CheckedTable(capacity)
    guard = threading.Lock()
    in_use = dict.fromkeys(range(1, capacity + 1), 0)  # requests running per slot
    owned = set()  # slots reserved or being zeroed by some thread
    failures, requests = [], []

    def claim(slots):
        """Records slots a thread now owns; none may be used or owned already."""
        with guard:
            for s in slots:
                assert s not in owned and in_use[s] == 0, (s, owned, in_use)
                owned.add(s)

    def disown(slots):
        with guard:
            owned.difference_update(slots)

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(steps):
                op = rng.choice(["load", "load", "request", "request", "unload", "merge", "zero"])
                name = rng.choice(NAMES)
                try:
                    if op == "load":
                        r = t.reserve(timeout=rng.choice([0.0, 0.001]))
                        claim([r.slot])
                        disown([r.slot])  # before the table lets go of it
                        if rng.random() < 0.2:
                            t.abort(r.slot)
                        else:
                            try:
                                t.commit(name, r.slot)
                            except MergeStateError:
                                t.abort(r.slot)
                    elif op == "request":
                        with t.using([name, OFF]) as slots:
                            with guard:
                                assert slots[0] not in owned, (slots, owned)
                                in_use[slots[0]] += 1
                            info = t.snapshot()["slots"][slots[0]]
                            assert info["state"] in ("live", "retired"), info
                            assert info["name"] == name and info["refs"] > 0, info
                            time.sleep(0)
                            with guard:
                                in_use[slots[0]] -= 1
                                requests.append(slots[0])
                    elif op == "unload":
                        t.unload(name)
                    elif op == "merge":
                        slot = t.pin(name)
                        info = t.snapshot()
                        assert info["merged"] == name, info
                        assert info["slots"][slot]["state"] == "live", info
                        time.sleep(0)
                        assert t.unpin() == name  # nobody else unpins what this thread pinned
                    else:
                        slots = t.take_dirty()
                        claim(slots)
                        disown(slots)
                        t.cleared(slots)
                    if rng.random() < 0.1:
                        t.activate(rng.choice([*t.names(), OFF]))
                except (AdapterNotLoadedError, MergeStateError, PoolFullError):
                    pass
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so operations interleave
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    t.check_invariants()
    snap = t.snapshot()
    assert snap["merged"] is None
    assert all(v["refs"] == 0 for v in snap["slots"].values())
    assert all(v["state"] in ("live", "dirty", "free") for v in snap["slots"].values()), snap
    assert snap["stats"]["loads"] > 50 and snap["stats"]["evictions"] > 10
    assert len(requests) > 100
    recover_all(t)
    assert sorted(t.reserve().slot for _ in range(capacity)) == [1, 2, 3, 4]
