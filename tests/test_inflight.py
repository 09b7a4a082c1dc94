"""Unit tests of the service's one-load-per-name table: pure Python, milliseconds."""

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
    future = within(5, lambda: loads.submit("a", load))
    assert future.done()
    if isinstance(outcome, Exception):
        assert future.exception() is outcome
    else:
        assert future.result() == outcome
    assert loads.running() == []
    assert within(5, lambda: loads.submit("a", load)) is not future


def test_requests_for_a_loading_name_share_its_load():
    release, calls = threading.Event(), []

    def load(name):
        calls.append(name)
        release.wait(5)
        return name

    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        loads = LoadsInFlight(executor)
        first = loads.submit("a", load, "a")
        assert loads.submit("a", load, "a") is first
        assert loads.submit("a", load, "a", again=True) is first  # still running: wait for it
        other = loads.submit("b", load, "b")
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
    assert loads.submit("a", lambda: next(versions)) is done
    again = within(5, lambda: loads.submit("a", lambda: next(versions), again=True))
    assert again.result() == "v1" and loads.running() == []
