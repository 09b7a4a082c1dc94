"""A seeded fuzz of every adapter loader (issue 12).

One tiny ConvNeXt adapter (LoRA A/B with non-zero B, LoRA-layer biases and
the classifier head) is copied and mutated: bytes flipped, truncated or
appended in each of its three files; files deleted or replaced by a
directory, a FIFO, a symlink to ``/dev/zero``/``/dev/urandom`` or to another
adapter's file; config fields given wrong JSON types and ranges, hostile
names and prefixes; tensors re-saved through a valid checkpoint with NaN/Inf,
huge finite values, other dtypes, ranks or variable sets. Every case runs
against ``read_lora_state``, ``load_lora_state`` (into one model),
``inspect_adapter``, ``AdapterPool.load`` (into one pool) and
``list_adapters`` over the store that holds it.

The oracle, per case and loader:

- a refusal is a :class:`lora_ckpt.LoRAError`, with the model's variables and
  the pool's slots, names and classes bitwise unchanged;
- a load yields exactly the data the case expects: the original adapter's,
  or, for the cases that re-save a legitimately different adapter through a
  valid checkpoint (a huge finite value, another dtype or rank, a subset of
  the variables), exactly those tensors; NaN/Inf and another base
  identity must be refused by every loader that reads tensors or checks a
  model; a model or pool never casts (a load of tensors of another dtype is a
  silent change);
- ``inspect_adapter`` reads only the config: it must agree with
  ``read_lora_state`` when that loads; ``list_adapters`` never raises, lists
  the case with an ``error`` exactly when ``inspect_adapter`` refuses it, and
  never lists a ``*.tmp-*``/``*.old-*`` work directory;
- never another exception, never a hang: each call runs in a daemon thread
  bounded by ``TIMEOUT`` seconds.

Config edits that load with identical data but another label (``created``,
``metadata``, a layer's ``type``, a variable's ``kind`` between bias and
extra, ``saved.extra_layers``, ...) are legitimate loads and are counted
apart in the printed summary (``pytest -s``). ``LORA_FUZZ_SEED``,
``LORA_FUZZ_CASES`` and ``LORA_FUZZ_FAMILIES`` (comma-separated) rerun other
samples; ``LORA_FUZZ_REPORT=FILE`` writes every failure to ``FILE``.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import AdapterNotFoundError, LoRAError
from lora_ckpt.state.format import nest_variables
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT

CONFIG = "adapter_config.json"
INDEX = "adapter.index"
DATA = "adapter.data-00000-of-00001"
FILES = (CONFIG, INDEX, DATA)
TIMEOUT = 10.0  # seconds per loader call; a healthy call takes milliseconds
RANK = 2
SEED = int(os.environ.get("LORA_FUZZ_SEED", "20261129"))
FULL_CASES = int(os.environ.get("LORA_FUZZ_CASES", "1200"))  # issue 12 asks for 1,000+
FAST_CASES = 60  # the fast lane; the slow lane runs FULL_CASES
# Comma-separated mutation families to draw from only (to hammer one of them).
ONLY = {f for f in os.environ.get("LORA_FUZZ_FAMILIES", "").split(",") if f}
LOADERS = ("read_lora_state", "load_lora_state", "inspect_adapter", "AdapterPool.load")
WORK_MARKERS = (".tmp-", ".old-")
IDENTITY = {("base_model", field) for field in ("architecture", "config", "fingerprint")}


# ---- the world: one model, one pool, one store ------------------------------------------


@dataclasses.dataclass
class World:
    store: str
    model: tf.keras.Model
    pool: lora_ckpt.AdapterPool
    orig: str  # path of the pristine adapter
    other: str  # an adapter of the same base with other values
    orig_files: dict  # name -> bytes
    other_files: dict
    doc: dict  # the pristine config
    tensors: dict  # key -> np.ndarray of the pristine adapter
    other_tensors: dict
    scalings: dict  # LoRA layer path -> scaling
    model_vars: dict  # key -> tf.Variable of the model
    model_baseline: dict  # key -> np.ndarray
    pool_slots: list  # (label, variable, kind, layer path, attribute)
    pool_baseline: list  # np.ndarray per pool slot variable
    pool_names: list
    pool_classes: list
    free_slot: int  # the slot a new adapter goes to
    listing: dict  # name -> list_adapters entry, without the case
    snapshot: Callable = None  # every model and slot variable's bytes, in one call
    baseline_bytes: np.ndarray = None


def _fill(model, seed: int) -> None:
    """Non-zero LoRA A/B, LoRA-layer biases and head: every saved tensor matters."""
    rng = np.random.default_rng(seed)
    variables = named_variables(model)
    keys = ["fc/kernel", "fc/bias"]
    for path, _ in lora_ckpt.lora_layers(model):
        keys += [f"{path}/kernel_lora_a", f"{path}/kernel_lora_b", f"{path}/bias"]
    for key in keys:
        var = variables[key]
        var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))


def _read_files(directory: str) -> dict:
    files = {}
    for name in FILES:
        with open(os.path.join(directory, name), "rb") as handle:
            files[name] = handle.read()
    return files


def _snapshot_pool(pool) -> list:
    return [v.numpy().copy() for _, v, *_ in _pool_slots(pool)]


def _pool_slots(pool) -> list:
    slots = []
    for path, lora in pool._lora.items():
        for attr in ("a", "b", "bias"):
            var = getattr(lora, attr)
            if var is not None:
                slots.append((f"lora:{path}:{attr}", var, "lora", path, attr))
    for path, full in pool._full.items():
        for name, var in full.slots.items():
            slots.append((f"full:{path}:{name}", var, "full", path, name))
    return slots


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    store = str(tmp_path_factory.mktemp("fuzz_store"))
    tf.keras.utils.set_random_seed(11)
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=RANK,
        lora_train_bias="lora_only",
        lora_train_classifier=True,
        **TINY_CONVNEXT,
    )
    # The pool keeps the base biases and head the model has now; the adapters differ.
    pool = lora_ckpt.AdapterPool(model, capacity=2)
    _fill(model, seed=2)
    other = lora_ckpt.save_lora_state(
        model, f"{store}/other", metadata={"task": "other", "epochs": 1}
    )
    _fill(model, seed=1)
    orig = lora_ckpt.save_lora_state(
        model,
        f"{store}/orig",
        metadata={"task": "quadrants", "epochs": 3, "tags": ["fuzz", "ünïcode"], "note": "x" * 40},
    )
    lora_ckpt.load_lora_state(model, orig)
    pool.load("orig", orig)
    pool.activate("orig")

    # Work directories and non-adapters a listing must skip (or recover, for NAME.old-*).
    shutil.copytree(other, f"{store}/orig.tmp-0badc0de")
    shutil.copytree(other, f"{store}/orig.old-0ddba115")
    os.makedirs(f"{store}/ghost.tmp-12345678")
    shutil.copy(f"{orig}/{INDEX}", f"{store}/ghost.tmp-12345678/{INDEX}")
    shutil.copytree(orig, f"{store}/lost.old-89abcdef")  # a save killed between renames
    os.makedirs(f"{store}/empty")
    with open(f"{store}/notes.txt", "w") as handle:
        handle.write("not an adapter\n")
    os.mkfifo(f"{store}/pipe")
    os.mkfifo(f"{store}/pipe.old-00000000")  # leftovers with nothing to recover
    os.makedirs(f"{store}/.old-deadbeef")
    os.makedirs(f"{store}/gone.old-feedface")
    os.symlink("/dev/zero", f"{store}/zero")

    orig_files = _read_files(orig)
    doc = json.loads(orig_files[CONFIG])
    assert (json.dumps(doc, indent=2) + "\n").encode() == orig_files[CONFIG]
    tensors = lora_ckpt.read_lora_state(orig).tensors
    assert any("kernel_lora_b" in k and np.abs(v).min() > 0 for k, v in tensors.items())
    assert {"fc/kernel", "fc/bias"} <= set(tensors)
    model_vars = named_variables(model)
    slot = pool._table.slot_of("orig")
    free = next(s for s in range(1, pool.capacity + 1) if s != slot)
    listing = {entry["name"]: entry for entry in lora_ckpt.list_adapters(store)}
    assert sorted(listing) == ["lost", "orig", "other"], listing
    w = World(
        store=store,
        model=model,
        pool=pool,
        orig=orig,
        other=other,
        orig_files=orig_files,
        other_files=_read_files(other),
        doc=doc,
        tensors=tensors,
        other_tensors=lora_ckpt.read_lora_state(other).tensors,
        scalings={p: layer["scaling"] for p, layer in doc["layers"].items()},
        model_vars=model_vars,
        model_baseline={k: v.numpy().copy() for k, v in model_vars.items()},
        pool_slots=_pool_slots(pool),
        pool_baseline=_snapshot_pool(pool),
        pool_names=pool.names(),
        pool_classes=list(pool._classes),
        free_slot=free,
        listing=listing,
    )
    w.snapshot = _bytes_of([*model_vars.values(), *(var for _, var, *_ in w.pool_slots)])
    w.baseline_bytes = w.snapshot().numpy()
    # The oracle of a pool slot, checked on the pristine adapter itself.
    expected = _expected_slot(w, tensors, w.scalings)
    for (label, var, *_), value in zip(w.pool_slots, expected, strict=True):
        assert _same(var[slot].numpy(), value), label
    yield w
    pool.close()


# ---- comparisons -------------------------------------------------------------------------


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _pad(value: np.ndarray, axis: int, size: int) -> np.ndarray:
    shape = list(value.shape)
    shape[axis] = size
    padded = np.zeros(shape, value.dtype)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, value.shape[axis])
    padded[tuple(index)] = value
    return padded


def _expected_slot(w: World, tensors: dict, scalings: dict) -> list:
    """What a pool slot must hold for an adapter, computed without the pool's code."""
    cleared = [value[w.free_slot] for value in w.pool_baseline]
    values = []
    for (_, var, kind, path, attr), empty in zip(w.pool_slots, cleared, strict=True):
        if kind == "lora":
            a, b = tensors.get(f"{path}/kernel_lora_a"), tensors.get(f"{path}/kernel_lora_b")
            if attr == "a":
                value = empty if a is None else _pad(a, a.ndim - 1, var.shape[-1])
            elif attr == "b":  # the slot keeps scale * B
                scaled = None if b is None else b * np.float32(scalings[path])
                value = empty if b is None else _pad(scaled, 0, var.shape[1])
            else:
                bias = tensors.get(f"{path}/bias")
                value = empty if bias is None else bias
        else:
            own = tensors.get(f"{path}/{attr}")
            value = empty if own is None else _pad(own, own.ndim - 1, var.shape[-1])
        values.append(value)
    return values


def _bytes_of(variables: list) -> Callable:
    """A compiled function returning the bytes of all ``variables``, concatenated:
    a bitwise comparison of ~100 variables in one call instead of one each."""

    def as_bytes(var):
        value = tf.convert_to_tensor(var)
        if value.dtype == tf.bool:
            value = tf.cast(value, tf.uint8)
        return tf.reshape(tf.bitcast(value, tf.uint8), [-1])

    return tf.function(lambda: tf.concat([as_bytes(v) for v in variables], 0))


def _state_changes(w: World) -> list[str]:
    """Names of model variables and pool slot variables that differ from the baseline."""
    same_bytes = np.array_equal(w.snapshot().numpy(), w.baseline_bytes)
    if same_bytes and w.pool.names() == w.pool_names and list(w.pool._classes) == w.pool_classes:
        return []
    changed = [k for k, v in w.model_vars.items() if not _same(v.numpy(), w.model_baseline[k])]
    changed += [
        label
        for (label, var, *_), value in zip(w.pool_slots, w.pool_baseline, strict=True)
        if not _same(var.numpy(), value)
    ]
    if w.pool.names() != w.pool_names:
        changed.append(f"pool.names() {w.pool.names()}")
    if list(w.pool._classes) != w.pool_classes:
        changed.append(f"pool classes {w.pool._classes}")
    return changed or ["the bytes of some variable (not found one by one)"]


def _untouched(w: World, model: bool, pool: bool, except_slot: int | None = None) -> str:
    """What a successful load changed besides its target (the model's LoRA variables,
    or the pool slot it wrote)."""
    problem = ""
    if model:
        for key, var in w.model_vars.items():
            if not _same(var.numpy(), w.model_baseline[key]):
                problem += f"model variable {key} changed. "
    if pool:
        for (label, var, *_), value in zip(w.pool_slots, w.pool_baseline, strict=True):
            now = var.numpy()
            if except_slot is not None:
                now, value = np.delete(now, except_slot, 0), np.delete(value, except_slot, 0)
            if not _same(now, value):
                problem += f"pool slots {label} changed outside the slot written. "
    return problem


def _restore(w: World) -> None:
    for key, var in w.model_vars.items():
        if not _same(var.numpy(), w.model_baseline[key]):
            var.assign(w.model_baseline[key])
    if "fuzz" in w.pool.names():
        w.pool.unload("fuzz")
    for (_, var, *_), value in zip(w.pool_slots, w.pool_baseline, strict=True):
        if not _same(var.numpy(), value):
            var.assign(value)


# ---- bounded calls -----------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    value: object = None
    error: BaseException | None = None
    trace: str = ""
    hang: bool = False
    seconds: float = 0.0


def bounded(fn: Callable, *args, timeout: float = TIMEOUT) -> Outcome:
    """Runs ``fn(*args)`` in a daemon thread; a call still running after ``timeout``
    seconds is a hang (the thread is left behind: the test fails at once)."""
    outcome = Outcome()

    def run():
        try:
            outcome.value = fn(*args)
        except BaseException as exc:  # judged by the caller
            outcome.error = exc
            outcome.trace = traceback.format_exc()

    start = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    outcome.hang = thread.is_alive()
    outcome.seconds = time.perf_counter() - start
    return outcome


# ---- cases and mutations ----------------------------------------------------------------


@dataclasses.dataclass
class Case:
    index: int
    rng: random.Random
    world: World
    dir: str
    doc: dict
    tensors: dict  # what a load must yield
    scalings: dict
    refuse: bool = False  # NaN/Inf: every loader reading tensors must refuse
    families: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    raw: dict = dataclasses.field(default_factory=dict)  # sentinel -> raw JSON text
    text_ops: list = dataclasses.field(default_factory=list)
    dump: dict = dataclasses.field(default_factory=lambda: {"indent": 2})
    config_bytes: bytes | None = None  # the config as written, before file-level damage
    config_replaced: bool = False  # the config file itself was replaced at file level

    def note(self, text: str) -> None:
        self.notes.append(text)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def raw_value(self, container, key, raw: str) -> None:
        sentinel = f"@@RAW{len(self.raw)}@@"
        self.raw[sentinel] = raw
        container[key] = sentinel


MUTATIONS: list = []  # (family, phase, weight, function)


def mutation(family: str, phase: int, weight: float):
    """Phases: 0 valid checkpoint rewrite, 1 JSON document, 2 config text,
    3 bytes of a file, 4 the files themselves, 5 work directories beside them."""

    def register(fn):
        MUTATIONS.append((family, phase, weight, fn))
        return fn

    return register


GENERIC_RAW = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "2",
    "2.0",
    "1000000000",
    "-1000000000",
    "1" + "0" * 400,
    "1" + "0" * 5000,
    "1e308",
    "1e400",
    "-1e400",
    "0.5",
    "-0.0",
    "1e-320",
    "NaN",
    "Infinity",
    "-Infinity",
    '""',
    '"1"',
    '"2"',
    '"NaN"',
    '"adapter"',
    '"../../../../dev/zero"',
    '"/dev/zero"',
    '"\\u0000"',
    '"\\ud800"',
    '"' + "x" * 100_000 + '"',
    "[]",
    "{}",
    "[1, 2]",
    "[null]",
    '{"a": 1}',
    '{"rank": 2}',
    "[" * 30 + "]" * 30,
    "[" * 40 + "]" * 40,
    "[" * 100_000 + "]" * 100_000,
]
FIELD_RAW = {
    "rank": ["0", "1", "3", "-2", "65536", "65537", "1000000000", "2.0", '"2"', "true", "2e0"],
    "alpha": ["0", "-1", "1", "2", "1e-300", "1e300", "1.0000001", "1" + "0" * 400, "0.0"],
    "scaling": [
        "0.6",
        "0.4",
        "5.5",
        "0.05",
        "0.5000003",
        "0.4999997",
        "0.50000001",
        "0.5000000000000001",
        "0",
        "-0.5",
        "1" + "0" * 400,
    ],
    "shape": [
        "[8]",
        "[]",
        "[8, 2, 1]",
        "[2, 8]",
        "[8, -2]",
        "[8, 2.0]",
        "[1000000000, 1000000000]",
    ],
    "dtype": ['"float16"', '"int32"', '"bfloat16"', '"float64"', '"float33"', '""', '"string"'],
    "kind": ['"lora"', '"bias"', '"extra"', '"LORA"', '"weird"'],
    "type": ['"LoRAConv2D"', '"Dense"', '""', '"LoRADense "'],
    "size": ["0", "-1", "1000000000000", "1e3", "1" + "0" * 30, "1" + "0" * 400],
    "sha256": ['""', '"' + "0" * 64 + '"', '"' + "a" * 63 + '"'],
    "prefix": [
        '"../other/adapter"',
        '"/tmp/adapter"',
        '"adapter-deadbeef"',
        '"other"',
        '"adapter/../adapter"',
        '"adapter\\u0000"',
        '"Adapter"',
        '"adapter-DEADBEEF"',
        '"adapter-0"',
    ],
    "fingerprint": ['"sampled-blake2b:"', '"md5:0"', '"sampled-blake2b:0000"'],
    "architecture": ['"tfimm.architectures.vit.ViT"', '"x"'],
    "format": ['"lora_ckpt.adapter2"', '"LORA_CKPT.ADAPTER"'],
    "format_version": ["0", "2", "1.0", '"1"', "999999999999999999999", "true"],
    "extra_layers": ["[]", '["fc", "fc"]', '["nope"]', "[1]", '"fc"'],
    "bias": ['"none"', '"all"', '"lora_only"', '"bogus"', '"LORA_ONLY"'],
    "lora": ["false", '"true"', "1"],
    "created": ['"yesterday"', '""', "0"],
    "library_version": ['"99.0"', '""', "1"],
    "metadata": ["{}", '{"a": {"b": [1, 2, {"c": null}]}}', "[]", '"x"'],
}


def _paths(node, prefix=()) -> list[tuple]:
    """Every path to a value of a JSON document."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((*prefix, key))
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.append((*prefix, i))
            found += _paths(value, (*prefix, i))
    return found


def _parent(doc, path):
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


def _field_name(path) -> str:
    """The schema field a path ends in (list items: their list's name)."""
    for key in reversed(path):
        if isinstance(key, str):
            if path[:1] == ("metadata",):
                return "metadata"
            return key
    return ""


def _refresh_records(case: Case) -> None:
    """Records the current checkpoint files' sizes and SHA-256 in the config."""
    files = case.doc["checkpoint"]["files"]
    prefix = case.doc["checkpoint"]["prefix"]
    for name in (f"{prefix}.index", f"{prefix}.data-00000-of-00001"):
        with open(case.path(name), "rb") as handle:
            data = handle.read()
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _rewrite(case: Case, tensors: dict, consistent: bool = True) -> None:
    """Saves ``tensors`` as the case's checkpoint through tf.train.Checkpoint (a valid
    checkpoint); with ``consistent`` the config's variables follow, and the file
    records always do."""
    variables = {k: tf.Variable(v) for k, v in tensors.items()}
    tf.train.Checkpoint(lora=nest_variables(variables)).write(case.path("adapter"))
    if consistent:
        old = case.doc["variables"]
        case.doc["variables"] = {
            k: {
                "shape": list(v.shape),
                "dtype": tf.as_dtype(v.dtype).name,
                "kind": old[k]["kind"] if k in old else "extra",
            }
            for k, v in tensors.items()
        }
    _refresh_records(case)


def _pick_variable(case: Case) -> str:
    return case.rng.choice(sorted(case.tensors))


@mutation("tensor-nonfinite", 0, 4)
def _nonfinite(case: Case):
    tensors = dict(case.tensors)
    key = _pick_variable(case)
    value = tensors[key].copy()
    bad = case.rng.choice([np.nan, np.inf, -np.inf])
    for _ in range(case.rng.randint(1, 3)):
        value.flat[case.rng.randrange(value.size)] = bad
    tensors[key] = value
    _rewrite(case, tensors)
    case.refuse = True
    case.note(f"{key} holds {bad}")


@mutation("tensor-huge-finite", 0, 3)
def _huge_finite(case: Case):
    tensors = dict(case.tensors)
    key = _pick_variable(case)
    value = tensors[key].copy()
    big = case.rng.choice([1e38, -1e38, np.finfo(np.float32).max, 1e-45, -0.0, 3e38])
    for _ in range(case.rng.randint(1, 3)):
        value.flat[case.rng.randrange(value.size)] = big
    tensors[key] = value
    _rewrite(case, tensors)
    case.tensors = tensors  # finite: a legitimate adapter
    case.note(f"{key} holds {big}")


@mutation("tensor-dtype", 0, 3)
def _dtype(case: Case):
    tensors = dict(case.tensors)
    key = _pick_variable(case)
    dtype = case.rng.choice([tf.float16, tf.bfloat16, tf.float64, tf.int32, tf.int8])
    tensors[key] = tf.cast(tensors[key] * 10, dtype).numpy()
    consistent = case.rng.random() < 0.7
    _rewrite(case, tensors, consistent)
    if consistent:
        case.tensors = tensors  # what read_lora_state may return; no model may take it
    case.note(f"{key} as {dtype.name}, config {'follows' if consistent else 'does not'}")


@mutation("tensor-rank", 0, 2)
def _rank(case: Case):
    layer = case.rng.choice(sorted(case.doc["layers"]))
    rank = case.rng.choice([1, 3])
    tensors = dict(case.tensors)
    rng = np.random.default_rng(case.index)
    a, b = tensors[f"{layer}/kernel_lora_a"], tensors[f"{layer}/kernel_lora_b"]
    tensors[f"{layer}/kernel_lora_a"] = rng.normal(size=[*a.shape[:-1], rank]).astype("float32")
    tensors[f"{layer}/kernel_lora_b"] = rng.normal(size=[rank, b.shape[1]]).astype("float32")
    _rewrite(case, tensors)
    alpha = case.rng.choice([1.0, 2.0, 3.0])
    case.doc["layers"][layer].update(rank=rank, alpha=alpha, scaling=alpha / rank)
    case.tensors = tensors
    case.scalings = dict(case.scalings, **{layer: alpha / rank})
    case.note(f"{layer} re-saved at rank {rank}, alpha {alpha}")


@mutation("tensor-subset", 0, 2)
def _subset(case: Case):
    tensors = dict(case.tensors)
    what = case.rng.choice(["layer", "layer-but-bias", "bias", "head", "head-kernel"])
    if what.startswith("layer"):
        layer = case.rng.choice(sorted(case.doc["layers"]))
        for key in [k for k in tensors if k.rsplit("/", 1)[0] == layer]:
            if what == "layer" or not key.endswith("/bias"):
                del tensors[key]
        del case.doc["layers"][layer]
    elif what == "bias":
        del tensors[case.rng.choice(sorted(k for k in tensors if k.endswith("/bias")))]
    elif what == "head":
        del tensors["fc/kernel"], tensors["fc/bias"]
    else:
        del tensors["fc/kernel"]
    _rewrite(case, tensors)
    case.tensors = tensors
    case.note(f"dropped {what}")


@mutation("tensor-head-width", 0, 1)
def _head_width(case: Case):
    tensors = dict(case.tensors)
    width = case.rng.choice([2, 3, 5])
    if width < 4:
        tensors["fc/kernel"] = np.ascontiguousarray(tensors["fc/kernel"][:, :width])
        tensors["fc/bias"] = tensors["fc/bias"][:width].copy()
    else:
        rng = np.random.default_rng(width)
        tensors["fc/kernel"] = rng.normal(size=[16, width]).astype("float32")
        tensors["fc/bias"] = rng.normal(size=[width]).astype("float32")
    _rewrite(case, tensors)
    case.doc["base_model"]["config"]["nb_classes"] = width
    case.tensors = tensors
    case.note(f"head of {width} classes")


@mutation("tensor-extra-variable", 0, 1)
def _extra_variable(case: Case):
    tensors = dict(case.tensors)
    key = case.rng.choice(["stem/0/kernel", "stages/0/blocks/0/mlp/fc1/kernel", "nope/kernel"])
    tensors[key] = np.ones([2, 2], "float32")
    _rewrite(case, tensors)
    case.tensors = tensors
    case.note(f"added {key}")


@mutation("tensor-identical", 0, 2)
def _identical(case: Case):
    _rewrite(case, dict(case.tensors))
    case.note("re-saved unchanged")


@mutation("tensor-other-values", 0, 1)
def _other_values(case: Case):
    rng = np.random.default_rng(case.index)
    tensors = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in case.tensors.items()}
    _rewrite(case, tensors)
    case.tensors = tensors  # a consistent re-save is another adapter: it loads as such
    case.note("re-saved with other values")


@mutation("checkpoint-garbage-rehashed", 0, 4)
def _garbage(case: Case):
    """Damaged checkpoint bytes whose size and SHA-256 the config records: TensorFlow's
    parser sees them."""
    name = case.rng.choice([INDEX, DATA])
    with open(case.path(name), "rb") as handle:
        data = bytearray(handle.read())
    how = case.rng.choice(["flip", "flip", "truncate", "append", "random", "swap"])
    if how == "flip":
        for _ in range(case.rng.randint(1, 4)):
            data[case.rng.randrange(len(data))] ^= case.rng.randrange(1, 256)
    elif how == "truncate":
        data = data[: case.rng.randrange(len(data))]
    elif how == "append":
        data += bytes(case.rng.randrange(256) for _ in range(case.rng.randint(1, 64)))
    elif how == "random":
        data = bytearray(case.rng.randbytes(case.rng.choice([0, 1, 16, len(data)])))
    else:
        other = INDEX if name == DATA else DATA
        data = bytearray(case.world.orig_files[other])
    with open(case.path(name), "wb") as handle:
        handle.write(data)
    _refresh_records(case)
    case.note(f"{name} {how}, re-hashed")


@mutation("json-field", 1, 14)
def _json_field(case: Case):
    paths = [p for p in _paths(case.doc) if p[:1] != ("metadata",) or len(p) == 1]
    path = case.rng.choice(paths)
    field_name = _field_name(path)
    choices = FIELD_RAW.get(field_name, [])
    raw = (
        case.rng.choice(choices)
        if choices and case.rng.random() < 0.6
        else case.rng.choice(GENERIC_RAW)
    )
    container, key = _parent(case.doc, path)
    case.raw_value(container, key, raw)
    case.note(f"{'.'.join(map(str, path))} = {raw[:40]}")


@mutation("json-delete", 1, 3)
def _json_delete(case: Case):
    path = case.rng.choice([p for p in _paths(case.doc) if not isinstance(p[-1], int)])
    container, key = _parent(case.doc, path)
    del container[key]
    case.note(f"deleted {'.'.join(map(str, path))}")


@mutation("json-add", 1, 3)
def _json_add(case: Case):
    dicts = [()] + [p for p in _paths(case.doc) if isinstance(_get(case.doc, p), dict)]
    path = case.rng.choice(dicts)
    node = _get(case.doc, path)
    key = case.rng.choice(["unknown", "rank", "stem/0", "fc/kernel", "adapter.index", "a" * 300])
    if key in node:
        key += "_new"
    case.raw_value(node, key, case.rng.choice(GENERIC_RAW[:24]))
    case.note(f"added {'.'.join(map(str, (*path, key)))[:80]}")


def _get(doc, path):
    node = doc
    for key in path:
        node = node[key]
    return node


@mutation("json-rename", 1, 3)
def _json_rename(case: Case):
    dicts = [
        p for p in _paths(case.doc) if isinstance(_get(case.doc, p), dict) and _get(case.doc, p)
    ]
    path = case.rng.choice([(), *dicts])
    node = _get(case.doc, path)
    old = case.rng.choice(list(node))
    new = case.rng.choice(
        [
            old.upper(),
            old + "/",
            "../" + old,
            "/" + old,
            old.replace("a", "\u0430"),  # a Cyrillic a
            old[:-1],
            "",
            "../../../../dev/zero",
            os.path.join(case.world.orig, INDEX),
            "../other/adapter.index",
        ]
    )
    if new in node:
        return case.note(f"rename of {old} skipped")
    items = [(new if k == old else k, v) for k, v in node.items()]
    node.clear()
    node.update(items)
    case.note(f"renamed {'.'.join(map(str, (*path, old)))} to {new!r}")


@mutation("json-identity", 1, 4)
def _json_identity(case: Case):
    base = case.doc["base_model"]
    how = case.rng.choice(
        [
            "config-null",
            "config-empty",
            "config-value",
            "config-key",
            "fingerprint",
            "arch",
            "lora-arch",
        ]
    )
    if how == "config-null":
        base["config"] = None
    elif how == "config-empty":
        base["config"] = {}
    elif how == "config-value":
        key = case.rng.choice(sorted(base["config"]))
        base["config"][key] = case.rng.choice([None, 0, 7, "x", [1], 4.5])
    elif how == "config-key":
        del base["config"][case.rng.choice(sorted(base["config"]))]
    elif how == "fingerprint":
        digits = list(base["fingerprint"])
        i = case.rng.randrange(len("sampled-blake2b:"), len(digits))
        digits[i] = "0" if digits[i] != "0" else "1"
        base["fingerprint"] = "".join(digits)
    elif how == "arch":
        base["architecture"] = "tfimm.architectures.resnet.ResNet"
    else:
        base["lora_architecture"] = "lora_ckpt.architectures.convnext.SomethingElse"
    case.note(f"base_model {how}")


@mutation("json-saved", 1, 2)
def _json_saved(case: Case):
    saved = case.doc["saved"]
    key = case.rng.choice(["lora", "bias", "extra_layers"])
    case.raw_value(saved, key, case.rng.choice(FIELD_RAW[key]))
    case.note(f"saved.{key}")


@mutation("json-prefix", 1, 4)
def _json_prefix(case: Case):
    checkpoint = case.doc["checkpoint"]
    how = case.rng.choice(["hostile", "renamed", "renamed", "other-inside", "other-outside"])
    if how == "hostile":
        case.raw_value(checkpoint, "prefix", case.rng.choice(FIELD_RAW["prefix"]))
    elif how == "renamed":  # a legitimate fresh prefix, as object-store saves write
        prefix = f"adapter-{case.rng.getrandbits(32):08x}"
        for old, new in ((INDEX, f"{prefix}.index"), (DATA, f"{prefix}.data-00000-of-00001")):
            os.rename(case.path(old), case.path(new))
            checkpoint["files"][new] = checkpoint["files"].pop(old)
        checkpoint["prefix"] = prefix
    elif how == "other-inside":  # another adapter's checkpoint beside ours, the prefix on it
        prefix = "adapter-0123abcd"
        for name, new in ((INDEX, f"{prefix}.index"), (DATA, f"{prefix}.data-00000-of-00001")):
            with open(case.path(new), "wb") as handle:
                handle.write(case.world.other_files[name])
            if case.rng.random() < 0.5:
                checkpoint["files"][new] = checkpoint["files"].pop(name)
        checkpoint["prefix"] = prefix
    else:
        checkpoint["prefix"] = case.rng.choice(
            ["../other/adapter", os.path.join(case.world.other, "adapter")]
        )
    case.note(f"prefix {how}: {checkpoint['prefix'][:40]}")


@mutation("json-files", 1, 4)
def _json_files(case: Case):
    files = case.doc["checkpoint"]["files"]
    name = case.rng.choice(sorted(files))
    how = case.rng.choice(["size", "size", "sha", "sha-other", "name", "extra", "drop"])
    if how == "size":
        size = files[name]["size"]
        files[name]["size"] = case.rng.choice(
            [0, size - 1, size + 1, 2 * size, 10**9, 10**12, 10**30, 10**400]
        )
    elif how == "sha":
        files[name]["sha256"] = case.rng.choice(
            [files[name]["sha256"].upper(), files[name]["sha256"][:-1] + "0", ""]
        )
    elif how == "sha-other":
        files[name]["sha256"] = hashlib.sha256(case.world.other_files[name]).hexdigest()
    elif how == "name":
        new = case.rng.choice(
            ["../../../../dev/zero", "/dev/zero", "../other/" + name, case.world.orig + "/" + name]
        )
        files[new] = files.pop(name)
    elif how == "extra":
        files[CONFIG] = {"size": 1, "sha256": "0" * 64}
    else:
        del files[name]
    case.note(f"checkpoint.files {how} {name}")


@mutation("json-scaling", 1, 3)
def _json_scaling(case: Case):
    layer = case.rng.choice(sorted(case.doc["layers"]))
    record = case.doc["layers"][layer]
    if case.rng.random() < 0.3:  # alpha and scaling edited together: another adapter
        alpha = case.rng.choice([2.0, 4.0, 0.5, 16])
        record.update(alpha=alpha, scaling=alpha / record["rank"])
        case.scalings = dict(case.scalings, **{layer: alpha / record["rank"]})
        return case.note(f"{layer} alpha {alpha}, scaling follows")
    case.raw_value(record, "scaling", case.rng.choice(FIELD_RAW["scaling"]))
    case.note(f"{layer} scaling {case.raw[next(reversed(case.raw))]}")


@mutation("json-rank", 1, 2)
def _json_rank(case: Case):
    layer = case.rng.choice(sorted(case.doc["layers"]))
    rank = case.rng.choice([0, 1, 3, 10**9, 65536, 65537])
    record = case.doc["layers"][layer]
    record["rank"] = rank
    if case.rng.random() < 0.5 and rank > 0:  # shapes and scaling follow: the config is
        record["scaling"] = record["alpha"] / rank  # self-consistent, the tensors are not
        variables = case.doc["variables"]
        variables[f"{layer}/kernel_lora_a"]["shape"][-1] = rank
        variables[f"{layer}/kernel_lora_b"]["shape"][0] = rank
    case.note(f"{layer} rank {rank}")


@mutation("json-metadata", 1, 3)
def _json_metadata(case: Case):
    how = case.rng.choice(["edit", "nested-ok", "nested-deep", "big", "non-finite", "huge"])
    if how == "edit":
        case.doc["metadata"] = {"task": "other", "ε": [1, 2.5, None, True], "x": {"y": "z"}}
    elif how in ("nested-ok", "nested-deep"):
        depth = case.rng.randint(3, 28) if how == "nested-ok" else case.rng.randint(33, 3000)
        case.raw_value(case.doc, "metadata", '{"a": ' + "[" * depth + "]" * depth + "}")
    elif how == "big":
        case.doc["metadata"] = {"blob": "y" * case.rng.choice([10_000, 1_000_000])}
    elif how == "non-finite":
        case.raw_value(case.doc["metadata"], "loss", case.rng.choice(["NaN", "Infinity", "1e400"]))
    else:
        case.raw_value(case.doc["metadata"], "blob", '"' + "z" * (17 << 20) + '"')
    case.note(f"metadata {how}")


@mutation("json-descriptive", 1, 2)
def _json_descriptive(case: Case):
    what = case.rng.choice(["created", "library_version", "type", "kind"])
    if what in ("created", "library_version"):
        case.raw_value(case.doc, what, case.rng.choice(FIELD_RAW[what]))
    elif what == "type":
        layer = case.rng.choice(sorted(case.doc["layers"]))
        case.raw_value(case.doc["layers"][layer], "type", case.rng.choice(FIELD_RAW["type"]))
    else:
        key = case.rng.choice(sorted(case.doc["variables"]))
        case.raw_value(case.doc["variables"][key], "kind", case.rng.choice(FIELD_RAW["kind"]))
        what = f"kind of {key}"
    case.note(f"{what}")


@mutation("json-version", 1, 1)
def _json_version(case: Case):
    key = case.rng.choice(["format", "format_version"])
    case.raw_value(case.doc, key, case.rng.choice(FIELD_RAW[key]))
    case.note(key)


@mutation("text-noop", 2, 4)
def _text_noop(case: Case):
    how = case.rng.choice(["format", "escape", "number", "crlf", "space", "dup-first"])
    if how == "format":
        case.dump = case.rng.choice(
            [
                {},
                {"indent": 0},
                {"indent": 4, "sort_keys": True},
                {"indent": "\t"},
                {"separators": (",", ":")},
                {"ensure_ascii": False, "indent": 1},
            ]
        )
    elif how == "escape":  # one character of a string as a \\u escape
        case.text_ops.append(_escape_one(case.rng))
    elif how == "number":
        case.text_ops.append(
            lambda b: b.replace(b'"alpha": 1.0', b'"alpha": 1', 1).replace(
                b'"scaling": 0.5', case.rng.choice([b'"scaling": 5e-1', b'"scaling": 0.50']), 1
            )
        )
    elif how == "crlf":
        case.text_ops.append(lambda b: b.replace(b"\n", b"\r\n"))
    elif how == "space":
        case.text_ops.append(lambda b: b" \t\n" + b + b"\n\n  ")
    else:  # a duplicate key whose last occurrence is the real one
        case.text_ops.append(
            lambda b: b.replace(b'"rank": 2,', b'"rank": 1000000000, "rank": 2,', 1)
        )
    case.note(f"no-op {how}")


def _escape_one(rng: random.Random):
    def op(data: bytes) -> bytes:
        spans = [m.span() for m in re.finditer(rb'"(?:[^"\\]|\\.)*"', data)]
        start, end = rng.choice(spans)
        letters = [i for i in range(start + 1, end - 1) if chr(data[i]).isalnum()]
        if not letters:
            return data
        i = rng.choice(letters)
        return data[:i] + b"\\u%04x" % data[i] + data[i + 1 :]

    return op


_NUMBER = re.compile(rb"(?<=[:\[,\s])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?=[,\]\}\s])")


@mutation("text-digit", 2, 4)
def _text_digit(case: Case):
    rng = case.rng

    def op(data: bytes) -> bytes:
        spans = [m.span() for m in _NUMBER.finditer(data)]
        start, end = rng.choice(spans)
        digits = [i for i in range(start, end) if chr(data[i]).isdigit()]
        i = rng.choice(digits)
        new = rng.choice([d for d in b"0123456789" if d != data[i]])
        case.note(f"digit of {data[start:end].decode()!r} -> {chr(new)}")
        return data[:i] + bytes([new]) + data[i + 1 :]

    case.text_ops.append(op)


@mutation("text-duplicate-key", 2, 2)
def _text_duplicate(case: Case):
    key = case.rng.choice([b'"rank"', b'"scaling"', b'"prefix"', b'"dtype"', b'"fingerprint"'])
    value = case.rng.choice([b"0", b"3", b"null", b'"x"', b"1e400"])
    after = case.rng.random() < 0.5

    def op(data: bytes) -> bytes:
        i = data.find(key + b":")
        if i < 0:
            return data
        j = data.find(b"\n", i)
        j = j if j >= 0 else len(data)
        line = data[i:j]
        extra = key + b": " + value
        dup = line.rstrip(b",") + b", " + extra + (b"," if line.endswith(b",") else b"")
        return data[:i] + (dup if after else extra + b", " + line) + data[j:]

    case.text_ops.append(op)
    case.note(f"duplicate {key.decode()} {'after' if after else 'before'} = {value.decode()}")


@mutation("text-encoding", 2, 2)
def _text_encoding(case: Case):
    how = case.rng.choice(["bom", "byte", "overlong", "surrogate", "utf16", "nul", "latin1"])
    rng = case.rng

    def op(data: bytes) -> bytes:
        if how == "bom":
            return b"\xef\xbb\xbf" + data
        if how == "utf16":
            return data.decode("utf-8", "surrogateescape").encode("utf-16", "surrogatepass")
        if how == "latin1":
            return data.replace(b'"quadrants"', '"quadrànts"'.encode("latin-1"))
        bad = {
            "byte": bytes([rng.choice([0x80, 0xBF, 0xC3, 0xFE, 0xFF])]),
            "overlong": b"\xc0\xaf",
            "surrogate": b"\xed\xa0\x80",
            "nul": b"\x00",
        }[how]
        i = data.find(b'"quadrants"') + 3
        return data[:i] + bad + data[i:]

    case.text_ops.append(op)
    case.note(f"encoding {how}")


def _regular_files(case: Case) -> list[str]:
    names = []
    for name in sorted(os.listdir(case.dir)):
        info = os.lstat(case.path(name))
        if stat.S_ISREG(info.st_mode) and info.st_size < (1 << 24):
            names.append(name)
    return names


def _pick_file(case: Case) -> str | None:
    names = _regular_files(case)
    if not names:
        return None
    if CONFIG in names and case.rng.random() < 0.45:
        return CONFIG
    return case.rng.choice(names)


def _edit_bytes(case: Case, name: str, edit) -> None:
    with open(case.path(name), "rb") as handle:
        data = bytearray(handle.read())
    data = edit(data)
    with open(case.path(name), "wb") as handle:
        handle.write(data)


@mutation("flip", 3, 10)
def _flip(case: Case):
    name = _pick_file(case)
    if name is None:
        return case.note("flip: no file")
    spots = []

    def edit(data):
        for _ in range(case.rng.choice([1, 1, 1, 2, 3])):
            if data:
                i = case.rng.randrange(len(data))
                spots.append(i)
                data[i] ^= case.rng.choice(
                    [1, 2, 4, 8, 16, 32, 64, 128, case.rng.randrange(1, 256)]
                )
        return data

    _edit_bytes(case, name, edit)
    case.note(f"flip {name} at {spots}")


@mutation("truncate", 3, 5)
def _truncate(case: Case):
    name = _pick_file(case)
    if name is None:
        return case.note("truncate: no file")
    size = os.path.getsize(case.path(name))
    keep = case.rng.choice([0, 1, size // 2, max(size - 1, 0), case.rng.randrange(size or 1)])
    _edit_bytes(case, name, lambda data: data[:keep])
    case.note(f"truncate {name} to {keep}/{size}")


@mutation("append", 3, 4)
def _append(case: Case):
    name = _pick_file(case)
    if name is None:
        return case.note("append: no file")
    tail = case.rng.choice(
        [b"\x00", b" ", b"\n\n", b"}", b"{}", case.rng.randbytes(case.rng.randint(1, 4096))]
    )
    _edit_bytes(case, name, lambda data: data + tail)
    case.note(f"append {len(tail)} bytes to {name}")


@mutation("sparse-grow", 3, 1)
def _sparse_grow(case: Case):
    name = case.rng.choice(FILES)
    if not os.path.isfile(case.path(name)):
        return case.note("grow: no file")
    size = case.rng.choice([17 << 20, 1 << 33, 1 << 40])
    try:
        os.truncate(case.path(name), size)
    except OSError:
        os.truncate(case.path(name), 17 << 20)
    case.note(f"{name} grown (sparse) to {size}")


def _replace_with(case: Case, name: str, how: str) -> None:
    path = case.path(name)
    if os.path.lexists(path):
        os.remove(path)
    if how == "directory":
        os.mkdir(path)
        with open(os.path.join(path, "x"), "wb") as handle:
            handle.write(b"{}")
    elif how == "fifo":
        os.mkfifo(path)
    elif how in ("/dev/zero", "/dev/urandom", "/dev/null"):
        os.symlink(how, path)
    elif how == "symlink-orig":
        os.symlink(os.path.join(case.world.orig, name), path)
    elif how == "symlink-orig-relative":
        os.symlink(os.path.join("..", "orig", name), path)
    elif how == "symlink-other":
        os.symlink(os.path.join(case.world.other, name), path)
    elif how == "hardlink-orig":
        os.link(os.path.join(case.world.orig, name), path)
    elif how == "hardlink-other":
        os.link(os.path.join(case.world.other, name), path)
    elif how == "loop":
        os.symlink(name, path)
    elif how == "dangling":
        os.symlink("/nonexistent/adapter", path)
    else:
        raise AssertionError(how)


SPECIAL = [
    "directory",
    "fifo",
    "/dev/zero",
    "/dev/urandom",
    "/dev/null",
    "symlink-orig",
    "symlink-orig-relative",
    "symlink-other",
    "hardlink-orig",
    "hardlink-other",
    "loop",
    "dangling",
]


@mutation("replace-special", 4, 8)
def _replace_special(case: Case):
    name = case.rng.choice(FILES)
    how = case.rng.choice(SPECIAL)
    _replace_with(case, name, how)
    if name == CONFIG:
        case.config_replaced = True
    case.note(f"{name} -> {how}")


def _expect_pristine(case: Case) -> None:
    """A reader finds no committed adapter in the case but the pristine one in NAME.old-*:
    that is what it must load."""
    case.tensors, case.scalings, case.refuse = dict(case.world.tensors), case.world.scalings, False


@mutation("delete", 4, 4)
def _delete(case: Case):
    names = case.rng.sample(FILES, case.rng.choice([1, 1, 2]))
    for name in names:
        if os.path.lexists(case.path(name)):
            os.remove(case.path(name))
    if CONFIG in names:
        case.config_replaced = True
        if case.rng.random() < 0.5:  # a save killed between its renames left the old version
            old = f"{case.dir}.old-{case.rng.getrandbits(32):08x}"
            os.mkdir(old)
            for name, data in case.world.orig_files.items():
                with open(os.path.join(old, name), "wb") as handle:
                    handle.write(data)
            case.note(f"complete previous version in {os.path.basename(old)}")
            _expect_pristine(case)
    case.note(f"deleted {names}")


@mutation("swap-files", 4, 2)
def _swap(case: Case):
    how = case.rng.choice(["swap", "other-index", "other-data", "other-config", "other-both"])
    w = case.world
    if how == "swap":
        os.rename(case.path(INDEX), case.path("tmp"))
        os.rename(case.path(DATA), case.path(INDEX))
        os.rename(case.path("tmp"), case.path(DATA))
    else:
        names = {
            "other-index": [INDEX],
            "other-data": [DATA],
            "other-config": [CONFIG],
            "other-both": [INDEX, DATA],
        }[how]
        for name in names:
            if os.path.lexists(case.path(name)):
                os.remove(case.path(name))
            with open(case.path(name), "wb") as handle:
                handle.write(w.other_files[name])
        if CONFIG in names:
            case.config_replaced = True
    case.note(f"files {how}")


@mutation("stray-entries", 4, 2)
def _stray(case: Case):
    kinds = case.rng.sample(["file", "dir", "fifo", "symlink", "checkpoint-like"], 2)
    for kind in kinds:
        path = case.path({"checkpoint-like": "adapter-deadbeef.index"}.get(kind, f"stray-{kind}"))
        if kind in ("file", "checkpoint-like"):
            with open(path, "wb") as handle:
                handle.write(b"junk")
        elif kind == "dir":
            os.mkdir(path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            os.symlink("/dev/zero", path)
    case.note(f"stray {kinds}")


@mutation("work-directories", 5, 2)
def _work_dirs(case: Case):
    """Work directories of the case's name: never listed; NAME.old-* is read only when
    NAME holds no committed adapter (a save killed between its renames), and then it
    is the previous version of the same adapter."""
    committed = os.path.exists(case.path(CONFIG))
    for marker in case.rng.sample([".tmp-", ".old-"], case.rng.randint(1, 2)):
        work = f"{case.dir}{marker}{case.rng.getrandbits(32):08x}"
        if case.rng.random() < 0.3:  # a leftover that never held a committed adapter
            how = case.rng.choice(["index only", "fifo", "empty", "symlink to other"])
            if how == "fifo":
                os.mkfifo(work)
            elif how == "symlink to other":  # renames make directories, never links
                os.symlink(case.world.other, work)
            else:
                os.mkdir(work)
                if how == "index only":
                    shutil.copy(os.path.join(case.world.orig, INDEX), work)
            case.note(f"{os.path.basename(work)}: {how}")
            continue
        source = case.world.orig if marker == ".old-" and not committed else case.world.other
        shutil.copytree(source, work)
        if source == case.world.orig:
            _expect_pristine(case)
        case.note(f"{os.path.basename(work)} holds {os.path.basename(source)}")


@mutation("directory-itself", 4, 1)
def _directory_itself(case: Case):
    how = case.rng.choice(["file", "fifo", "/dev/zero", "empty", "dangling"])
    _clean(case.dir)  # never shutil.rmtree: it would open a FIFO left by an earlier draw
    if how == "file":
        with open(case.dir, "wb") as handle:
            handle.write(case.world.orig_files[CONFIG])
    elif how == "fifo":
        os.mkfifo(case.dir)
    elif how == "/dev/zero":
        os.symlink("/dev/zero", case.dir)
    elif how == "empty":
        os.mkdir(case.dir)
    else:
        os.symlink("/nonexistent", case.dir)
    case.config_replaced = True
    case.note(f"the adapter directory is {how}")


FAMILY_NAMES = sorted({family for family, *_ in MUTATIONS})


def _clean(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def build_case(w: World, index: int, seed: int, families: list | None = None) -> Case:
    """The mutated adapter of case ``index`` in ``store/case`` (or one of the given
    mutation ``families``)."""
    rng = random.Random(seed * 1_000_003 + index)
    case_dir = os.path.join(w.store, "case")
    for name in os.listdir(w.store):
        if name == "case" or name.startswith(("case.tmp-", "case.old-")):
            _clean(os.path.join(w.store, name))
    os.mkdir(case_dir)
    for name, data in w.orig_files.items():
        with open(os.path.join(case_dir, name), "wb") as handle:
            handle.write(data)
    case = Case(
        index=index,
        rng=rng,
        world=w,
        dir=case_dir,
        doc=json.loads(w.orig_files[CONFIG]),
        tensors=dict(w.tensors),
        scalings=dict(w.scalings),
    )
    pool = [m for m in MUTATIONS if not ONLY or m[0] in ONLY]
    weights = [weight for _, _, weight, _ in pool]
    count = rng.choices([1, 2, 3], [0.7, 0.2, 0.1])[0]
    chosen = rng.choices(pool, weights, k=count)
    if families is not None:
        chosen = [m for m in MUTATIONS if m[0] in families]
    chosen.sort(key=lambda m: m[1])  # by phase
    # At most one checkpoint rewrite per case: each starts from the pristine tensors.
    rewrites = [m for m in chosen if m[1] == 0]
    chosen = rewrites[:1] + [m for m in chosen if m[1] != 0]
    phase_written = False
    for family, phase, _, fn in chosen:
        if phase >= 3 and not phase_written:
            _write_config(case)
            phase_written = True
        case.families.append(family)
        try:
            fn(case)
        except (TypeError, KeyError, AttributeError, IndexError, ValueError, OSError) as exc:
            case.note(f"{family} skipped: an earlier mutation removed its target ({exc!r:.60})")
    if not phase_written:
        _write_config(case)
    _expect_other_if_copied(case)
    return case


def _expect_other_if_copied(case: Case) -> None:
    """Three regular files byte for byte the other adapter's are that adapter: it loads."""
    for name in FILES:
        path = case.path(name)
        if not os.path.isdir(case.dir) or not os.path.lexists(path):
            return
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(case.world.other_files[name]):
            return
        with open(path, "rb") as handle:
            if handle.read() != case.world.other_files[name]:
                return
    case.tensors, case.scalings, case.refuse = case.world.other_tensors, case.world.scalings, False
    case.config_replaced = True
    case.note("the case is now a copy of the other adapter")


def _write_config(case: Case) -> None:
    text = json.dumps(case.doc, **case.dump)
    for sentinel, raw in case.raw.items():
        text = text.replace(json.dumps(sentinel), raw)
    data = text.encode("utf-8") + (b"\n" if case.dump.get("indent") is not None else b"")
    for op in case.text_ops:
        data = op(data)
    with open(case.path(CONFIG), "wb") as handle:
        handle.write(data)
    case.config_bytes = data


# ---- judging -----------------------------------------------------------------------------


def _plain_json(data: bytes | None):
    """The config as a lenient reader would see it (None: not JSON)."""
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _changed_paths(a, b, prefix=()) -> list[tuple]:
    """Paths at which two JSON documents differ (numbers compared by value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in set(a) | set(b):
            if key not in a or key not in b:
                if a.get(key) is not None or b.get(key) is not None:  # null is absent
                    found.append((*prefix, key))
            else:
                found += _changed_paths(a[key], b[key], (*prefix, key))
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in _changed_paths(x, y, (*prefix, i))
        ]
    # Python's ==, as the loaders compare: 4 == 4.0, and false == 0 == -0.0 too (a
    # base config's false given as 0 passes the identity check; no tensor changes).
    if a == b and not (isinstance(a, float) and math.isnan(a)):
        return []
    return [prefix]


SCHEMA = {
    "": {"format", "format_version", "library_version", "created", "base_model", "saved"}
    | {"layers", "variables", "checkpoint", "metadata"},
    "base_model": {"architecture", "lora_architecture", "config", "fingerprint"},
    "saved": {"lora", "bias", "extra_layers"},
    "checkpoint": {"prefix", "files"},
    "layers": {"type", "rank", "alpha", "scaling"},
    "variables": {"shape", "dtype", "kind"},
}


def _label(path: tuple) -> str:
    """A changed config path as a family name: layers.*.type, metadata, ..."""
    if not path:
        return "<root>"
    head = path[0]
    if head not in SCHEMA[""]:
        return "<unknown field>"
    if head in ("layers", "variables") and len(path) > 2:
        field = path[2] if path[2] in SCHEMA[head] else "<unknown field>"
        return f"{head}.*.{field}"
    if head in ("layers", "variables"):
        return f"{head}.<key>"
    if head in ("base_model", "saved", "checkpoint") and len(path) > 1:
        field = path[1] if path[1] in SCHEMA[head] else "<unknown field>"
        return f"{head}.{field}"
    return str(head)


class Judge:
    """Runs one case through every loader and keeps the tallies."""

    def __init__(self, w: World):
        self.w = w
        self.cases = 0
        self.families = Counter()
        self.outcomes = {name: Counter() for name in (*LOADERS, "list_adapters")}
        self.label_loads = Counter()
        self.failures: list[str] = []
        self.kinds = Counter()  # failure kinds, for the summary
        self.seconds = Counter()  # time in each loader
        self.slowest = (0.0, "")

    def fail(self, case: Case, loader: str, what: str, detail: str = "") -> None:
        last = detail.strip().splitlines()[-1][:160] if detail.strip() else ""
        self.kinds[f"{loader}: {what}: {last}"] += 1
        notes = "; ".join(n[:100] for n in case.notes)
        trace = "\n".join(detail.strip().splitlines()[-12:])
        self.failures.append(
            f"case {case.index} ({' + '.join(case.families)}: {notes}) {loader}: {what}\n{trace}"
        )

    def call(self, case: Case, loader: str, fn, *args) -> Outcome:
        outcome = bounded(fn, *args)
        self.seconds[loader] += outcome.seconds
        if outcome.seconds > self.slowest[0]:
            self.slowest = (outcome.seconds, f"case {case.index} {loader} {case.notes}")
        if outcome.hang:
            _unblock(case)
            self.fail(case, loader, f"HANG (more than {TIMEOUT} s)")
            pytest.fail("\n".join(self.failures[-1:]))
        if outcome.error is not None and not isinstance(outcome.error, LoRAError):
            self.outcomes[loader]["other exception"] += 1
            self.fail(case, loader, "not a LoRAError", outcome.trace)
        elif outcome.error is not None:
            self.outcomes[loader][f"refused: {type(outcome.error).__name__}"] += 1
        else:
            self.outcomes[loader]["loaded"] += 1
        return outcome

    def run(self, case: Case) -> None:
        w = self.w
        self.cases += 1
        self.families.update(set(case.families))
        doc = _plain_json(case.config_bytes) if not case.config_replaced else w.doc
        changed = [] if doc is None else _changed_paths(w.doc, doc)
        labels = sorted({_label(p) for p in changed})
        # What the model-bound loaders check: the base's class, config and weights.
        # (lora_architecture and unknown fields of base_model are labels.)
        identity = [p for p in changed if p[:2] in IDENTITY or p == ("base_model",)]
        path = case.dir
        same_data = case.scalings == w.scalings and case.tensors.keys() == w.tensors.keys()
        same_data = same_data and all(case.tensors[k] is v for k, v in w.tensors.items())

        # read_lora_state
        read = self.call(case, "read_lora_state", lora_ckpt.read_lora_state, path)
        if read.error is None and not read.hang:
            state = read.value
            problem = self._check_read(case, state)
            if problem:
                self.fail(case, "read_lora_state", "SILENT LOAD of altered data", problem)
            elif doc is None:
                self.fail(case, "read_lora_state", "loaded a config that is not JSON")
            elif same_data:
                self.label_loads.update(f"read_lora_state: {label}" for label in labels)
        self._check_state(case, "read_lora_state")

        # load_lora_state
        load = self.call(case, "load_lora_state", lora_ckpt.load_lora_state, w.model, path)
        if load.error is None and not load.hang:
            problem = self._check_model(case) + _untouched(w, model=False, pool=True)
            if identity:
                problem += f"base identity changed at {identity[:3]} and it loaded. "
            if problem:
                self.fail(case, "load_lora_state", "SILENT LOAD of altered data", problem)
            elif same_data:
                self.label_loads.update(f"load_lora_state: {label}" for label in labels)
            _restore(w)
        else:
            self._check_state(case, "load_lora_state")

        # inspect_adapter
        inspect = self.call(case, "inspect_adapter", lora_ckpt.inspect_adapter, path)
        if inspect.error is None and not inspect.hang:
            summary = inspect.value
            if read.error is None:
                config = read.value.config
                if summary["ranks"] != {p: r.rank for p, r in config.layers.items()} or set(
                    summary["variables"]
                ) != set(config.variables):
                    self.fail(case, "inspect_adapter", "disagrees with read_lora_state")
        elif read.error is None and inspect.error is not None:
            self.fail(case, "inspect_adapter", "refused what read_lora_state loaded", inspect.trace)

        # AdapterPool.load
        pool = self.call(case, "AdapterPool.load", w.pool.load, "fuzz", path)
        if pool.error is None and not pool.hang:
            problem = self._check_pool(case, pool.value, identity)
            problem += _untouched(w, model=True, pool=True, except_slot=pool.value)
            if problem:
                self.fail(case, "AdapterPool.load", "SILENT LOAD of altered data", problem)
            elif same_data:
                self.label_loads.update(f"AdapterPool.load: {label}" for label in labels)
            _restore(w)
        self._check_state(case, "AdapterPool.load")

        # list_adapters
        self._check_listing(case, inspect)

    # -- per loader checks

    def _check_read(self, case: Case, state) -> str:
        if case.refuse:
            return "NaN/Inf tensors loaded. "
        problem = ""
        if set(state.tensors) != set(case.tensors):
            problem += f"variables {sorted(set(state.tensors) ^ set(case.tensors))[:4]}. "
        for key in set(state.tensors) & set(case.tensors):
            if not _same(state.tensors[key], case.tensors[key]):
                problem += f"tensor {key} differs. "
        for layer, record in state.config.layers.items():
            expected = case.scalings.get(layer)
            if record.scaling != expected:
                problem += f"{layer} scaling {record.scaling!r}, expected {expected!r}. "
            tensor = state.tensors.get(f"{layer}/kernel_lora_a")
            if tensor is None or record.rank != tensor.shape[-1]:
                problem += f"{layer} rank {record.rank}. "
        return problem

    def _check_model(self, case: Case) -> str:
        if case.refuse:
            return "NaN/Inf tensors loaded into the model. "
        problem = ""
        for key, var in self.w.model_vars.items():
            expected = case.tensors.get(key, self.w.model_baseline[key])
            if not _same(var.numpy(), expected):
                problem += f"model variable {key} differs from the adapter's. "
        extra = set(case.tensors) - set(self.w.model_vars)
        if extra:
            problem += f"loaded although the model has no {sorted(extra)[:3]}. "
        return problem

    def _check_pool(self, case: Case, slot: int, identity: list) -> str:
        w = self.w
        if case.refuse:
            return "NaN/Inf tensors loaded into a slot. "
        head = "fc/kernel" in case.tensors
        identity = [
            p for p in identity if not (head and p[:3] == ("base_model", "config", "nb_classes"))
        ]
        if identity:
            return f"base identity changed at {identity[:3]} and it loaded. "
        if any(t.dtype != np.float32 for t in case.tensors.values()):
            return "tensors of another dtype were cast into a slot. "
        problem = ""
        expected = _expected_slot(w, case.tensors, case.scalings)
        for (label, var, *_), value in zip(w.pool_slots, expected, strict=True):
            if not _same(var[slot].numpy(), value):
                problem += f"slot {label} differs. "
        classes = case.tensors["fc/kernel"].shape[-1] if head else w.pool_classes[0]
        if w.pool.classes("fuzz") != classes:
            problem += f"classes {w.pool.classes('fuzz')} != {classes}. "
        if w.pool.names() != sorted([*w.pool_names, "fuzz"]):
            problem += f"names {w.pool.names()}. "
        return problem

    def _check_state(self, case: Case, loader: str) -> None:
        changed = _state_changes(self.w)
        if changed:
            self.fail(case, loader, "model or pool changed by a refused load", f"{changed[:6]}")
            _restore(self.w)

    def _check_listing(self, case: Case, inspect: Outcome) -> None:
        w = self.w
        listed = bounded(lora_ckpt.list_adapters, w.store)
        self.seconds["list_adapters"] += listed.seconds
        if listed.hang:
            _unblock(case)
            self.fail(case, "list_adapters", "HANG")
            pytest.fail(self.failures[-1])
        if listed.error is not None:
            self.outcomes["list_adapters"]["raised"] += 1
            return self.fail(case, "list_adapters", "raised", listed.trace)
        entries = {entry.get("name"): entry for entry in listed.value}
        problem = ""
        for entry in listed.value:
            if any(m in str(entry.get("name")) or m in entry.get("path", "") for m in WORK_MARKERS):
                problem += f"listed the work directory {entry.get('name')}. "
        for name, entry in w.listing.items():
            if entries.get(name) != entry:
                problem += f"entry {name} changed. "
        if set(entries) - set(w.listing) - {"case"}:
            problem += f"unexpected entries {sorted(set(entries) - set(w.listing))}. "
        entry = entries.get("case")
        if isinstance(inspect.error, AdapterNotFoundError):
            if entry is not None:
                problem += "listed a case that inspect_adapter does not find. "
            outcome = "not listed"
        elif entry is None:
            problem += "left out a case that inspect_adapter finds. "
            outcome = "missing"
        elif inspect.error is not None:
            if "error" not in entry:
                problem += "listed without error a case inspect_adapter refuses. "
            outcome = "listed with error"
        else:
            if entry != dict(inspect.value, name="case"):
                problem += "listed another summary than inspect_adapter's. "
            outcome = "listed"
        self.outcomes["list_adapters"][outcome] += 1
        if problem:
            self.fail(case, "list_adapters", problem)


def _unblock(case: Case) -> None:
    """Lets a reader stuck on a FIFO of the case go (a hang fails the test anyway)."""
    for root, dirs, files in os.walk(os.path.dirname(case.dir)):
        for name in dirs + files:
            path = os.path.join(root, name)
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass


def run_fuzz(w: World, cases: int, seed: int) -> Judge:
    judge = Judge(w)
    start = time.perf_counter()
    for index in range(cases):
        case = build_case(w, index, seed)
        judge.run(case)
    seconds = time.perf_counter() - start
    _report(judge, seconds)
    return judge


def _report(judge: Judge, seconds: float) -> None:
    print(f"\n{judge.cases} cases in {seconds:.1f} s")
    print(f"slowest call {judge.slowest[0]:.2f} s: {judge.slowest[1]}")
    print("seconds per loader:", {k: round(v, 1) for k, v in judge.seconds.items()})
    print("cases per family:", dict(sorted(judge.families.items())))
    for loader, counts in judge.outcomes.items():
        print(f"{loader}: {dict(sorted(counts.items()))}")
    print("loads of identical data with config fields changed:")
    for label, n in sorted(judge.label_loads.items()):
        print(f"  {label}: {n}")


def _assert_clean(judge: Judge, cases: int) -> None:
    if os.environ.get("LORA_FUZZ_REPORT"):  # every failure, for debugging
        with open(os.environ["LORA_FUZZ_REPORT"], "w") as handle:
            handle.write("\n\n".join(judge.failures))
    assert judge.cases >= cases
    kinds = "\n".join(f"{n} x {kind}" for kind, n in judge.kinds.most_common())
    assert not judge.failures, f"{len(judge.failures)} failures:\n{kinds}\n\n" + "\n\n".join(
        judge.failures[:8]
    )
    for loader in LOADERS:
        assert judge.outcomes[loader]["other exception"] == 0
    # The oracle must not pass by refusing everything.
    for loader, share in (
        ("read_lora_state", 0.15),
        ("load_lora_state", 0.05),
        ("inspect_adapter", 0.2),
        ("AdapterPool.load", 0.05),
    ):
        loaded = judge.outcomes[loader]["loaded"]
        assert loaded >= share * judge.cases, f"{loader} loaded only {loaded} of {judge.cases}"
    refused = sum(
        n for k, n in judge.outcomes["read_lora_state"].items() if k.startswith("refused")
    )
    assert refused >= 0.5 * judge.cases


def test_loaders_refuse_or_load_identical_data_sample(world):
    """The fast lane: a sample of the fuzz, on its own seed."""
    judge = run_fuzz(world, FAST_CASES, SEED + 1)
    _assert_clean(judge, FAST_CASES)


@pytest.mark.slow
def test_loaders_refuse_or_load_identical_data(world):
    """At least 1,000 mutated adapters against every loader."""
    judge = run_fuzz(world, FULL_CASES, SEED)
    _assert_clean(judge, FULL_CASES)
    assert set(judge.families) == (ONLY or set(FAMILY_NAMES))


def test_bounded_calls_catch_a_hang(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    outcome = bounded(lambda: os.close(os.open(fifo, os.O_RDONLY)), timeout=0.5)
    assert outcome.hang
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the reader go


def test_the_oracle_sees_a_silent_load(world):
    """A judge told to expect the original data flags a load of other values, and
    names every loader that took them: the fuzz cannot pass by looking away."""
    judge = Judge(world)
    case = build_case(world, 0, SEED, families=["tensor-other-values"])
    case.tensors = dict(world.tensors)  # the lie
    judge.run(case)
    flagged = {kind.split(":")[0] for kind in judge.kinds if "SILENT" in kind}
    assert flagged == {"read_lora_state", "load_lora_state", "AdapterPool.load"}, judge.kinds
    assert _state_changes(world) == []
