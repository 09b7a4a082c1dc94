"""Unit tests of the service's one-load-per-name table: pure Python, milliseconds."""

import asyncio
import concurrent.futures
import threading

import pytest

from lora_ckpt.serving.inflight import LoadsInFlight


class InlineExecutor(concurrent.futures.Executor):
    """Runs each load before ``submit`` returns: the fastest load there can be."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def within(seconds, call):
    """``call()``'s result, or a failure if it has not returned after ``seconds``."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlocked"
    return result[0]


@pytest.mark.parametrize("outcome", ["loaded", ValueError("truncated")])
def test_a_load_finished_before_submit_returns_does_not_deadlock(outcome):
    # What stopped the service in CI: a remembered failure is raised at once,
    # and its future's callback ran inside the table's lock.
    def load():
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    loads = LoadsInFlight(InlineExecutor())
    future, started = within(5, lambda: loads.submit("a", load))
    assert started and future.done()
    if isinstance(outcome, Exception):
        assert future.exception() is outcome
    else:
        assert future.result() == outcome
    assert loads.running() == []
    assert within(5, lambda: loads.submit("a", load))[0] is not future


def test_requests_for_a_loading_name_share_its_load():
    release, calls = threading.Event(), []

    def load(name):
        calls.append(name)
        release.wait(5)
        return name

    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        loads = LoadsInFlight(executor)
        first, started = loads.submit("a", load, "a")
        assert started and loads.submit("a", load, "a") == (first, False)
        assert loads.submit("a", load, "a", again=True) == (first, False)  # still running
        other, _ = loads.submit("b", load, "b")
        assert other is not first and loads.running() == ["a", "b"]
        release.set()
        assert (first.result(5), other.result(5)) == ("a", "b")
    assert calls == ["a", "b"]
    assert loads.running() == []


def test_again_starts_a_new_load_once_the_last_one_finished():
    loads = LoadsInFlight(InlineExecutor())
    versions = iter(["v1", "v2"])
    loads._futures["a"] = done = concurrent.futures.Future()  # finished, not yet forgotten
    done.set_result("v0")
    assert loads.submit("a", lambda: next(versions)) == (done, False)
    again, started = within(5, lambda: loads.submit("a", lambda: next(versions), again=True))
    assert started and again.result() == "v1" and loads.running() == []


def test_a_waiter_that_gives_up_leaves_the_load_to_the_others():
    # A request's time limit must not cancel a load other requests wait for
    # (asyncio would cancel a load still queued on the executor).
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        loads = LoadsInFlight(executor)
        executor.submit(release.wait, 5)  # the only loader thread is busy: the load queues

        async def main():
            impatient = asyncio.ensure_future(
                asyncio.wait_for(loads.run("a", lambda: "loaded"), 0.05)
            )
            await asyncio.sleep(0.01)  # its load is queued
            patient = asyncio.ensure_future(loads.run("a", lambda: "another load"))
            outcome = await asyncio.gather(impatient, return_exceptions=True)
            release.set()
            return outcome[0], await asyncio.wait_for(patient, 5)

        impatient, patient = asyncio.run(main())
    assert isinstance(impatient, asyncio.TimeoutError)
    assert patient == "loaded"


def test_a_reload_is_not_answered_by_a_load_that_started_before_it():
    # A load read the store's old copy; a reload asked for after that must
    # read the store again, once that load has finished.
    reading, release, versions = threading.Event(), threading.Event(), iter(["v1", "v2"])

    def load():
        version = next(versions)
        if version == "v1":
            reading.set()
            release.wait(5)
        return version

    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        loads = LoadsInFlight(executor)

        async def main():
            first = asyncio.ensure_future(loads.run("a", load))
            await asyncio.to_thread(reading.wait, 5)
            reload = asyncio.ensure_future(loads.run("a", load, again=True))
            await asyncio.sleep(0.05)
            release.set()
            return await asyncio.wait_for(asyncio.gather(first, reload), 5)

        assert asyncio.run(main()) == ["v1", "v2"]
