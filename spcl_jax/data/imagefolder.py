"""Image-folder datasets: generic `root/<split>/<class>/<image>` (or unlabeled `root/train/<image>`), ImageNet,
ImageNet-100, Tiny ImageNet.

Files are listed and their headers checked when the dataset is opened (threaded; PIL reads only the
first bytes), so a non-image, corrupt or oversized (decompression-bomb) file, or a named pipe, socket,
device or directory where an image should be, stops the run before training starts, naming the file,
or is dropped with a warning under `skip_bad_images`. Pixels are decoded later, batch by batch.
The header checks of a split are cached (`listing_cache_dir`) under its class folders' (path,
modification time, entry count): a resume or a second run lists the folders but opens no file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from spcl_jax.data import decode
from spcl_jax.data.sources import UNLABELED
from spcl_jax.errors import DataError

if TYPE_CHECKING:
    import numpy.typing as npt

# ImageNet-100 of the CMC paper (Tian, Krishnan & Isola 2019, "Contrastive Multiview Coding"):
# the 100 wnids of `imagenet100.txt` in github.com/HobbitLong/CMC, in that file's order. Checked
# identical in two public copies (a torchvision ImageNet100 class and a dataset helper that cites
# the same file). Class index = position in sorted order, like an ImageFolder of these 100 folders.
IMAGENET100_CMC = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890",
    "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505",
    "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376",
    "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168",
    "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630",
    "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)
IMAGENET100_CHOICES = ("first100", "cmc")
FOLDER_LAYOUT = "DIR/train/<class>/<image> plus DIR/val/<class>/<image> or DIR/test/<class>/<image>"
UNLABELED_LAYOUT = "DIR/train/<image> (no class folders: unlabeled images, for pretraining only)"
TINY_LAYOUT = "DIR/train/<wnid>/images/*.JPEG, DIR/val/images/*.JPEG and DIR/val/val_annotations.txt (the tiny-imagenet-200 zip)"
SCAN_THREADS = 16  # header checks are I/O bound: more threads than cores pay off
WAKE_SECONDS = 0.2  # how often the waiting main thread wakes to run a pending Ctrl-C (see _next_result)


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def _list_dir(path):
    with os.scandir(path) as entries:
        return _visible(e.name for e in entries)


NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode):
    """What a file that is not a regular file is ("a named pipe"), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for is_kind, name in NOT_REGULAR if is_kind(mode)), "a special file")


def header_error(path: str) -> str | None:
    """None if PIL recognises the file as an image within PIL's decompression-bomb limit, else the reason.

    Only regular files are opened, and without blocking: opening a named pipe or a device could wait forever.
    """
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind:
            return f"{kind}, not a regular file"
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f, Image.open(f) as image:
            return decode.too_many_pixels(image.height, image.width)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def header_errors(paths: Sequence[str]) -> dict[str, str]:
    """{path: reason} of the files among `paths` that PIL does not recognise as images.

    Daemon threads check them while this thread waits on a queue, which Ctrl-C interrupts: a check stuck on
    a hung file system then blocks neither the KeyboardInterrupt nor the interpreter's exit (a
    ThreadPoolExecutor would join its stuck threads on both).
    """
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for path in paths:
        todo.put(path)
    for _ in range(min(SCAN_THREADS, len(paths))):
        threading.Thread(target=_check_queued, args=(todo, done, stop), daemon=True).start()
    errors = {}
    try:
        for _ in paths:
            path, error = _next_result(done)
            if isinstance(error, Exception):
                raise error
            if error is not None:
                errors[path] = error
    finally:
        stop.set()
    return {path: errors[path] for path in paths if path in errors}


def _next_result(done):
    """`done.get()` in slices of WAKE_SECONDS: a Ctrl-C that the kernel hands to one of the scan threads is only
    raised in this (the main) thread when it next runs, which a wait without a timeout would put off until a
    result arrives (never, on a hung file system)."""
    while True:
        try:
            return done.get(timeout=WAKE_SECONDS)
        except queue.Empty:
            pass


def _check_queued(todo, done, stop):
    """A scan thread: (path, header_error(path) or the exception it raised) of queued paths, until none is
    left or the scan stopped."""
    while not stop.is_set():
        try:
            path = todo.get_nowait()
        except queue.Empty:
            return
        try:
            done.put((path, header_error(path)))
        except Exception as e:  # raised again by the waiting thread
            done.put((path, e))


def cached_header_errors(paths: Sequence[str], folders: dict[str, int], cache_dir: str) -> dict[str, str]:
    """`header_errors(paths)`, read from `cache_dir` when the `folders` ({folder: number of files listed})
    holding the paths still have the modification times and file counts they had when it was written
    (else computed and written)."""
    stamps = [[os.path.abspath(folder), os.stat(folder).st_mtime_ns, count] for folder, count in folders.items()]
    cache = None
    if cache_dir:
        digest = hashlib.sha256(json.dumps([stamp[0] for stamp in stamps]).encode()).hexdigest()[:32]
        cache = os.path.join(os.path.expanduser(cache_dir), f"{digest}.json")
        try:
            with open(cache) as f:
                saved = json.load(f)
            if saved["folders"] == stamps:
                logging.info("header checks of %d files read from %s", len(paths), cache)
                return saved["bad"]
        except (OSError, ValueError, KeyError):
            pass
    errors = header_errors(paths)
    if cache is not None:
        try:
            from spcl_jax.storage import write_atomic

            os.makedirs(os.path.dirname(cache), exist_ok=True)
            write_atomic(cache, lambda f: f.write(json.dumps({"folders": stamps, "bad": errors}).encode()))
        except OSError as e:
            logging.warning("could not cache the header checks in %s (%s): they are repeated next time", cache, e)
    return errors


def check_images(paths: Sequence[str], labels: npt.ArrayLike, *, skip_bad: bool, hint: str,
                 errors: dict[str, str] | None = None) -> tuple[list[str], np.ndarray]:
    """Drop (with a warning) or reject (DataError) files that are not readable images; `errors` are
    their header errors when known ({path: reason}, e.g. from `cached_header_errors`)."""
    errors = header_errors(paths) if errors is None else errors
    bad = [i for i, path in enumerate(paths) if path in errors]
    if bad and not skip_bad:
        i = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"{paths[i]} is not a readable image ({errors[paths[i]]}){more}: delete or replace it, "
            f"or pass --config.skip_bad_images=True to skip bad files ({hint})"
        )
    for i in bad:
        logging.warning("skipping %s: not a readable image (%s)", paths[i], errors[paths[i]])
    keep = np.setdiff1d(np.arange(len(paths)), bad)
    return [paths[i] for i in keep], np.asarray(labels, np.int64)[keep]


def require_dir(path: str, what: str, layout: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{what} {path} does not exist or is not a directory: expected the layout {layout}")


def scan_classes(split_dir: str, classes: Sequence[str], *, skip_bad: bool, layout: str, subdir: str = "",
                 cache_dir: str = "") -> tuple[list[str], np.ndarray]:
    """(paths, labels) of `split_dir/<class>[/subdir]/<file>` for the given class folder names."""
    require_dir(split_dir, "image folder", layout)
    paths, labels, folders = [], [], {}
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name, subdir) if subdir else os.path.join(split_dir, name)
        require_dir(folder, "class folder", layout)
        files = _list_dir(folder)
        if not files:
            raise DataError(f"class folder {folder} is empty: put its images there or remove the folder (layout {layout})")
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
        folders[folder] = len(files)
    paths, labels = check_images(paths, labels, skip_bad=skip_bad, hint=f"layout {layout}",
                                 errors=cached_header_errors(paths, folders, cache_dir))
    counts = np.bincount(labels, minlength=len(classes))
    if (counts == 0).any():
        folder = os.path.join(split_dir, classes[int(np.argmin(counts))])
        raise DataError(f"class folder {folder} has no readable image left after skipping bad files: add images or remove the folder")
    return paths, labels


def folder_classes(split_dir: str, layout: str) -> list[str]:
    require_dir(split_dir, "image folder", layout)
    classes = [n for n in _list_dir(split_dir) if os.path.isdir(os.path.join(split_dir, n))]
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected the layout {layout}")
    return classes


def eval_split_dir(root: str) -> str:
    """root/val, else root/test: the split that becomes the test set."""
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(f"{root} has neither val/ nor test/: expected the layout {FOLDER_LAYOUT}")


def imagenet100_classes(available: Sequence[str], choice: str) -> list[str]:
    """The 100 wnids of ImageNet-100, sorted: the first 100 (the original's choice, the default) or the CMC
    paper's list (what most published ImageNet-100 numbers use)."""
    if choice == "cmc":
        missing = sorted(set(IMAGENET100_CMC) - set(available))
        if missing:
            raise DataError(
                f"{len(missing)} of the 100 CMC ImageNet-100 classes are missing (e.g. {missing[0]}): "
                f"point --config.dataset_path at a full ImageNet train/val folder, or pass --config.imagenet100_classes=first100"
            )
        return sorted(IMAGENET100_CMC)
    if choice == "first100":
        if len(available) < 100:
            raise DataError(f"imagenet100_classes=first100 needs at least 100 classes, found {len(available)}: point --config.dataset_path at ImageNet")
        return sorted(available)[:100]
    raise DataError(f"imagenet100_classes={choice!r} is not one of {IMAGENET100_CHOICES}: pass --config.imagenet100_classes=first100")


def folder_dataset(root: str, *, skip_bad: bool, select: Callable[[list[str]], list[str]] | None = None,
                   cache_dir: str = "") -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray], list[str]]:
    """((train_paths, train_labels), (test_paths, test_labels), classes) of an image-folder tree.

    `select(available_classes) -> classes` narrows the classes (ImageNet-100); labels follow `classes`.
    """
    require_dir(root, "dataset_path", FOLDER_LAYOUT)
    train_dir = os.path.join(root, "train")
    classes = folder_classes(train_dir, FOLDER_LAYOUT)
    if select is not None:
        classes = select(classes)
    test_dir = eval_split_dir(root)
    extra = sorted(set(folder_classes(test_dir, FOLDER_LAYOUT)) - set(classes))
    if extra and select is None:
        raise DataError(f"class folder {os.path.join(test_dir, extra[0])} has no counterpart in {train_dir}: add it to train/ or remove it")
    train = scan_classes(train_dir, classes, skip_bad=skip_bad, layout=FOLDER_LAYOUT, cache_dir=cache_dir)
    test = scan_classes(test_dir, classes, skip_bad=skip_bad, layout=FOLDER_LAYOUT, cache_dir=cache_dir)
    return train, test, classes


def is_unlabeled(root: str) -> bool:
    """root/train holds image files and no class folder: unlabeled images, for pretraining only."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        return False
    names = _list_dir(train_dir)
    return bool(names) and not any(os.path.isdir(os.path.join(train_dir, n)) for n in names)


def unlabeled_dataset(root: str, *, skip_bad: bool, cache_dir: str = ""
                      ) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray], list[str]]:
    """((train paths, UNLABELED labels), (no test images), no classes) of the images directly in root/train.

    val/ and test/ are not read: linear and kNN evaluation train their classifiers on labelled train images,
    which this folder has none of.
    """
    train_dir = os.path.join(root, "train")
    paths = [os.path.join(train_dir, name) for name in _list_dir(train_dir)]
    paths, labels = check_images(paths, [UNLABELED] * len(paths), skip_bad=skip_bad, hint=f"layout {UNLABELED_LAYOUT}",
                                 errors=cached_header_errors(paths, {train_dir: len(paths)}, cache_dir))
    if not paths:
        raise DataError(f"{train_dir} has no readable image left after skipping bad files: add images")
    return (paths, labels), ([], np.zeros(0, np.int64)), []


def tinyimagenet_dataset(root: str, *, skip_bad: bool, cache_dir: str = ""
                         ) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray], list[str]]:
    """Tiny ImageNet (200 classes, 64x64): train from train/<wnid>/images, test = the labelled val split."""
    require_dir(root, "dataset_path", TINY_LAYOUT)
    train_dir = os.path.join(root, "train")
    classes = folder_classes(train_dir, TINY_LAYOUT)
    train = scan_classes(train_dir, classes, skip_bad=skip_bad, layout=TINY_LAYOUT, subdir="images",
                         cache_dir=cache_dir)
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise DataError(f"{annotations} is missing: expected the layout {TINY_LAYOUT}")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    with open(annotations) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1].strip() not in index:
                raise DataError(f"{annotations} line {line_no} does not name a file and a train/ class: restore the file from the tiny-imagenet-200 zip")
            paths.append(os.path.join(root, "val", "images", fields[0].strip()))
            labels.append(index[fields[1].strip()])
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path} is listed in {annotations} but missing: restore val/images from the tiny-imagenet-200 zip")
    test = check_images(paths, labels, skip_bad=skip_bad, hint=f"layout {TINY_LAYOUT}")
    return train, test, classes
