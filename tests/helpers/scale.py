"""What the scale-out tests and benchmark share: a real S3 server on loopback
(moto's standalone server) and a tiny adapter store built in seconds."""

import contextlib
import logging
import os
import urllib.request

import numpy as np

from lora_ckpt import tf
from lora_ckpt.serving.store import adapter_path, build_base_model, write_base
from lora_ckpt.state import save_lora_state
from lora_ckpt.storage import open_store

MODEL = "convnext_tiny"
CONFIG = dict(
    embed_dim=[8, 16],
    nb_blocks=[1, 1],
    input_size=[32, 32],
    nb_classes=4,
    init_scale=1.0,
    drop_path_rate=0.0,
)
LORA = {
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "lora_layer_groups": ["mlp", "head"],
    "lora_train_bias": "lora_only",
}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_s3(bucket: str = "lora"):
    """A moto S3 server on 127.0.0.1 (a free port) with ``bucket`` created (and
    nothing else); the AWS_* variables point at it meanwhile. Yields those variables."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **CREDENTIALS}
    # moto keeps its buckets in process-wide memory: start from none, whoever ran before.
    urllib.request.urlopen(
        urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"),
        timeout=30,
    ).close()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        open_store("s3://")[0].remote.fs.mkdir(bucket)
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def vary(model, seed: int, scale: float = 0.2) -> None:
    """Gives every trainable variable (LoRA A/B, biases, head) its own values."""
    rng = np.random.default_rng(seed)
    for var in model.trainable_variables:
        noise = rng.normal(0, scale, var.shape).astype(var.dtype.as_numpy_dtype)
        var.assign(var.numpy() + noise)


def make_tiny_store(path: str, names=("a0", "a1", "a2"), seed: int = 0) -> list[str]:
    """A store with a tiny ConvNeXt base and one random adapter per name (no training).

    Returns:
        The adapter names.
    """
    import tfimm

    tf.keras.utils.set_random_seed(seed)
    base = tfimm.create_model(
        MODEL, **{k: tuple(v) if isinstance(v, list) else v for k, v in CONFIG.items()}
    )
    write_base(path, MODEL, CONFIG, LORA, base)
    for i, name in enumerate(names):
        model, _ = build_base_model(path)
        vary(model, seed * 1000 + i)
        save_lora_state(
            model,
            adapter_path(path, name),
            overwrite=True,
            metadata={"task": name},
            labels=[f"{name}-{c}" for c in range(CONFIG["nb_classes"])],
        )
    return list(names)


def images(n: int = 4, seed: int = 7) -> np.ndarray:
    """Inputs for the tiny store's model."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype("float32")
