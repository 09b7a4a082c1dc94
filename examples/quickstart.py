"""End-to-end quick start: LoRA-train a small ConvNeXt, merge, convert back.

Runs offline in well under a minute on a CPU: the data is generated here.
"""
import time

import numpy as np

import lora_ckpt
from lora_ckpt._tf import tf
from lora_ckpt.synthetic import make_task_dataset


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    started = time.perf_counter()

    # A small ConvNeXt (the same architecture as convnext_tiny, fewer channels).
    model = lora_ckpt.create_model(
        "convnext_tiny",
        embed_dim=(16, 32), nb_blocks=(1, 1), input_size=(32, 32), nb_classes=4,
        init_scale=1.0, lora_rank=4, lora_alpha=8.0,
    )
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    print(f"LoRA model: {model.count_params():,} parameters, {trainable:,} trainable")

    x_train, y_train = make_task_dataset("quadrant", 512, seed=0)
    x_test, y_test = make_task_dataset("quadrant", 256, seed=1)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=32, epochs=4, verbose=2)
    logits = model.predict(x_test, verbose=0)
    print(f"test accuracy (LoRA, unmerged): {np.mean(logits.argmax(-1) == y_test):.3f}")

    lora_ckpt.merge_weights(model)
    merged = model.predict(x_test, verbose=0)
    print(f"max |merged - unmerged| = {np.abs(merged - logits).max():.2e}")
    lora_ckpt.unmerge_lora_weights(model)

    regular = lora_ckpt.convert_to_regular_model(model)
    regular_logits = regular.predict(x_test, verbose=0)
    print(f"regular model {type(regular).__name__}: "
          f"max |regular - LoRA| = {np.abs(regular_logits - logits).max():.2e}")
    print(f"done in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
