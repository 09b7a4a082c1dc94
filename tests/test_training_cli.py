"""`lora-ckpt train` / `evaluate` end to end on real images (scikit-learn's
handwritten digits, shipped inside the package): the accuracy bar, evaluate
agreeing, the service answering with the folder names, a SIGKILLed run
resumed, many tasks on a local Ray cluster, an s3:// store."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.digits import make_training_store, split_digits, write_digits
from tests.helpers.http_server import ENV, Server

pytestmark = pytest.mark.slow


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lora_ckpt.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _metadata(store, name):
    with open(os.path.join(store, "adapters", name, "adapter_config.json")) as handle:
        return json.load(handle)["metadata"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_training_store(str(tmp_path_factory.mktemp("train") / "store"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Four digit classes: 120 training images each, the rest (~60 each) for validation."""
    return split_digits(str(tmp_path_factory.mktemp("digits")), classes=(0, 1, 2, 3), train=120)


def test_four_digits_train_to_the_bar_evaluate_agrees_and_the_service_names_them(store, digits):
    train, val = digits
    done = _cli(
        "train", "--store", store, "--name", "digits", "--data", train, "--val-data", val,
        "--epochs", "8", "--learning-rate", "0.01",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 8/8" in done.stdout and "val_accuracy" in done.stdout
    meta = _metadata(store, "digits")
    record = meta["training"]
    assert meta["labels"] == ["0", "1", "2", "3"]
    assert f"validation accuracy {record['val_accuracy']:.3f}" in done.stdout
    assert record["val_accuracy"] >= 0.8, done.stdout
    assert record["epochs"] == 8 and record["val_images"] == 240
    assert sorted(os.listdir(os.path.join(store, "reports", "digits"))) == [
        "confusion.png",
        "curves.png",
        "metrics.json",
    ]
    assert sorted(os.listdir(os.path.join(store, "adapters", "digits"))) == [
        "adapter.data-00000-of-00001",
        "adapter.index",
        "adapter_config.json",
    ]

    evaluated = _cli("evaluate", "--store", store, "--name", "digits", "--data", val, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    assert result["accuracy"] == pytest.approx(record["val_accuracy"], abs=1e-12)
    assert sum(map(sum, result["confusion"])) == 240
    hits = sum(result["confusion"][i][i] for i in range(4))
    assert hits / 240 == pytest.approx(result["accuracy"])
    for i, label in enumerate(result["labels"]):
        column = sum(row[i] for row in result["confusion"])
        assert result["per_class"][label]["recall"] == pytest.approx(
            result["confusion"][i][i] / sum(result["confusion"][i])
        )
        assert result["per_class"][label]["precision"] == pytest.approx(
            result["confusion"][i][i] / column
        )

    server = Server(store)
    try:
        server.wait()
        correct = 0
        for label in ("0", "1", "2", "3"):
            folder = os.path.join(val, label)
            for file_name in sorted(os.listdir(folder))[:3]:
                with open(os.path.join(folder, file_name), "rb") as handle:
                    answer = httpx.post(
                        f"{server.url}/predict/digits", files={"image": handle}, timeout=60
                    )
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["label"] == meta["labels"][body["class"]]
                correct += body["label"] == label
        assert correct >= 9  # of 12: the adapter's own accuracy, through the service
    finally:
        server.stop()


def test_a_killed_run_resumes_and_finishes_with_every_epoch(store, tmp_path):
    train = str(tmp_path / "train")
    write_digits(train, classes=(5, 6), per_class=60)
    command = [sys.executable, "-m", "lora_ckpt.cli", "train", "--store", store]
    command += ["--name", "killed", "--data", train, "--epochs", "8", "--batch-size", "8"]
    progress = os.path.join(store, "work", "training", "killed", "progress.json")
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    epoch = 0
    while epoch < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            with open(progress) as handle:
                epoch = json.load(handle)["epoch"]
        except (OSError, ValueError):
            pass
    assert proc.poll() is None and 2 <= epoch < 8, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not os.path.exists(os.path.join(store, "adapters", "killed"))

    done = _cli(*command[3:], "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_after = int(done.stdout.split("Resuming killed after epoch ")[1].split()[0])
    assert resumed_after >= epoch
    assert "epoch 1/8" not in done.stdout and "epoch 8/8" in done.stdout
    record = _metadata(store, "killed")["training"]
    assert record["epochs"] == 8
    with open(os.path.join(store, "reports", "killed", "metrics.json")) as handle:
        history = json.load(handle)["history"]
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert not os.path.exists(os.path.join(store, "work", "training", "killed"))


def test_two_tasks_train_on_a_local_ray_cluster_and_a_bad_one_fails_alone(store, tmp_path):
    pytest.importorskip("ray")
    for name, classes in (("low", (0, 1)), ("high", (8, 9))):
        write_digits(str(tmp_path / name), classes=classes, per_class=30)
    os.makedirs(tmp_path / "broken" / "empty")
    write_digits(str(tmp_path / "broken"), classes=(4,), per_class=3)
    tasks = [
        {"name": "ray-low", "data": "low"},
        {"name": "ray-high", "data": "high", "epochs": 3},
        {"name": "ray-broken", "data": "broken"},
    ]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    done = _cli(
        "train", "--store", store, "--tasks", str(tmp_path / "tasks.json"), "--ray",
        "--num-cpus", "2", "--epochs", "2", "--batch-size", "16",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("adapter ") :]
    assert "2 of 3 adapter(s) trained." in table
    assert "holds no PNG/JPEG image" in table
    assert _metadata(store, "ray-low")["labels"] == ["0", "1"]
    assert _metadata(store, "ray-high")["labels"] == ["8", "9"]
    assert _metadata(store, "ray-high")["training"]["epochs"] == 3
    assert _metadata(store, "ray-low")["training"]["epochs"] == 2
    assert not os.path.exists(os.path.join(store, "adapters", "ray-broken"))


def test_training_into_an_s3_store(tmp_path):
    pytest.importorskip("s3fs")
    import lora_ckpt
    from tests.helpers.scale import moto_s3

    train = str(tmp_path / "train")
    write_digits(train, classes=(1, 7), per_class=16)
    with moto_s3("lora"):
        store = "s3://lora/store"
        make_training_store(store)
        result = lora_ckpt.train_adapter(
            store, "ones", train, epochs=2, batch_size=8, val_split=0.25, progress=False, log=None
        )
        state = lora_ckpt.read_lora_state(f"{store}/adapters/ones")
        assert state.config.metadata["labels"] == ["1", "7"] == result.labels
        evaluated = lora_ckpt.evaluate_adapter(store, "ones", train)
        assert evaluated["images"] == 32
        backend = lora_ckpt.storage.open_store(store)[0]
        assert backend.exists(f"{store}/reports/ones/curves.png")
        assert not backend.exists(f"{store}/work/training/ones/progress.json")
