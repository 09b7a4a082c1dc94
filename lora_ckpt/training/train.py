"""Train one adapter on a store's base from labelled images: :func:`train_adapter`.

Everything a user can get wrong is checked before anything is written to the
store: the name, an existing adapter, the store itself, every image. Then
the run trains (a training checkpoint in ``STORE/work/training/NAME/`` after
every epoch, for ``resume``), keeps the epoch with the lowest validation
loss, saves the adapter atomically with its labels and its training record,
writes its report and removes the checkpoint.
"""

import dataclasses
import datetime
import os
import sys
import time

from .._tf import tf
from ..errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CorruptAdapterError,
    LoRAConfigError,
    StoreError,
)
from ..selection import select_state
from ..serving.store import (
    adapter_config_bytes,
    adapter_path,
    read_base_config,
    validate_adapter_name,
)
from ..state import save_lora_state
from ..state.training import StoreTrainingCheckpoint
from ..storage import open_store
from .callbacks import BestEpoch, ProgressBar, new_progress
from .datasets import ordered_batches, training_batches
from .evaluate import classification_report, predict_batches
from .folders import ImageFolder, scan_folder, split_validation
from .model import build_training_model, input_shape
from .reports import require_report_tools, write_report
from .settings import TrainSettings

__all__ = ["TrainResult", "train_adapter"]


WORK = ("work", "training")


@dataclasses.dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        name: The adapter's name.
        path: Where it was saved.
        labels: Its class names.
        epochs: Epochs trained (with any before a resume).
        best_epoch: The epoch whose weights were saved.
        val_accuracy, val_loss: Of the saved weights on the validation images.
        history: Per epoch: ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``.
        skipped: Files left out and why.
        report: The report directory.
        resumed_from: The epoch a resumed run started after (0: from scratch).
        seconds: Wall time.
    """

    name: str
    path: str
    labels: list[str]
    epochs: int
    best_epoch: int | None
    val_accuracy: float
    val_loss: float | None
    history: list[dict]
    skipped: dict
    report: str
    resumed_from: int
    seconds: float


def _work_path(store: str, name: str) -> str:
    """The training checkpoint directory of adapter ``name``: ``STORE/work/training/NAME``."""
    backend, store = open_store(store)
    return backend.join(store, *WORK, validate_adapter_name(name))


def _exists(store: str, name: str) -> bool:
    try:
        adapter_config_bytes(store, name)
    except AdapterNotFoundError:
        return False
    except CorruptAdapterError:
        return True  # broken, but there: replaced only when asked
    return True


def _check_target(store: str, name: str, overwrite: bool) -> str:
    validate_adapter_name(name)
    read_base_config(store)  # a missing store fails now
    path = adapter_path(store, name)
    if not overwrite and _exists(store, name):
        raise AdapterExistsError(
            f"Adapter {name} already exists in {store}: pass --overwrite (overwrite=True) to "
            "replace it, or choose another name."
        )
    return path


def _check_writable(store: str, name: str) -> None:
    """Writes and removes a probe in the work area: an unwritable store fails before training."""
    backend, _ = open_store(store)
    probe = backend.join(_work_path(store, name), f".probe-{os.getpid()}")
    try:
        backend.write(probe, b"")
        backend.remove_file(probe)
    except OSError as exc:
        raise StoreError(
            f"The store {store} cannot be written ({exc.strerror or exc}): check its "
            "permissions or credentials."
        ) from None


def _folders(data, val_data, settings: TrainSettings) -> tuple[ImageFolder, ImageFolder]:
    train = scan_folder(str(data), max_pixels=settings.max_pixels, strict=settings.strict)
    if val_data is None:
        train, val = split_validation(train, settings.val_split, settings.seed)
        if not val.files:
            raise StoreError(
                f"{data} has too few images to hold any out for validation: add images, or give "
                "validation folders (--val-data)."
            )
        return train, val
    val = scan_folder(
        str(val_data),
        max_pixels=settings.max_pixels,
        strict=settings.strict,
        classes=train.classes,
        min_classes=1,
    )
    return train, val


def _datasets(data, val_data, settings, shape, first_epoch):
    """``(train batches, steps, validation batches, train digest, counts)`` for either input kind."""
    if isinstance(data, ImageFolder):
        train, val = data, val_data
        batches, steps = training_batches(
            train, shape, settings.batch_size, settings.seed, first_epoch, settings.epochs
        )
        counts = {"train_images": len(train.files), "val_images": len(val.files)}
        return batches, steps, ordered_batches(val, shape, settings.batch_size), counts
    steps = int(data.cardinality().numpy())
    if steps < 1:
        raise LoRAConfigError(
            "A training dataset must have a known, non-zero number of batches (a finite "
            "dataset of (images, labels) batches)."
        )
    # One pass of the user's dataset per epoch, as fit would take it.
    batches = data.repeat(settings.epochs - first_epoch)
    return batches, steps, val_data, {"train_images": None, "val_images": None}


def _resolve_inputs(data, val_data, labels, settings):
    """Folders scanned (or datasets checked): ``(data, val_data, classes, digest, skipped)``."""
    if isinstance(data, tf.data.Dataset):
        if not isinstance(val_data, tf.data.Dataset):
            raise LoRAConfigError(
                "With a tf.data training dataset, give val_data as a tf.data dataset too: the "
                "best epoch is chosen by validation loss."
            )
        if not labels or not all(isinstance(label, str) for label in labels):
            raise LoRAConfigError("With tf.data datasets, give labels: one class name per class.")
        return data, val_data, list(labels), None, {}
    if labels is not None:
        raise LoRAConfigError("labels are the folder names with image folders; leave labels out.")
    train, val = _folders(data, val_data, settings)
    skipped = dict(train.skipped)
    if val_data is not None:
        skipped.update({f"(validation) {k}": v for k, v in val.skipped.items()})
    digest = train.digest if val_data is None else f"{train.digest}+{val.digest}"
    return train, val, train.classes, digest, skipped


def train_adapter(
    store: str,
    name: str,
    data,
    val_data=None,
    *,
    settings: TrainSettings | None = None,
    labels: list[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    tensorboard: str | None = None,
    log=print,
    progress=None,
    **kwargs,
) -> TrainResult:
    """Trains an adapter on a store's base and saves it into the store.

    Args:
        store: The adapter store (local directory, ``s3://``, ``memory://``):
            the base comes from its ``base.json`` and ``base.h5``.
        name: The adapter's name (1-64 letters, digits, ``_.-``).
        data: A folder with one folder of PNG/JPEG images per class (labels:
            the folder names, sorted), or a ``tf.data.Dataset`` of ``(images,
            labels)`` batches of model inputs preprocessed as the service does
            (:func:`lora_ckpt.preprocessing.preprocess_image`), with ``labels``.
        val_data: Validation images of the same classes (a folder or a
            dataset); default: ``settings.val_split`` of each class of ``data``.
        settings: A :class:`TrainSettings`; or give its fields as keyword
            arguments (``epochs=5, rank=8, ...``).
        labels: Class names, with datasets only.
        overwrite: Replace an adapter of that name.
        resume: Continue from the run's training checkpoint (after a crash or
            kill), if there is one; without it, a checkpoint is discarded.
        tensorboard: A directory for TensorBoard logs.
        log: Where messages go (``None``: nowhere).
        progress: A stream for the per-epoch progress bar (default stdout,
            ``False``: none).

    Returns:
        A :class:`TrainResult`.

    Raises:
        AdapterExistsError: If the adapter exists and not ``overwrite``.
        StoreError: For a store that is missing or cannot be written, and for
            image folders that cannot be used (no images, an empty class
            folder, a single class, an image over the pixel limit, or with
            ``strict`` any file that is not a readable image), and if ``resume``
            finds a checkpoint of other data or settings.
        LoRAConfigError: For invalid settings.

    """
    started = time.monotonic()
    say = log or (lambda *_: None)
    if settings is None:
        settings = TrainSettings(**kwargs)
    elif kwargs:
        raise LoRAConfigError(f"Give settings or keyword settings, not both: {sorted(kwargs)}.")
    require_report_tools(tensorboard=bool(tensorboard))
    target = _check_target(store, name, overwrite)
    data, val_data, classes, digest, skipped = _resolve_inputs(data, val_data, labels, settings)
    if skipped:
        say(f"Skipped {len(skipped)} file(s) that are not usable images (see the report).")
    _check_writable(store, name)

    tf.keras.utils.set_random_seed(settings.seed)
    model, _ = build_training_model(store, len(classes), settings)
    selection = select_state(model)
    checkpoint = StoreTrainingCheckpoint(model, _work_path(store, name))
    fingerprint = {"settings": settings.to_dict(), "data_digest": digest, "labels": classes}
    run = new_progress()
    best, first_epoch = None, 0
    if resume:
        state = checkpoint.state()
        if state is not None:
            mismatch = [k for k, v in fingerprint.items() if state.get(k) != v]
            if mismatch:
                raise StoreError(
                    f"The training checkpoint of {name} was made with other {', '.join(mismatch)}: "
                    "run without --resume to start over."
                )
            first_epoch, state, best = checkpoint.restore()
            run = {k: state[k] for k in new_progress()}
            say(f"Resuming {name} after epoch {first_epoch} of {settings.epochs}.")
        else:
            say(f"No training checkpoint of {name} to resume: starting from the first epoch.")
    elif checkpoint.state() is not None:
        say(f"Discarding an earlier unfinished run of {name} (pass --resume to continue one).")
        checkpoint.clear()

    shape = input_shape(model)
    n = len(data.files) if isinstance(data, ImageFolder) else None
    say(
        f"Training {name}: {len(classes)} classes ({', '.join(classes[:8])}"
        f"{', ...' if len(classes) > 8 else ''}), "
        + (f"{n} training and {len(val_data.files)} validation images, " if n is not None else "")
        + f"inputs {shape[0]}x{shape[1]}, up to {settings.epochs} epochs"
    )
    keeper = BestEpoch(selection.variables, settings.patience, run, best, checkpoint, fingerprint)
    if first_epoch < settings.epochs and not run["stopped"]:
        batches, steps, val_batches, counts = _datasets(
            data, val_data, settings, shape, first_epoch
        )
        callbacks = [keeper]
        if progress is not False:
            callbacks.append(ProgressBar(steps, keeper, stream=progress or sys.stdout))
        if tensorboard:
            callbacks.append(tf.keras.callbacks.TensorBoard(tensorboard))
        model.fit(
            batches,
            epochs=settings.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            validation_data=val_batches,
            verbose=0,
            callbacks=callbacks,
        )
    else:
        _, _, val_batches, counts = _datasets(data, val_data, settings, shape, 0)
    keeper.restore_best()
    validation = classification_report(*predict_batches(model, val_batches), classes)

    record = {
        "data_digest": digest,
        "epochs": len(run["history"]),
        "best_epoch": run["best_epoch"],
        "stopped_early": run["stopped"],
        "val_accuracy": validation["accuracy"],
        "val_loss": validation["loss"],
        **counts,
        "skipped": len(skipped),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
    }
    save_lora_state(
        model,
        target,
        labels=classes,
        metadata={"task": name, "training": record},
        overwrite=overwrite,
    )
    metrics = {
        "adapter": name,
        **record,
        "labels": classes,
        "history": run["history"],
        "validation": validation,
        "skipped_files": skipped,
    }
    report = write_report(store, name, metrics)
    checkpoint.clear()
    say(
        f"Saved {name} (best epoch {run['best_epoch']} of {len(run['history'])}): validation "
        f"accuracy {validation['accuracy']:.3f}, loss {validation['loss']:.4f}. Report: {report}"
    )
    return TrainResult(
        name=name,
        path=target,
        labels=classes,
        epochs=len(run["history"]),
        best_epoch=run["best_epoch"],
        val_accuracy=validation["accuracy"],
        val_loss=validation["loss"],
        history=run["history"],
        skipped=skipped,
        report=report,
        resumed_from=first_epoch,
        seconds=time.monotonic() - started,
    )
