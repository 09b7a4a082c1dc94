"""A folder of labelled images, as Keras' ``image_dataset_from_directory`` lays it out.

::

    DIR/
      cat/  a.png  b.jpg  more/c.jpeg ...
      dog/  ...

One folder per class (searched recursively, symbolic links not followed),
labels the folder names in sorted order. Every file is checked before any
training starts: its header must say PNG or JPEG (Pillow reads it, as the
service does) within the pixel limit, and its pixels must decode. Files that
are not images or cannot be read are skipped and counted (refused with
``strict``); an image over the pixel limit, an empty class folder, a single
class or no image at all is an error. No TensorFlow here.
"""

import dataclasses
import hashlib
import io
import os
import stat

from PIL import Image, UnidentifiedImageError

from ..errors import StoreError

__all__ = ["ImageFolder", "scan_folder", "split_validation"]


EXTENSIONS = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
MAX_FILE_BYTES = 64 << 20
"""The largest image file read: a larger one is skipped as unreadable."""


@dataclasses.dataclass
class ImageFolder:
    """The images of a folder tree and their labels.

    Attributes:
        root: The folder.
        classes: Class names, the index of each is its label.
        files: Absolute paths of the images, in sorted order.
        labels: The label of each file.
        skipped: Relative path -> why it was skipped.
        digest: ``sha256:`` over every image's class, relative path and
            bytes: another file, a changed byte or a renamed class changes it.
    """

    root: str
    classes: list[str]
    files: list[str]
    labels: list[int]
    skipped: dict[str, str]
    digest: str

    def counts(self) -> list[int]:
        """Images per class."""
        return [self.labels.count(i) for i in range(len(self.classes))]


def _fail(message: str):
    raise StoreError(message)


def _image_problem(data: bytes, max_pixels: int, where: str) -> str | None:
    """Why ``data`` is no usable image (``None`` if it is); raises past the pixel limit."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format not in FORMATS:
                return f"a {image.format} image, not PNG or JPEG"
            if width * height > max_pixels:
                _fail(
                    f"{where} has {width}x{height} pixels, over the limit of {max_pixels} "
                    "(the service refuses such images too): shrink it, remove it, or raise "
                    "--max-pixels."
                )
            image.load()  # every pixel decodes: a truncated file is found now, not mid-training
    except Image.DecompressionBombError:
        _fail(f"{where} is over Pillow's decompression-bomb limit: shrink or remove it.")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image ({exc!s:.80})"
    return None


def _walk(folder: str):
    """Regular files under ``folder`` (relative paths, sorted), and the other entries."""
    found, others = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends: nobody's data
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            inner, inner_others = _walk(entry.path)
            found += [os.path.join(entry.name, name) for name in inner]
            others += [os.path.join(entry.name, name) for name in inner_others]
        elif stat.S_ISREG(mode):
            found.append(entry.name)
        else:
            others.append(entry.name)
    return found, others


def _class_folders(root: str) -> tuple[list[str], list[str]]:
    if not os.path.isdir(root):
        _fail(f"No image folder at {root}: give a directory with one folder of images per class.")
    classes, stray = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            classes.append(entry.name)
        else:
            stray.append(entry.name)
    return classes, stray


def scan_folder(
    root: str,
    *,
    max_pixels: int,
    strict: bool = False,
    classes: list[str] | None = None,
    min_classes: int = 2,
) -> ImageFolder:
    """Lists and checks the images of a class-per-folder tree.

    Args:
        root: The folder.
        max_pixels: The largest image (width x height) accepted.
        strict: Refuse the folder if any file is skipped.
        classes: The classes the labels index (validation or evaluation
            data of a trained adapter): a folder of another name is refused,
            a class may have no folder. Default: the folder names, sorted.
        min_classes: How many classes must hold images.

    Returns:
        The :class:`ImageFolder`.

    Raises:
        StoreError: No such folder, no class folders or images, an empty class
            folder, fewer than ``min_classes`` classes, a folder not in
            ``classes``, an image over ``max_pixels``, or (``strict``) a
            skipped file.
    """
    root = os.path.abspath(root)
    folders, stray = _class_folders(root)
    if not folders:
        _fail(
            f"{root} has no class folders: put each class's images in a folder of its own "
            "(DIR/cat/*.png, DIR/dog/*.png)."
        )
    names = sorted(folders) if classes is None else list(classes)
    unknown = [f for f in folders if f not in names]
    if unknown:
        _fail(f"{root} has folders {unknown} that are not classes of the adapter {names}.")
    skipped = {name: "not inside a class folder" for name in stray}
    files, labels, digest = [], [], hashlib.sha256()
    for folder in folders:
        found, others = _walk(os.path.join(root, folder))
        skipped.update({os.path.join(folder, o): "not a regular file" for o in others})
        kept = 0
        for relative in found:
            where = os.path.join(folder, relative)
            path = os.path.join(root, where)
            if not relative.lower().endswith(EXTENSIONS):
                skipped[where] = "not a .png/.jpg/.jpeg file"
                continue
            try:
                if os.path.getsize(path) > MAX_FILE_BYTES:
                    skipped[where] = f"larger than {MAX_FILE_BYTES} bytes"
                    continue
                with open(path, "rb") as handle:
                    data = handle.read(MAX_FILE_BYTES + 1)
            except OSError as exc:
                skipped[where] = f"cannot be read ({exc.strerror or exc})"
                continue
            problem = _image_problem(data, max_pixels, path)
            if problem is not None:
                skipped[where] = problem
                continue
            files.append(path)
            labels.append(names.index(folder))
            digest.update(f"{where}\0{hashlib.sha256(data).hexdigest()}\n".encode())
            kept += 1
        if kept == 0:
            _fail(
                f"The class folder {os.path.join(root, folder)} holds no PNG/JPEG image: add "
                "images or remove the folder."
            )
    if strict and skipped:
        listed = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
        _fail(
            f"{len(skipped)} file(s) of {root} are not usable images ({listed}); --strict refuses them."
        )
    present = sorted(set(labels))
    if len(present) < min_classes:
        _fail(
            f"{root} has {len(present)} class(es) with images; a classifier needs at least "
            f"{min_classes}: add a folder per class."
        )
    return ImageFolder(root, names, files, labels, skipped, f"sha256:{digest.hexdigest()}")


def split_validation(folder: ImageFolder, fraction: float, seed: int):
    """Holds out ``fraction`` of each class for validation, by a seeded draw.

    Every class of two images or more gives at least one; a class of one
    image stays in training.

    Returns:
        ``(train, validation)``: two :class:`ImageFolder` s of the same classes
        and digest.
    """
    import random

    rng = random.Random(seed)
    train, val = [], []
    for label in range(len(folder.classes)):
        members = [i for i, lab in enumerate(folder.labels) if lab == label]
        rng.shuffle(members)
        count = 0 if len(members) < 2 else max(1, round(fraction * len(members)))
        val += members[:count]
        train += members[count:]

    def part(indices):
        indices = sorted(indices)
        return dataclasses.replace(
            folder,
            files=[folder.files[i] for i in indices],
            labels=[folder.labels[i] for i in indices],
        )

    return part(train), part(val)
