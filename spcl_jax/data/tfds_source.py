"""tensorflow-datasets splits read with `tfds.data_source` (array_record; no TensorFlow at training time).

Small datasets (CIFAR, STL-10) are read once into memory; ImageNet stays on disk and is decoded
batch by batch. A dataset that is not prepared, or prepared as tfrecord (what `tfds build` writes by
default), raises DataError saying how to prepare it.
"""
import concurrent.futures
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spcl_jax.data.sources import UNLABELED
from spcl_jax.errors import DataError

TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10", "imagenet": "imagenet2012", "imagenet100": "imagenet2012"}
READ_THREADS = 16  # record reads are I/O bound
LABEL_CACHE = "spcl_jax_labels_{split}.npy"


def tfds_data_dir(data_dir: str) -> str:
    """The directory tfds reads: config.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    import tensorflow_datasets as tfds

    return data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR


def prepare_hint(dataset: str, data_dir: str) -> str:
    """The whole way to prepare `dataset`, in one go (preparing needs TensorFlow once; training never does)."""
    import importlib.util

    command = f"`python -m spcl_jax.data.prepare {dataset} --data_dir {tfds_data_dir(data_dir)}`"
    if importlib.util.find_spec("tensorflow") is None:
        command = f"`pip install tensorflow-cpu` (preparing needs it once, training never) then {command}"
    return f"run {command}, or pass --config.data_dir=DIR where it is prepared"


def open_split(dataset: str, split: str, data_dir: str, *, encoded_images: bool = False) -> Any:
    """`tfds.data_source` of one split (images as encoded bytes with `encoded_images`), or DataError with
    the way to prepare it."""
    import tensorflow_datasets as tfds

    decoders = {"image": tfds.decode.SkipDecoding()} if encoded_images else None
    name = TFDS_NAMES[dataset]
    root = tfds_data_dir(data_dir)
    try:
        return tfds.data_source(name, split=split, data_dir=root, download=False, decoders=decoders)
    except Exception as e:  # tfds raises assorted types for missing or tfrecord-only data
        if tfds.builder(name, data_dir=root).is_prepared():
            raise DataError(
                f"dataset {name} in {root} cannot be read with tfds.data_source (prepared as tfrecord?): "
                f"re-prepare it as array_record: {prepare_hint(dataset, data_dir)}"
            ) from e
        raise DataError(f"dataset {name} (split {split}) is not prepared in {root}: {prepare_hint(dataset, data_dir)}") from e


def for_each_record(source: Sequence[Any], fn: Callable[[int, Any], object]) -> None:
    """fn(i, source[i]) for every record, READ_THREADS at a time (array_record reads and PIL release the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(lambda i: fn(i, source[i]), range(len(source))))


def read_arrays(source: Sequence[Any], labeled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 (n, H, W, 3)) and labels of a small split; UNLABELED where `labeled` is False."""
    images = np.empty((len(source), *source[0]["image"].shape), np.uint8)
    labels = np.full(len(source), UNLABELED, np.int64)

    def store(i: int, example: dict[str, Any]) -> None:
        images[i] = example["image"]
        if labeled:
            labels[i] = example["label"]

    for_each_record(source, store)
    return images, labels


def record_labels(dataset: str, split: str, data_dir: str) -> np.ndarray:
    """Labels of every record of a large split, cached next to the data after the first scan.

    The scan reads each record once with image decoding skipped (I/O bound, threaded).
    """

    source = open_split(dataset, split, data_dir, encoded_images=True)
    cache = os.path.join(str(source.dataset_info.data_dir), LABEL_CACHE.format(split=split))
    if os.path.isfile(cache):
        labels = np.load(cache)
        if len(labels) == len(source):
            return labels
    logging.info("reading the labels of %d records of %s/%s once (cached in %s)", len(source), TFDS_NAMES[dataset], split, cache)
    labels = np.empty(len(source), np.int64)

    def store(i: int, example: dict[str, Any]) -> None:
        labels[i] = example["label"]

    for_each_record(source, store)
    try:
        np.save(cache, labels)
    except OSError as e:
        logging.warning("could not cache the labels in %s (%s); they will be read again next time", cache, e)
    return labels


def label_names(dataset: str, data_dir: str, split: str = "train") -> list[str]:
    return list(open_split(dataset, split, data_dir).dataset_info.features["label"].names)
