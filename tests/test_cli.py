"""The ``lora-ckpt`` parser: one function per command, parent parsers for
shared flags, every command parsing as it always has; serve flags become one
ServiceOptions. In process, no command is run (except one that fails at once)."""

import inspect

import pytest

from lora_ckpt import cli, cli_store
from lora_ckpt.serving.options import ServiceOptions

COMMANDS = ("demo", "serve", "inspect", "list", "export", "gc", "combine")


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_every_command_has_its_own_parser_function_and_build_parser_is_short():
    for command in COMMANDS:
        found = getattr(cli, f"_add_{command}_parser", None) or getattr(
            cli_store, f"add_{command}_parser", None
        )
        assert callable(found), command
    assert len(inspect.getsource(cli.build_parser).splitlines()) < 25


def test_store_flag_is_shared_with_its_default():
    for command in ("demo", "serve"):
        assert parse(command).store == cli.DEFAULT_STORE
        assert parse(command, "--store", "s3://b/p").store == "s3://b/p"
    export = parse("export", "--adapter", "a", "--out", "o")
    assert export.store == cli.DEFAULT_STORE and export.base is None and export.model is None


def test_commands_parse_as_before():
    demo = parse("demo", "--quick")
    assert demo.quick and demo.run is cli._demo
    listing = parse("list", "somewhere", "--json")
    assert listing.store == "somewhere" and listing.json and listing.run is cli_store._list
    assert parse("list").store == cli.DEFAULT_STORE and not parse("list").json
    inspected = parse("inspect", "path/a", "--json")
    assert inspected.adapter == "path/a" and inspected.json
    export = parse(
        "export", "--store", "s", "--base", "b.h5", "--model", "m", "--adapter", "a",
        "--out", "o", "--tf-serving", "--version", "3", "--with-preprocessing",
    )  # fmt: skip
    assert (export.store, export.base, export.model, export.adapter, export.out) == (
        "s", "b.h5", "m", "a", "o",
    )  # fmt: skip
    assert export.tf_serving and export.version == 3 and export.with_preprocessing
    assert parse("gc").store == cli.DEFAULT_STORE and parse("gc", "x").store == "x"
    combine = parse("combine", "out", "a", "b", "--weights", "0.5", "1", "--method", "svd")
    assert combine.sources == ["a", "b"] and combine.weights == [0.5, 1.0]
    assert combine.method == "svd" and combine.rank is None and not combine.overwrite
    with pytest.raises(SystemExit):
        parse("export", "--out", "o")  # --adapter is required


def test_serve_flags_become_one_options_object():
    args = parse(
        "serve", "--store", "s", "--model", "m", "--port", "9000", "--capacity", "3",
        "--ray", "--replicas", "4", "--num-cpus", "2", "--startup-delay", "1.5",
    )  # fmt: skip
    options = ServiceOptions.from_namespace(args)
    assert options == ServiceOptions(
        model_name="m", port=9000, capacity=3, ray=True, replicas=4, num_cpus=2, startup_delay=1.5
    )
    assert ServiceOptions.from_namespace(parse("serve")) == ServiceOptions()


def test_a_bad_serve_option_exits_1_with_the_flag_named(capsys):
    assert cli.main(["serve", "--capacity", "0", "--store", "nowhere"]) == 1
    assert (
        "lora-ckpt serve: capacity (--capacity) must be an integer >= 1" in capsys.readouterr().err
    )
