"""API keys, tenants and quotas (lora_ckpt.serving.auth): plain Python, a
fake clock, no server and no TensorFlow."""

import argparse
import hashlib
import json
import logging
import os
import signal

import pytest

from lora_ckpt.errors import LoRAConfigError
from lora_ckpt.serving.auth import (
    Gate,
    KeyFile,
    KeyTable,
    Refusal,
    is_loopback,
    parse_keys,
    presented_key,
)
from lora_ckpt.serving.options import ServiceOptions, add_service_arguments
from lora_ckpt.serving.quotas import OverQuota, Quotas, TokenBucket


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()  # independent of auth.key_digest


def entry(key: str, **fields) -> dict:
    return {"sha256": sha(key), "tenant": "acme", "adapters": ["color", "acme-*"], **fields}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def write(path, *entries) -> str:
    path.write_text(json.dumps({"keys": list(entries)}))
    return str(path)


def test_the_issues_example_entry_parses_with_its_fields():
    example = {
        "keys": [
            {
                "sha256": sha("k1"),
                "tenant": "acme",
                "adapters": ["color", "acme-*"],
                "admin": False,
                "rate": 20,
                "burst": 40,
                "concurrency": 8,
            }
        ]
    }
    (key,) = parse_keys(example)
    assert key.tenant == "acme" and key.adapters == ("color", "acme-*") and not key.admin
    assert (key.rate, key.burst, key.concurrency) == (20.0, 40, 8)
    assert key.digest == hashlib.sha256(b"k1").digest()
    assert sha("k1") not in repr(key) and key.digest.hex() not in repr(key)


def test_a_key_is_found_by_its_digest_only():
    table = KeyTable(parse_keys({"keys": [entry("k1"), entry("k2", tenant="beta")]}))
    assert table.find("k2").tenant == "beta"
    assert table.find("k1").tenant == "acme"
    assert table.find("k3") is None
    assert table.find(sha("k1")) is None  # the digest itself is not a key


def test_globs_decide_which_adapters_exist_for_a_key():
    (key,) = parse_keys({"keys": [entry("k")]})
    assert key.allows("color") and key.allows("acme-dogs")
    assert not key.allows("colors") and not key.allows("ACME-dogs") and not key.allows("off")
    (everything,) = parse_keys({"keys": [entry("k", adapters=["*"])]})
    assert everything.allows("off") and everything.allows("beta-x")


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"sha256": "abc"}, "keys[0].sha256 must be 64 hex digits"),
        ({"sha256": "z" * 64}, "64 hex digits"),
        ({"tenant": ""}, "keys[0].tenant"),
        ({"adapters": "color"}, "keys[0].adapters must be a list"),
        ({"admin": "yes"}, "keys[0].admin"),
        ({"rate": 0}, "keys[0].rate"),
        ({"rate": True}, "keys[0].rate"),
        ({"burst": 0, "rate": 1}, "keys[0].burst"),
        ({"burst": 5}, "burst needs a rate"),
        ({"concurrency": 1.5}, "keys[0].concurrency"),
        ({"secret": "x"}, "unknown fields ['secret']"),
    ],
)
def test_a_bad_entry_names_its_place_and_never_a_digest(bad, words):
    with pytest.raises(LoRAConfigError) as info:
        parse_keys({"keys": [{**entry("k"), **bad}]})
    assert words in str(info.value) and sha("k") not in str(info.value)


def test_a_repeated_digest_and_other_documents_are_refused():
    with pytest.raises(LoRAConfigError, match="repeats"):
        parse_keys({"keys": [entry("k"), entry("k", tenant="other")]})
    for document in ([], {"keys": {}}, {"keys": [], "extra": 1}):
        with pytest.raises(LoRAConfigError):
            parse_keys(document)


def test_bearer_and_x_api_key_headers():
    assert presented_key("Bearer abc", None) == "abc"
    assert presented_key("bearer  abc ", None) == "abc"
    assert presented_key(None, "xyz") == "xyz"
    assert presented_key("Basic dXNlcg==", "xyz") == "xyz"
    assert presented_key("Bearer ", None) is None and presented_key(None, None) is None


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token every 1/2 s
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert [bucket.take(100.0) for _ in range(4)][-1] > 0  # never more than the burst


def test_quotas_refuse_over_the_rate_with_retry_after_from_the_refill():
    clock = Clock()
    (key,) = parse_keys({"keys": [entry("k", rate=0.5, burst=2)]})
    quotas = Quotas(clock)
    for _ in range(2):
        with quotas.admit(key):
            pass
    with pytest.raises(OverQuota) as info:
        quotas.admit(key)
    assert info.value.retry_after == 2 and "acme" in info.value.message  # a token per 2 s
    clock.now += 2.0
    with quotas.admit(key):
        pass


def test_quotas_count_requests_in_flight_per_key():
    (key, other) = parse_keys({"keys": [entry("k", concurrency=2), entry("o", concurrency=1)]})
    quotas = Quotas(Clock())
    first, second = quotas.admit(key), quotas.admit(key)
    with pytest.raises(OverQuota) as info:
        quotas.admit(key)
    assert info.value.retry_after == 1
    with quotas.admit(other):  # another key's count is its own
        assert quotas.in_flight(other) == 1
    with first:
        pass
    with first:  # leaving twice releases once
        pass
    assert quotas.in_flight(key) == 1
    with quotas.admit(key):
        assert quotas.in_flight(key) == 2
    with second:
        pass
    assert quotas.in_flight(key) == 0


def test_the_gate_answers_401_403_and_429_in_that_order(tmp_path):
    path = write(
        tmp_path / "keys.json",
        entry("user", rate=1, burst=1),
        entry("root", tenant="ops", adapters=["*"], admin=True),
    )
    gate = Gate(KeyFile(path), clock=Clock())
    for headers in ((None, None), ("Bearer nope", None), (None, "x" * 10_000)):
        with pytest.raises(Refusal) as info:
            gate.authenticate(*headers)
        assert info.value.status == 401 and "www-authenticate" in info.value.headers
    user = gate.authenticate("Bearer user", None)
    assert gate.authenticate(None, "root").admin
    with pytest.raises(Refusal) as info:
        gate.admit(user, admin=True)
    assert info.value.status == 403
    with gate.admit(user, admin=False):
        pass
    with pytest.raises(Refusal) as info:
        gate.admit(user, admin=False)
    assert info.value.status == 429 and info.value.headers == {"retry-after": "1"}


def test_the_key_file_is_read_again_when_it_changes_or_on_sighup(tmp_path, caplog):
    clock = Clock()
    path = write(tmp_path / "keys.json", entry("old"))
    keys = KeyFile(path, clock=clock)
    assert keys.current().find("old") is not None
    write(tmp_path / "keys.json", entry("new", tenant="beta"), entry("other", tenant="gamma"))
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert keys.current().find("new") is None  # looked at once a second at most
    clock.now += KeyFile.CHECK_EVERY
    assert keys.current().find("new").tenant == "beta" and keys.current().find("old") is None
    # A broken file keeps the previous keys, and says so without any digest.
    with caplog.at_level(logging.INFO, logger="lora_ckpt.serving"):
        (tmp_path / "keys.json").write_text("{not json")
        keys._hangup = True  # what the SIGHUP handler sets
        assert keys.current().find("new") is not None
    assert "not reloaded" in caplog.text
    assert sha("new") not in caplog.text and sha("other") not in caplog.text


def test_sighup_sets_the_reload_flag_in_the_main_thread(tmp_path):
    keys = KeyFile(write(tmp_path / "keys.json", entry("k")))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        assert keys.reload_on_sighup()
        write(tmp_path / "keys.json", entry("k2"))
        os.kill(os.getpid(), signal.SIGHUP)
        assert keys.current().find("k2") is not None
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_missing_or_huge_key_file_fails_at_start(tmp_path):
    with pytest.raises(LoRAConfigError, match="Cannot read the key file"):
        KeyFile(str(tmp_path / "missing.json"))
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (2 << 20))
    with pytest.raises(LoRAConfigError, match="larger than"):
        KeyFile(str(huge))


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.com"]))


def test_without_keys_only_loopback_is_served_unless_insecure():
    with pytest.raises(LoRAConfigError, match="--auth FILE .* or --insecure"):
        ServiceOptions(host="0.0.0.0")
    assert ServiceOptions(host="0.0.0.0", insecure=True).insecure
    assert ServiceOptions(host="0.0.0.0", auth="keys.json").auth == "keys.json"
    assert ServiceOptions(host="::1").auth is None


def test_the_key_file_flag_and_its_environment_variable(monkeypatch):
    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_service_arguments(parser)
        return ServiceOptions.from_namespace(parser.parse_args(list(argv)))

    assert parse("--auth", "k.json", "--public-metrics").auth == "k.json"
    monkeypatch.setenv("LORA_CKPT_AUTH_FILE", "/etc/lora/keys.json")
    assert parse().auth == "/etc/lora/keys.json"
    assert parse("--auth", "other.json").auth == "other.json"
