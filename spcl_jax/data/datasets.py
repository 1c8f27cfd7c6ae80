"""`load_splits(config)`: the pretrain/train/valid/test sources of a dataset (DIFFERENCES.md, datasets and splits).

Each dataset first yields a pool: its whole training set (plus unlabeled images, label -1) and its
test set. `split_indices` then carves pretrain/train/valid out of the pool with `config.seed`, and the
test set keeps the classes < n_classes; sources subset images and labels together (B-18).
"""
import dataclasses
import os

import numpy as np

from spcl_jax import storage
from spcl_jax.data import digits, imagefolder, records, staging, tfds_source
from spcl_jax.data.crops import EVAL_CROP_FRACTION
from spcl_jax.data.decode import canvas_shape
from spcl_jax.data.sources import ArraySource, FileSource, ShapeSource, TfdsSource
from spcl_jax.data.splits import pretrain_summary, split_indices, test_indices
from spcl_jax.errors import DataError

CIFAR_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR_STD = (0.24703223, 0.24348513, 0.26158784)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "tinyimagenet", "imagefolder")


@dataclasses.dataclass(frozen=True)
class Splits:
    """The four sources of a run and the dataset's constants.

    pretrain: images for self-supervised training (classes < pre_classes, plus STL-10 'unlabelled'
      with label -1); train/valid: linear-evaluation train and held-out images (classes < n_classes,
      `val_sample` per class in valid, which is empty when val_sample=0); test: the official test
      split restricted to classes < n_classes. Sources are described in `spcl_jax.data.sources`.
    num_classes: n_classes (the linear classifier's width; 0 for an unlabeled image folder). mean/std:
      per-channel normalisation in [0, 1] units for `AugmentParams.from_config`. name: config.dataset.
    pre_classes: config.pre_classes (n_classes and pre_classes 0 stand for every class of the data).
    pretrain_summary: one line saying how many images pretraining uses and why (the start-up log).
    """

    pretrain: object
    train: object
    valid: object
    test: object
    num_classes: int
    mean: tuple
    std: tuple
    name: str
    pre_classes: int
    pretrain_summary: str


@dataclasses.dataclass(frozen=True)
class Pool:
    """A dataset before splitting: `train` holds every training image (unlabeled ones with label -1)."""

    train: object
    test: object
    classes: int


def load_size(config):
    """Shorter side that decoded images are capped at: crop size / 0.875 (256 for 224)."""
    return int(round(config.image_size / EVAL_CROP_FRACTION))


def normalisation(config):
    """(mean, std) per channel in [0, 1] units that `config.dataset`'s images are normalised with, known
    without loading the dataset (so a saved encoder can be used where its data is not): constants, or for
    digits the statistics of its bundled training images at `config.image_size`."""
    if config.dataset == "digits":
        return digits.channel_stats(digits.digits_arrays(int(config.image_size))[0])
    if config.dataset in ("cifar10", "cifar100"):
        return CIFAR_MEAN, CIFAR_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _digits(config):
    train_x, train_y, test_x, test_y = digits.digits_arrays(int(config.image_size))
    return Pool(ArraySource(train_x, train_y), ArraySource(test_x, test_y), digits.NUM_CLASSES)


def _cifar(config):
    train = tfds_source.read_arrays(tfds_source.open_split(config.dataset, "train", config.data_dir))
    test = tfds_source.read_arrays(tfds_source.open_split(config.dataset, "test", config.data_dir))
    classes = 100 if config.dataset == "cifar100" else 10
    return Pool(ArraySource(*train), ArraySource(*test), classes)


def _stl10(config):
    labeled_x, labeled_y = tfds_source.read_arrays(tfds_source.open_split("stl10", "train", config.data_dir))
    unlabeled_x, unlabeled_y = tfds_source.read_arrays(tfds_source.open_split("stl10", "unlabelled", config.data_dir), labeled=False)
    test = tfds_source.read_arrays(tfds_source.open_split("stl10", "test", config.data_dir))
    train = ArraySource(np.concatenate([labeled_x, unlabeled_x]), np.concatenate([labeled_y, unlabeled_y]))
    return Pool(train, ArraySource(*test), 10)


def folder_listing(config):
    """((train paths, labels), (test paths, labels), classes) of the image folder of a folder dataset."""
    if not config.dataset_path:
        raise DataError(f"dataset {config.dataset} reads an image folder: pass --config.dataset_path=DIR")
    skip_bad, cache_dir = bool(config.skip_bad_images), config.listing_cache_dir
    if config.dataset == "tinyimagenet":
        return imagefolder.tinyimagenet_dataset(config.dataset_path, skip_bad=skip_bad, cache_dir=cache_dir)
    return imagefolder.folder_dataset(config.dataset_path, skip_bad=skip_bad, select=_class_selection(config),
                                      cache_dir=cache_dir)


def _class_selection(config):
    """ImageNet-100's class list as a function of the available classes; None for every other dataset."""
    if config.dataset != "imagenet100":
        return None
    return lambda available: imagefolder.imagenet100_classes(available, config.imagenet100_classes)


def _files(config):
    """An image folder, or the records `python -m spcl_jax.data.prepare` wrote from one (detected)."""
    size = int(config.image_size) if config.dataset == "tinyimagenet" else load_size(config)
    root = config.dataset_path
    if storage.is_url(root):  # prepared records on gs://: read from this host's copy
        root = staging.local_copy(root, config.records_cache_dir)
    if records.is_prepared(root) or records.was_interrupted(root):
        train, classes = records.open_split(root, "train", size, _class_selection(config))
        test, _ = records.open_split(root, "test", size, _class_selection(config))
        return Pool(train, test, len(classes))
    if config.dataset == "imagefolder" and config.dataset_path and imagefolder.is_unlabeled(config.dataset_path):
        train, test, classes = imagefolder.unlabeled_dataset(config.dataset_path, skip_bad=bool(config.skip_bad_images),
                                                             cache_dir=config.listing_cache_dir)
    else:  # `prepare` writes records of these listings only: its records need labels
        train, test, classes = folder_listing(config)
    make = lambda paths, labels: FileSource(paths, labels, size, skip_bad=bool(config.skip_bad_images))
    return Pool(make(*train), make(*test), len(classes))


def _imagenet_tfds(config):
    root = tfds_source.tfds_data_dir(config.data_dir)
    if not os.path.isdir(os.path.join(root, tfds_source.TFDS_NAMES[config.dataset])):  # before tfds' own warnings
        raise DataError(
            f"dataset {config.dataset} has no images: pass --config.dataset_path=DIR, an ImageNet folder "
            "(DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG) or the records `python -m spcl_jax.data.prepare "
            f"imagenet --dataset_path DIR --out RECORDS` writes from one (a local path or gs://); or, without "
            f"dataset_path, tfds imagenet2012 in {root}: {tfds_source.prepare_hint(config.dataset, config.data_dir)}")
    select = _class_selection(config)
    names = tfds_source.label_names(config.dataset, config.data_dir)
    classes = names if select is None else select(names)
    remap = np.full(len(names), -1, np.int64)  # tfds label -> our label; -1: class not selected
    remap[[names.index(c) for c in classes]] = np.arange(len(classes))
    size = load_size(config)

    def source(split):
        labels = remap[tfds_source.record_labels(config.dataset, split, config.data_dir)]
        keep = np.flatnonzero(labels >= 0)
        data = tfds_source.open_split(config.dataset, split, config.data_dir, encoded_images=True)
        return TfdsSource(data, keep, labels[keep], size, name=f"imagenet2012/{split}")

    return Pool(source("train"), source("validation"), len(classes))


_POOLS = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "stl10": _stl10,
    "imagenet": lambda config: _files(config) if config.dataset_path else _imagenet_tfds(config),
    "imagenet100": lambda config: _files(config) if config.dataset_path else _imagenet_tfds(config),
    "tinyimagenet": _files,
    "imagefolder": _files,
}


# (training images, test images, classes) of the datasets a run can be planned for without their data. STL-10's
# training images are its 5,000 labelled and 100,000 unlabelled ones; ImageNet-100 is the CMC list's.
NOMINAL_SIZES = {"cifar10": (50_000, 10_000, 10), "cifar100": (50_000, 10_000, 100), "stl10": (105_000, 8_000, 10),
                 "imagenet": (1_281_167, 50_000, 1000), "imagenet100": (126_689, 5_000, 100),
                 "tinyimagenet": (100_000, 10_000, 200)}


IN_MEMORY = ("digits", "cifar10", "cifar100", "stl10")


def nominal_canvas(config):
    """(height, width) of the canvas `config.dataset`'s images arrive in, known without the data: in-memory datasets
    at their own size, decoded ones in the canvas of their load size (`decode.canvas_shape`)."""
    own = {"digits": (int(config.image_size),) * 2, "cifar10": (32, 32), "cifar100": (32, 32), "stl10": (96, 96)}
    if config.dataset in own:
        return own[config.dataset]
    return canvas_shape(int(config.image_size) if config.dataset == "tinyimagenet" else load_size(config))


def nominal_pool(config, num_examples=None):
    """A Pool of `ShapeSource`s: the dataset's sizes (NOMINAL_SIZES; `num_examples` training images instead when
    given, needed for an image folder) with the classes dealt evenly, in the canvas its images arrive in.
    What `spcl_jax.plan` plans with when the data is elsewhere; the real class sizes may differ a little."""
    train, test, classes = NOMINAL_SIZES.get(config.dataset, (None, None, int(config.n_classes) or 1))
    if num_examples is None and train is None:
        raise DataError(f"the size of dataset {config.dataset!r} is not known without its data: pass --num_examples")
    if num_examples is not None:
        train, test = num_examples, test or max(num_examples // 10, 1)
    in_memory, canvas = config.dataset in IN_MEMORY, nominal_canvas(config)
    labels = lambda count: np.arange(count) % classes  # noqa: E731
    if config.dataset == "stl10" and num_examples is None:
        train_labels = np.concatenate([labels(5_000), np.full(100_000, -1)])
    else:
        train_labels = labels(train)
    return Pool(ShapeSource(train_labels, canvas, in_memory), ShapeSource(labels(test), canvas, in_memory), classes)


def load_pool(config):
    if config.dataset not in _POOLS:
        raise DataError(f"dataset={config.dataset!r} is not one of {DATASETS}: pass e.g. --config.dataset=digits")
    return _POOLS[config.dataset](config)


def load_splits(config, pool=None):
    """Splits of `config.dataset` (of `pool` when given) honouring n_classes, pre_classes, train_sample, val_sample
    and seed.

    Raises DataError (one line: the bad path or value and the fix) for data that is missing, not
    prepared or malformed.
    """
    pool = load_pool(config) if pool is None else pool
    n_classes, pre_classes = (class_count(config, option, pool.classes) for option in ("n_classes", "pre_classes"))
    idx = split_indices(
        pool.train.labels,
        n_classes=n_classes,
        pre_classes=pre_classes,
        train_sample=int(config.train_sample),
        val_sample=int(config.val_sample),
        seed=int(config.seed),
        dataset=config.dataset,
    )
    mean, std = normalisation(config)
    return Splits(
        pretrain=pool.train.subset(idx.pretrain),
        train=pool.train.subset(idx.train),
        valid=pool.train.subset(idx.valid),
        test=pool.test.subset(test_indices(pool.test.labels, n_classes)),
        num_classes=n_classes,
        mean=tuple(mean),
        std=tuple(std),
        name=config.dataset,
        pre_classes=pre_classes,
        pretrain_summary=pretrain_summary(pool.train.labels, len(idx.pretrain), pre_classes=pre_classes,
                                          train_sample=int(config.train_sample), val_sample=int(config.val_sample)),
    )


def class_count(config, option, available):
    """`config.<option>` (n_classes or pre_classes) checked against the `available` classes; with infer_from_data,
    0 stands for all of them (none for an unlabeled image folder)."""
    value = int(config[option])
    if config.infer_from_data and value == 0:
        return available
    if not available:
        raise DataError(f"{option}={value} but {config.dataset_path}/train holds images without class folders "
                        "(unlabeled): pretrain on them with --config configs/imagefolder.py (n_classes=0, "
                        "pre_classes=0, infer_from_data=True)")
    if not 1 <= value <= available:
        raise DataError(f"{option}={value} but {config.dataset} has {available} classes: pass --config.{option}=1..{available}")
    return value
