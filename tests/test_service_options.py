"""ServiceOptions: the one options object of ``lora-ckpt serve``, from its flags
to the replicas. Plain Python: no model, no server."""

import argparse
import dataclasses
import pickle

import pytest

from lora_ckpt.errors import LoRAConfigError
from lora_ckpt.serving.options import ServiceOptions, add_service_arguments


def parse(*argv: str) -> ServiceOptions:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    return ServiceOptions.from_namespace(parser.parse_args(list(argv)))


def test_flags_default_to_the_fields_defaults():
    assert parse() == ServiceOptions()


def test_every_flag_of_serve_keeps_its_name_and_default():
    # The flags and defaults of `lora-ckpt serve` before the options were a dataclass.
    expected = {
        "--model": None,
        "--base-weights": None,
        "--host": "127.0.0.1",
        "--port": 8080,
        "--capacity": 8,
        "--max-rank": None,
        "--max-classes": None,
        "--max-body-bytes": 4 << 20,
        "--max-pixels": 4096 * 4096,
        "--request-timeout": 30.0,
        "--queue-timeout": 10.0,
        "--load-timeout": 30.0,
        "--timeout-keep-alive": 5,
        "--limit-concurrency": 256,
        "--header-timeout": 10.0,
        "--drain-timeout": 30.0,
        "--preload": (),
        "--pin": (),
        "--startup-delay": 0.0,
        "--ray": False,
        "--replicas": 2,
        "--address": None,
        "--num-cpus": None,
        "--replica-cpus": None,
        "--log-level": "warning",
        "--log-format": "text",
        "--auth": None,
        "--insecure": False,
        "--public-metrics": False,
    }
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings[0] != "-h"}
    assert set(actions) == set(expected)
    assert {flag: action.default for flag, action in actions.items()} == expected
    assert actions["--startup-delay"].help == argparse.SUPPRESS


def test_flags_reach_the_fields_with_their_types():
    options = parse(
        "--model", "convnext_atto", "--capacity", "3", "--max-rank", "4",
        "--queue-timeout", "2.5", "--ray", "--replica-cpus", "0.5", "--log-level", "INFO",
    )  # fmt: skip
    assert options.model_name == "convnext_atto"
    assert options.capacity == 3 and options.max_rank == 4
    assert options.queue_timeout == 2.5 and options.ray is True
    assert options.replica_cpus == 0.5
    assert options.log_level == "info" and options.verbose


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"capacity": 0}, "capacity (--capacity) must be an integer >= 1, got 0"),
        ({"capacity": True}, "capacity (--capacity)"),
        ({"port": 70000}, "<= 65535"),
        ({"max_rank": 0}, "max_rank (--max-rank)"),
        ({"queue_timeout": 0}, "queue_timeout (--queue-timeout) must be a finite number > 0"),
        ({"load_timeout": float("inf")}, "finite"),
        ({"startup_delay": -1}, ">= 0"),
        ({"max_batch": 0}, "max_batch must be an integer >= 1"),
        ({"log_level": "loud"}, "log_level (--log-level) must be one of"),
        ({"host": ""}, "host (--host) must be a non-empty string"),
        ({"ray": "yes"}, "ray (--ray) must be True or False"),
    ],
)
def test_a_bad_value_fails_with_its_field_and_flag(changes, words):
    with pytest.raises(LoRAConfigError) as info:
        ServiceOptions(**changes)
    assert words in str(info.value)


def test_a_bad_flag_value_fails_at_once():
    with pytest.raises(LoRAConfigError, match="capacity"):
        parse("--capacity", "0")


def test_options_are_frozen_picklable_and_replaced_with_checks():
    options = ServiceOptions(capacity=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.capacity = 3
    assert pickle.loads(pickle.dumps(options)) == options  # what Ray sends to replicas
    assert options.replace(preload=False).preload is False
    with pytest.raises(LoRAConfigError):
        options.replace(capacity=-1)
    with pytest.raises(TypeError):
        options.replace(no_such_option=1)


def test_call_timeout_covers_a_body_a_slot_wait_and_a_load():
    options = ServiceOptions(request_timeout=1.0, queue_timeout=2.0, load_timeout=4.0)
    assert options.call_timeout == 7.0


def test_every_field_documents_itself():
    for option in dataclasses.fields(ServiceOptions):
        assert option.metadata.get("help"), option.name


def test_every_flag_is_also_an_environment_variable():
    parser = argparse.ArgumentParser()
    add_service_arguments(
        parser,
        {
            "LORA_CKPT_CAPACITY": "4",
            "LORA_CKPT_MODEL": "convnext_atto",
            "LORA_CKPT_RAY": "true",
            "LORA_CKPT_PIN": "a0, a1",
            "LORA_CKPT_DRAIN_TIMEOUT": "2.5",
            "LORA_CKPT_LOG_FORMAT": "JSON",
            "LORA_CKPT_UNRELATED": "x",
        },
    )
    options = ServiceOptions.from_namespace(parser.parse_args([]))
    assert (options.capacity, options.model_name, options.ray) == (4, "convnext_atto", True)
    assert options.pin == ("a0", "a1") and options.drain_timeout == 2.5
    assert options.log_format == "json"
    flagged = ServiceOptions.from_namespace(parser.parse_args(["--capacity", "6"]))
    assert flagged.capacity == 6  # the command line wins over the environment
    # Every flag has its variable, named after the flag, documented in --help.
    for action in parser._actions:
        if action.option_strings[0] not in ("-h",) and action.help != argparse.SUPPRESS:
            variable = "LORA_CKPT_" + action.option_strings[0][2:].upper().replace("-", "_")
            assert variable in action.help, action.option_strings


@pytest.mark.parametrize(
    "variable, value, words",
    [
        ("LORA_CKPT_CAPACITY", "four", "LORA_CKPT_CAPACITY='four' is not a valid --capacity"),
        ("LORA_CKPT_CAPACITY", "0", "capacity (--capacity) must be an integer >= 1, got 0"),
        ("LORA_CKPT_RAY", "maybe", "LORA_CKPT_RAY='maybe' is not a valid --ray"),
    ],
)
def test_a_bad_environment_variable_fails_when_serve_runs_naming_it(variable, value, words):
    parser = argparse.ArgumentParser()
    add_service_arguments(parser, {variable: value})  # building the parser never fails
    with pytest.raises(LoRAConfigError) as info:
        ServiceOptions.from_namespace(parser.parse_args([]))
    assert words in str(info.value)


def test_pinned_and_preloaded_adapters_fit_the_pool():
    options = parse("--capacity", "3", "--pin", "a,b", "--preload", "b,c")
    assert options.pin == ("a", "b") and options.startup_adapters == ("a", "b", "c")
    with pytest.raises(LoRAConfigError, match="fewer adapters than --capacity"):
        ServiceOptions(capacity=2, pin=("a", "b"))
    with pytest.raises(LoRAConfigError, match="at most --capacity"):
        ServiceOptions(capacity=2, pin=("a",), preload_adapters=("b", "c"))
    for bad in (("../x",), ("a", "a"), ("",)):
        with pytest.raises(LoRAConfigError, match="pin"):
            ServiceOptions(pin=bad)
