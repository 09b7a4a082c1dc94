"""Training from folders, fast lane: the folder rules, the settings, the
metrics against scikit-learn, the service's preprocessing, a training
checkpoint's round trip and one tiny run into a memory:// store."""

import io
import json
import os
import uuid

import numpy as np
import pytest
from PIL import Image

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import (
    AdapterExistsError,
    LoRAConfigError,
    StoreError,
)
from lora_ckpt.serving.inputs import decode_image
from lora_ckpt.storage import open_store
from lora_ckpt.training.datasets import epoch_order, ordered_batches, training_batches
from lora_ckpt.training.evaluate import classification_report
from lora_ckpt.training.fanout import read_tasks, summary_table
from lora_ckpt.training.folders import scan_folder, split_validation
from lora_ckpt.training.settings import TrainSettings
from tests.helpers.digits import make_training_store, write_digits

PIXELS = 4096 * 4096


def _png(path, size=(8, 8), value=128, mode="L", fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)


def _tree(root, classes=("a", "b"), per_class=3):
    for name in classes:
        for i in range(per_class):
            _png(os.path.join(root, name, f"{i}.png"), value=40 * i)
    return str(root)


def _listing(store):
    backend, path = open_store(store)
    found, stack = [], [path]
    while stack:
        directory = stack.pop()
        for name, entry in backend.listdir(directory).items():
            child = backend.join(directory, name)
            (stack.append if entry.kind == "dir" else found.append)(child)
    return sorted(found)


# ---- folders ----


def test_labels_are_the_sorted_folder_names_and_subfolders_count(tmp_path):
    _tree(tmp_path, classes=("zebra", "ant", "mole"), per_class=2)
    _png(str(tmp_path / "ant" / "deeper" / "x.jpg"), fmt="JPEG")
    folder = scan_folder(str(tmp_path), max_pixels=PIXELS)
    assert folder.classes == ["ant", "mole", "zebra"]
    assert folder.counts() == [3, 2, 2]
    assert folder.files[2].endswith(os.path.join("ant", "deeper", "x.jpg"))
    assert folder.skipped == {}


def test_non_images_and_unreadable_files_are_skipped_and_counted(tmp_path):
    root = _tree(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / "fake.png").write_bytes(b"not a png at all")
    good = io.BytesIO()
    Image.new("RGB", (16, 16), 7).save(good, format="PNG")
    (tmp_path / "b" / "truncated.png").write_bytes(good.getvalue()[:40])
    _png(str(tmp_path / "b" / "anim.png"), fmt="GIF")  # a GIF behind a .png name
    (tmp_path / "stray.png").write_bytes(good.getvalue())
    folder = scan_folder(root, max_pixels=PIXELS)
    assert folder.counts() == [3, 3]
    assert sorted(folder.skipped) == [
        os.path.join("a", "fake.png"),
        os.path.join("a", "notes.txt"),
        os.path.join("b", "anim.png"),
        os.path.join("b", "truncated.png"),
        "stray.png",
    ]
    with pytest.raises(StoreError, match="5 file\\(s\\).*--strict"):
        scan_folder(root, max_pixels=PIXELS, strict=True)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "No image folder"),
        ({"a": 2, "b": 0}, "holds no PNG/JPEG image"),
        ({"a": 3}, "at least 2"),
        ({"files_only": True}, "no class folders"),
    ],
)
def test_folders_a_classifier_cannot_learn_from_are_refused(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout.get("files_only"):
        _png(str(root / "x.png"))
    for name, count in layout.items():
        if name == "files_only":
            continue
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            _png(str(root / name / f"{i}.png"))
    with pytest.raises(StoreError, match=message):
        scan_folder(str(root), max_pixels=PIXELS)


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path):
    root = _tree(tmp_path)
    _png(str(tmp_path / "a" / "big.png"), size=(300, 200))
    with pytest.raises(StoreError, match="300x200 pixels, over the limit of 50000"):
        scan_folder(root, max_pixels=50_000)


def test_validation_folders_must_name_known_classes(tmp_path):
    _tree(tmp_path / "val", classes=("a", "c"))
    with pytest.raises(StoreError, match=r"\['c'\] that are not classes"):
        scan_folder(str(tmp_path / "val"), max_pixels=PIXELS, classes=["a", "b"], min_classes=1)


def test_the_split_holds_out_each_class_by_seed(tmp_path):
    _tree(tmp_path, classes=("a", "b", "c"), per_class=10)
    _png(str(tmp_path / "d" / "only.png"))
    folder = scan_folder(str(tmp_path), max_pixels=PIXELS)
    train, val = split_validation(folder, 0.2, seed=3)
    assert val.counts() == [2, 2, 2, 0] and train.counts() == [8, 8, 8, 1]
    assert sorted(train.files + val.files) == sorted(folder.files)
    again = split_validation(folder, 0.2, seed=3)[1]
    assert again.files == val.files != split_validation(folder, 0.2, seed=4)[1].files


def test_the_digest_changes_with_a_byte_or_a_renamed_class(tmp_path):
    root = _tree(tmp_path)
    first = scan_folder(root, max_pixels=PIXELS).digest
    assert scan_folder(root, max_pixels=PIXELS).digest == first
    _png(str(tmp_path / "a" / "0.png"), value=1)
    second = scan_folder(root, max_pixels=PIXELS).digest
    os.rename(tmp_path / "b", tmp_path / "c")
    assert len({first, second, scan_folder(root, max_pixels=PIXELS).digest}) == 3


# ---- settings, tasks, metrics ----


@pytest.mark.parametrize(
    "values",
    [{"epochs": 0}, {"rank": 0}, {"learning_rate": -1.0}, {"val_split": 1.0}, {"patience": 0}],
)
def test_bad_settings_are_refused_by_name(values):
    with pytest.raises(LoRAConfigError, match=next(iter(values))):
        TrainSettings(**values)


def test_targets_that_are_all_group_names_become_layer_groups():
    groups = {"mlp", "head"}
    assert TrainSettings(targets=["mlp"]).lora_overrides(groups)["lora_layer_groups"] == ("mlp",)
    paths = TrainSettings(targets=["stages/0/*"]).lora_overrides(groups)
    assert paths["lora_target_layers"] == ("stages/0/*",) and "lora_layer_groups" not in paths
    assert TrainSettings(rank=8).lora_overrides(groups) == {
        "lora_rank": 8,
        "lora_train_classifier": True,
    }


def test_a_tasks_file_resolves_folders_beside_it_and_takes_defaults(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(
        json.dumps([{"name": "a", "data": "a/train", "epochs": 2}, {"name": "b", "data": "/x"}])
    )
    tasks = read_tasks(str(path), {"epochs": 5, "rank": 2})
    assert tasks[0]["data"] == str(tmp_path / "a" / "train") and tasks[1]["data"] == "/x"
    assert [t["settings"]["epochs"] for t in tasks] == [2, 5]
    assert tasks[1]["settings"]["rank"] == 2
    for bad, message in (
        ([{"name": "a"}], 'needs "data"'),
        ([{"name": "a", "data": "x"}, {"name": "a", "data": "y"}], "twice"),
        ([{"name": "a", "data": "x", "epoch": 3}], "Unknown training settings"),
        ({"tasks": []}, "JSON list of tasks"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(LoRAConfigError, match=message):
            read_tasks(str(path))
    rows = [
        {
            "name": "a",
            "status": "ok",
            "epochs": 2,
            "best_epoch": 2,
            "val_accuracy": 0.9,
            "seconds": 3,
        },
        {"name": "b", "status": "failed", "error": "StoreError: no images", "seconds": 1},
    ]
    table = summary_table(rows)
    assert "0.900" in table and "StoreError: no images" in table and "1 of 2" in table


def test_the_classification_report_matches_scikit_learn():
    from sklearn.metrics import confusion_matrix, log_loss, precision_score, recall_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 2.0 * np.eye(4)[labels]
    logits[:, 3] = -10.0  # class 3 never predicted: its precision is undefined
    report = classification_report(labels, logits, ["w", "x", "y", "z"])
    predicted = logits.argmax(-1)
    assert report["confusion"] == confusion_matrix(labels, predicted, labels=range(4)).tolist()
    assert report["accuracy"] == pytest.approx(np.mean(predicted == labels))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert report["loss"] == pytest.approx(log_loss(labels, probs, labels=range(4)), rel=1e-9)
    precision = precision_score(labels, predicted, labels=range(4), average=None, zero_division=0)
    recall = recall_score(labels, predicted, labels=range(4), average=None)
    for i, name in enumerate("wxyz"):
        row = report["per_class"][name]
        assert row["recall"] == pytest.approx(recall[i])
        assert row["support"] == int(np.sum(labels == i))
        if i < 3:
            assert row["precision"] == pytest.approx(precision[i])
    assert report["per_class"]["z"]["precision"] is None


# ---- the service's preprocessing ----


@pytest.mark.parametrize("fmt, mode", [("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB")])
def test_training_inputs_are_bit_for_bit_what_the_service_computes(tmp_path, fmt, mode):
    rng = np.random.default_rng(1)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (23, 37, channels), dtype=np.uint8).squeeze()
    path = tmp_path / "c0" / f"x.{fmt.lower()}"
    os.makedirs(path.parent)
    Image.fromarray(pixels, mode=mode).save(path, format=fmt)
    _png(str(tmp_path / "c1" / "y.png"))
    folder = scan_folder(str(tmp_path), max_pixels=PIXELS)
    images, labels = next(iter(ordered_batches(folder, (32, 32, 3), 8)))
    served = decode_image(path.read_bytes(), (32, 32, 3), PIXELS)
    np.testing.assert_array_equal(images.numpy()[0], served)
    assert labels.numpy().tolist() == [0, 1]


def test_each_epoch_sees_every_image_once_in_an_order_drawn_from_its_epoch(tmp_path):
    _tree(tmp_path, per_class=5)
    folder = scan_folder(str(tmp_path), max_pixels=PIXELS)
    dataset, steps = training_batches(folder, (8, 8, 3), 4, seed=1, first_epoch=1, epochs=3)
    labels = [b.numpy().tolist() for _, b in dataset]
    assert steps == 3 and [len(b) for b in labels] == [4, 4, 2] * 2
    for epoch, chunk in ((1, labels[:3]), (2, labels[3:])):
        expected = np.asarray(folder.labels)[epoch_order(10, 1, epoch)].tolist()
        assert sum(chunk, []) == expected


# ---- training checkpoints in any store ----


@pytest.mark.slow  # seconds: a fit, two models
def test_a_store_training_checkpoint_restores_weights_optimizer_and_best(tiny_convnext, images):
    from lora_ckpt.state.training import StoreTrainingCheckpoint

    model = tiny_convnext
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="mse")
    model.fit(images, np.zeros((4, 4)), epochs=2, verbose=0)
    directory = f"memory://train-ckpt-{uuid.uuid4().hex}/work"
    saver = StoreTrainingCheckpoint(model, directory)
    best = {k: v.numpy() + 1 for k, v in saver.selection.variables.items()}
    saver.save(2, {"history": [1, 2]}, best)
    saver.save(3, {"history": [1, 2, 3]}, best)  # replaces the first, removes its files
    assert len(_listing(directory)) == 4  # index, data, best, progress.json
    expected = [v.numpy() for v in model.optimizer.variables()] + [
        v.numpy() for v in saver.selection.variables.values()
    ]

    tf.keras.utils.set_random_seed(5)
    other = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **_tiny())
    other.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="mse")
    restorer = StoreTrainingCheckpoint(other, directory)
    epoch, state, kept = restorer.restore()
    assert epoch == 3 and state == {"history": [1, 2, 3]}
    got = [v.numpy() for v in other.optimizer.variables()] + [
        v.numpy() for v in restorer.selection.variables.values()
    ]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    for key, value in best.items():
        np.testing.assert_array_equal(kept[key], value)

    backend, path = open_store(directory)
    progress = json.loads(backend.read(backend.join(path, "progress.json"), 1 << 20))
    data_file = next(n for n in progress["files"] if ".data-" in n)
    progress["files"][data_file]["sha256"] = "0" * 64  # the bytes are no longer the recorded ones
    backend.write(backend.join(path, "progress.json"), json.dumps(progress).encode())
    with pytest.raises(StoreError, match="damaged"):
        restorer.restore()
    restorer.clear()
    assert restorer.restore() is None


def _tiny():
    from tests.conftest import TINY_CONVNEXT

    return TINY_CONVNEXT


# ---- a tiny run, memory:// ----


@pytest.fixture(scope="module")
def memory_store():
    store = f"memory://training-{uuid.uuid4().hex}/store"
    return make_training_store(store, taken=("taken",))


def test_refusals_write_nothing_to_the_store(memory_store, tmp_path):
    data = _tree(tmp_path / "ok")
    before = _listing(memory_store)
    with pytest.raises(AdapterExistsError, match="--overwrite"):
        lora_ckpt.train_adapter(memory_store, "taken", data, epochs=1)
    os.makedirs(tmp_path / "bad" / "a")
    _png(str(tmp_path / "bad" / "b" / "0.png"))
    with pytest.raises(StoreError, match="holds no PNG/JPEG"):
        lora_ckpt.train_adapter(memory_store, "new", str(tmp_path / "bad"), epochs=1)
    with pytest.raises(LoRAConfigError, match="Invalid adapter name"):
        lora_ckpt.train_adapter(memory_store, "../escape", data, epochs=1)
    with pytest.raises(StoreError, match="not an adapter store"):
        lora_ckpt.train_adapter(f"{memory_store}-missing", "new", data, epochs=1)
    assert _listing(memory_store) == before


def test_an_unwritable_store_is_refused_before_training(tmp_path):
    store = tmp_path / "store"
    make_training_store(str(store))
    data = _tree(tmp_path / "data")
    os.chmod(store, 0o555)
    if os.access(store, os.W_OK):
        # root writes through permissions: a file where the work area's
        # directory must go stops the write as surely.
        os.chmod(store, 0o755)
        (store / "work").write_bytes(b"")
    before = sorted((p, p.stat().st_size) for p in store.rglob("*"))
    try:
        with pytest.raises(StoreError, match="cannot be written"):
            lora_ckpt.train_adapter(str(store), "digits", data, epochs=1)
    finally:
        os.chmod(store, 0o755)
    assert sorted((p, p.stat().st_size) for p in store.rglob("*")) == before


@pytest.mark.slow  # seconds: two epochs, a report, an evaluation
def test_a_tiny_run_saves_labels_record_and_report_and_evaluates_alike(memory_store, tmp_path):
    train = tmp_path / "train"
    labels = write_digits(str(train), classes=(0, 7, 4), per_class=12)
    (train / "7" / "readme.txt").write_text("not an image")
    result = lora_ckpt.train_adapter(
        memory_store, "digits", str(train), epochs=2, batch_size=8, val_split=0.25, progress=False
    )
    assert result.labels == ["0", "4", "7"] == labels and result.epochs == 2
    assert result.skipped == {os.path.join("7", "readme.txt"): "not a .png/.jpg/.jpeg file"}
    state = lora_ckpt.read_lora_state(f"{memory_store}/adapters/digits")
    meta = state.config.metadata
    assert meta["labels"] == ["0", "4", "7"]
    record = meta["training"]
    assert record["epochs"] == 2 and record["train_images"] == 27 and record["val_images"] == 9
    assert record["data_digest"].startswith("sha256:") and record["skipped"] == 1
    assert record["val_accuracy"] == result.val_accuracy
    files = _listing(memory_store)
    report = [f for f in files if "/reports/digits/" in f]
    assert sorted(os.path.basename(f) for f in report) == [
        "confusion.png",
        "curves.png",
        "metrics.json",
    ]
    assert not [f for f in files if "/work/" in f]  # the checkpoint is gone after success
    backend, _ = open_store(memory_store)
    metrics = json.loads(backend.read(f"{memory_store}/reports/digits/metrics.json", 1 << 20))
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    best = metrics["history"][record["best_epoch"] - 1]
    assert best["val_accuracy"] == pytest.approx(record["val_accuracy"], abs=1e-6)
    assert best["val_loss"] == pytest.approx(record["val_loss"], rel=1e-4)

    evaluated = lora_ckpt.evaluate_adapter(memory_store, "digits", str(train))
    assert evaluated["images"] == 36 and evaluated["labels"] == ["0", "4", "7"]
    assert np.sum(evaluated["confusion"]) == 36
    with pytest.raises(StoreError, match="not classes of the adapter"):
        lora_ckpt.evaluate_adapter(memory_store, "digits", str(tmp_path / "train" / ".."))
