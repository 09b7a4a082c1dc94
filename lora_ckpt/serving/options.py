"""The options of ``lora-ckpt serve``: one frozen dataclass from the command's
flags to the app, the service state and every Ray replica.

Each field carries its default and help text (PEFT's typed-config habit), so
the flags of ``lora-ckpt serve`` are made from the fields
(:func:`add_service_arguments`) and read back into one object
(:meth:`ServiceOptions.from_namespace`): a new option is one field here.

Every flag can also be set by an environment variable named after it,
``LORA_CKPT_<FLAG>`` (``--capacity`` is ``LORA_CKPT_CAPACITY``, ``--ray`` is
``LORA_CKPT_RAY=1``): the variable replaces the field's default, a flag on
the command line wins over both.

Plain Python (no TensorFlow, no web framework): the CLI builds its parser
from this module before it knows which command runs.
"""

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

from ..errors import LoRAConfigError
from .auth import is_loopback

__all__ = ["ServiceOptions", "add_service_arguments"]


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
"""uvicorn's log levels."""
LOG_FORMATS = ("text", "json")
ENV_PREFIX = "LORA_CKPT_"
"""``LORA_CKPT_<FLAG>``: the environment variable of each flag of ``serve``."""
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_SCALE = "scaling out (Ray Serve; needs the scale extra: pip install 'lora_ckpt[scale]')"


def _option(default, help: str, **metadata):
    """A field with its help text; ``metadata`` may say ``flag`` (another
    spelling than ``--field-name``), ``cli=False`` (no flag), ``hidden``,
    ``group``, ``env`` (an environment variable giving the default), ``metavar``."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class ServiceOptions:
    """How the service runs: the model, the pool, request limits, the HTTP
    server and (with ``ray``) the Ray Serve deployment.

    Every field is validated on construction, so a bad value fails before
    any model is built.

    Raises:
        LoRAConfigError: For a value out of its range, naming the field and its flag.
    """

    model_name: str | None = _option(
        None, "tfimm model name (default: the store's base.json)", flag="--model"
    )
    base_weights: str | None = _option(None, "base weights file (default: STORE/base.h5)")
    host: str = _option("127.0.0.1", "address to bind (default: loopback)")
    port: int = _option(8080, "port to bind")
    capacity: int = _option(8, "adapters resident at once")
    max_rank: int | None = _option(None, "largest adapter rank served")
    max_classes: int | None = _option(None, "widest adapter head (default: the base's)")
    max_body_bytes: int = _option(4 << 20, "larger request bodies get 413")
    max_pixels: int = _option(4096 * 4096, "larger images get 413, before decoding")
    request_timeout: float = _option(30.0, "seconds a request body may take")
    queue_timeout: float = _option(
        10.0, "seconds a request waits for a slot when every slot is busy (then 503)"
    )
    load_timeout: float = _option(30.0, "seconds an adapter load may take (504)")
    timeout_keep_alive: int = _option(5, "seconds an idle connection stays open")
    limit_concurrency: int = _option(256, "connections and tasks at once; more get 503")
    header_timeout: float = _option(
        10.0, "seconds a connection may take to send its request line and headers (then closed)"
    )
    drain_timeout: float = _option(
        30.0, "seconds SIGTERM waits for accepted requests to be answered before exiting"
    )
    preload_adapters: tuple[str, ...] = _option(
        (),
        "adapters (comma-separated) loaded before /ready answers 200; one that fails stops serve",
        flag="--preload",
    )
    pin: tuple[str, ...] = _option(
        (), "adapters (comma-separated) loaded at start and never evicted (fewer than --capacity)"
    )
    startup_delay: float = _option(
        0.0, "seconds to wait before loading the base (readiness probes)", hidden=True
    )
    ray: bool = _option(
        False,
        "serve through Ray Serve: replicas with adapters multiplexed by name",
        group=_SCALE,
    )
    replicas: int = _option(2, "replicas with --ray (default 2)", group=_SCALE)
    address: str | None = _option(
        None,
        "a Ray cluster to join ('auto', HEAD:6379); default: start a local one",
        group=_SCALE,
    )
    num_cpus: int | None = _option(
        None, "CPUs of the local Ray cluster (default: all)", group=_SCALE
    )
    replica_cpus: float | None = _option(None, "Ray CPUs reserved per replica", group=_SCALE)
    log_level: str = _option(
        "warning", "log level (the access log is at info, shown unless error or critical)"
    )
    log_format: str = _option("text", "log lines as text or json (time, level, logger, request id)")
    auth: str | None = _option(
        None,
        "API keys: a JSON file of SHA-256 digests, tenants, adapter globs, admin "
        "flags and quotas; re-read on SIGHUP (also LORA_CKPT_AUTH_FILE)",
        env="LORA_CKPT_AUTH_FILE",
        metavar="FILE",
    )
    insecure: bool = _option(
        False, "serve a non-loopback --host without --auth (anyone reaching it may do anything)"
    )
    public_metrics: bool = _option(False, "with --auth, GET /metrics needs no key")
    # Not flags: settings of the library's own callers and tests.
    preload: bool = _option(True, "load the store's adapters (up to capacity) at start", cli=False)
    max_instances: int = _option(64, "most samples in one TF Serving :predict", cli=False)
    max_batch: int = _option(8, "the largest batch of the dynamic batcher", cli=False)
    max_wait: float = _option(0.005, "seconds a batch waits for company", cli=False)
    top_k: int = _option(5, "classes with probabilities in each answer", cli=False)

    def __post_init__(self):
        for name in ("capacity", "max_body_bytes", "max_pixels", "limit_concurrency"):
            _check_int(self, name, minimum=1)
        for name in ("replicas", "max_instances", "max_batch", "top_k"):
            _check_int(self, name, minimum=1)
        for name in ("max_rank", "max_classes", "num_cpus"):
            _check_int(self, name, minimum=1, optional=True)
        _check_int(self, "port", minimum=0, maximum=65535)
        _check_int(self, "timeout_keep_alive", minimum=0)
        for name in ("request_timeout", "queue_timeout", "load_timeout", "header_timeout"):
            _check_number(self, name, positive=True)
        _check_number(self, "drain_timeout", positive=False)
        for name in ("startup_delay", "max_wait"):
            _check_number(self, name, positive=False)
        _check_number(self, "replica_cpus", positive=False, optional=True)
        for name in ("model_name", "base_weights", "address", "auth"):
            _check_text(self, name, optional=True)
        _check_text(self, "host")
        for name in ("ray", "preload", "insecure", "public_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, "must be True or False", getattr(self, name))
        if self.auth is None and not self.insecure and not is_loopback(self.host):
            raise LoRAConfigError(
                f"host (--host) {self.host!r} is not loopback and there are no API keys: "
                "give --auth FILE (or LORA_CKPT_AUTH_FILE), or --insecure to serve it open."
            )
        if not isinstance(self.log_level, str) or self.log_level.lower() not in LOG_LEVELS:
            raise _invalid("log_level", f"must be one of {', '.join(LOG_LEVELS)}", self.log_level)
        # uvicorn looks levels up in lower case only.
        object.__setattr__(self, "log_level", self.log_level.lower())
        if not isinstance(self.log_format, str) or self.log_format.lower() not in LOG_FORMATS:
            raise _invalid(
                "log_format", f"must be one of {', '.join(LOG_FORMATS)}", self.log_format
            )
        object.__setattr__(self, "log_format", self.log_format.lower())
        for name in ("preload_adapters", "pin"):
            object.__setattr__(self, name, _check_names(self, name))
        if len(self.pin) >= self.capacity:
            raise _invalid(
                "pin", f"must name fewer adapters than --capacity ({self.capacity})", self.pin
            )
        if len(self.startup_adapters) > self.capacity:
            raise _invalid(
                "preload_adapters",
                f"and --pin together must name at most --capacity ({self.capacity}) adapters",
                self.preload_adapters,
            )

    @property
    def startup_adapters(self) -> tuple[str, ...]:
        """The adapters loaded before ``/ready`` answers 200: ``--pin`` then ``--preload``."""
        return tuple(dict.fromkeys(self.pin + self.preload_adapters))

    @property
    def call_timeout(self) -> float:
        """Seconds the Ray ingress waits for a replica: a body, a wait for a
        slot and a load may all come before the answer."""
        return self.request_timeout + self.queue_timeout + self.load_timeout

    @property
    def verbose(self) -> bool:
        """Whether the log level asks for workers' logs too (Ray)."""
        return self.log_level in ("debug", "info", "trace")

    def replace(self, **changes) -> "ServiceOptions":
        """A copy with ``changes`` (validated again).

        Raises:
            LoRAConfigError: For a bad value.
            TypeError: For a name that is not a field.
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "ServiceOptions":
        """The options from arguments parsed by a parser that
        :func:`add_service_arguments` set up (other attributes are ignored).

        Raises:
            LoRAConfigError: For a bad value (an environment variable's too, named).
        """
        values = {f.name: getattr(namespace, f.name) for f in _flag_fields()}
        for value in values.values():
            if isinstance(value, _BadVariable):
                raise LoRAConfigError(value.message)
        return cls(**values)


class _BadVariable:
    """The default of a flag whose environment variable does not parse: the
    error is raised when ``serve`` runs, not when any command builds its parser."""

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return "<invalid>"


def _environment_variable(option: dataclasses.Field) -> str:
    """``LORA_CKPT_<FLAG>`` (or the field's own ``env``): a flag's environment variable."""
    return option.metadata.get("env") or ENV_PREFIX + _flag(option)[2:].upper().replace("-", "_")


def _from_environment(option: dataclasses.Field, environ):
    """The field's default, or the value of its environment variable if set."""
    variable = _environment_variable(option)
    text = environ.get(variable)
    if text is None:
        return option.default
    kind = _scalar_type(option.type)
    try:
        if kind is bool:
            if text.strip().lower() not in _TRUE + _FALSE:
                raise ValueError("not a boolean (1/0, true/false, yes/no)")
            return text.strip().lower() in _TRUE
        return _converter(kind)(text)
    except (ValueError, TypeError) as exc:
        return _BadVariable(f"{variable}={text!r} is not a valid {_flag(option)}: {exc}.")


def _names(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _converter(kind):
    return _names if kind == tuple[str, ...] else kind


def add_service_arguments(parser: argparse.ArgumentParser, environ=None) -> None:
    """Adds one flag per :class:`ServiceOptions` field (those that are flags),
    with the field's default and help, in the fields' order; a flag's
    ``LORA_CKPT_<FLAG>`` variable, if set, replaces its default.

    Args:
        parser: The ``serve`` command's parser.
        environ: The environment (default: ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    groups = {}  # title -> argument group
    for option in _flag_fields():
        target = parser
        if "group" in option.metadata:
            group = option.metadata["group"]
            target = groups.get(group) or groups.setdefault(group, parser.add_argument_group(group))
        help_text = argparse.SUPPRESS
        if not option.metadata.get("hidden"):
            help_text = f"{option.metadata['help']} [env {_environment_variable(option)}]"
        kind = _scalar_type(option.type)
        default = _from_environment(option, environ)
        if kind is bool:
            target.add_argument(
                _flag(option),
                dest=option.name,
                action="store_true",
                default=default,
                help=help_text,
            )
        else:
            flag = _flag(option)
            target.add_argument(
                flag,
                dest=option.name,
                # --model MODEL, not MODEL_NAME; or the field's own (--auth FILE)
                metavar=option.metadata.get("metavar") or flag[2:].upper().replace("-", "_"),
                type=_converter(kind),
                default=default,
                help=help_text,
            )


def _flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ServiceOptions) if f.metadata.get("cli", True)]


def _flag(option: dataclasses.Field) -> str:
    return option.metadata.get("flag") or "--" + option.name.replace("_", "-")


def _scalar_type(annotation):
    """``int`` of ``int | None`` (argparse converts to the scalar)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _invalid(name: str, rule: str, value) -> LoRAConfigError:
    option = next(f for f in dataclasses.fields(ServiceOptions) if f.name == name)
    flag = f" ({_flag(option)})" if option.metadata.get("cli", True) else ""
    return LoRAConfigError(f"{name}{flag} {rule}, got {value!r}.")


def _check_int(options, name, *, minimum, maximum=None, optional=False) -> None:
    value = getattr(options, name)
    if value is None and optional:
        return
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not in_range or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise _invalid(name, f"must be an integer >= {minimum}{upper}", value)


def _check_number(options, name, *, positive, optional=False) -> None:
    value = getattr(options, name)
    if value is None and optional:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise _invalid(name, f"must be a finite number {'> 0' if positive else '>= 0'}", value)


def _check_names(options, name) -> tuple[str, ...]:
    value = getattr(options, name)
    if isinstance(value, str):
        value = _names(value)
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and _NAME.fullmatch(v) for v in value
    ):
        raise _invalid(name, "must be adapter names (letters, digits, '_', '.', '-')", value)
    if len(set(value)) != len(value):
        raise _invalid(name, "names an adapter twice", value)
    return tuple(value)


def _check_text(options, name, *, optional=False) -> None:
    value = getattr(options, name)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise _invalid(name, "must be a non-empty string", value)
