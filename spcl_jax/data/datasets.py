"""`load_splits(spec)`: the pretrain/train/valid/test sources of the dataset a `DataSpec` names (DIFFERENCES.md,
datasets and splits).

Each dataset first yields a pool: its whole training set (plus unlabeled images, label -1) and its
test set. `split_indices` then carves pretrain/train/valid out of the pool with `spec.seed`, and the
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
      per-channel normalisation in [0, 1] units for `startup.augment_params`. name: spec.dataset.
    pre_classes: spec.pre_classes (n_classes and pre_classes 0 stand for every class of the data).
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
class DataSpec:
    """Which images a run reads and how it splits them: config keys of the same names (`startup.data_spec`)."""

    dataset: str
    dataset_path: str
    data_dir: str
    image_size: int
    n_classes: int
    pre_classes: int
    infer_from_data: bool
    train_sample: int
    val_sample: int
    imagenet100_classes: str
    skip_bad_images: bool
    listing_cache_dir: str
    records_cache_dir: str
    seed: int


@dataclasses.dataclass(frozen=True)
class Pool:
    """A dataset before splitting: `train` holds every training image (unlabeled ones with label -1)."""

    train: object
    test: object
    classes: int


def load_size(image_size: int) -> int:
    """Shorter side that decoded images are capped at: crop size / 0.875 (256 for 224)."""
    return int(round(image_size / EVAL_CROP_FRACTION))


def normalisation(dataset: str, image_size: int) -> tuple[tuple, tuple]:
    """(mean, std) per channel in [0, 1] units that `dataset`'s images are normalised with, known
    without loading the dataset (so a saved encoder can be used where its data is not): constants, or for
    digits the statistics of its bundled training images at `image_size`."""
    if dataset == "digits":
        return digits.channel_stats(digits.digits_arrays(int(image_size))[0])
    if dataset in ("cifar10", "cifar100"):
        return CIFAR_MEAN, CIFAR_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _digits(spec):
    train_x, train_y, test_x, test_y = digits.digits_arrays(int(spec.image_size))
    return Pool(ArraySource(train_x, train_y), ArraySource(test_x, test_y), digits.NUM_CLASSES)


def _cifar(spec):
    train = tfds_source.read_arrays(tfds_source.open_split(spec.dataset, "train", spec.data_dir))
    test = tfds_source.read_arrays(tfds_source.open_split(spec.dataset, "test", spec.data_dir))
    classes = 100 if spec.dataset == "cifar100" else 10
    return Pool(ArraySource(*train), ArraySource(*test), classes)


def _stl10(spec):
    labeled_x, labeled_y = tfds_source.read_arrays(tfds_source.open_split("stl10", "train", spec.data_dir))
    unlabeled_x, unlabeled_y = tfds_source.read_arrays(tfds_source.open_split("stl10", "unlabelled", spec.data_dir), labeled=False)
    test = tfds_source.read_arrays(tfds_source.open_split("stl10", "test", spec.data_dir))
    train = ArraySource(np.concatenate([labeled_x, unlabeled_x]), np.concatenate([labeled_y, unlabeled_y]))
    return Pool(train, ArraySource(*test), 10)


def folder_listing(dataset: str, dataset_path: str, *, skip_bad: bool, imagenet100_classes: str,
                   cache_dir: str) -> tuple:
    """((train paths, labels), (test paths, labels), classes) of the image folder of a folder dataset."""
    if not dataset_path:
        raise DataError(f"dataset {dataset} reads an image folder: pass --config.dataset_path=DIR")
    if dataset == "tinyimagenet":
        return imagefolder.tinyimagenet_dataset(dataset_path, skip_bad=skip_bad, cache_dir=cache_dir)
    return imagefolder.folder_dataset(dataset_path, skip_bad=skip_bad,
                                      select=_class_selection(dataset, imagenet100_classes), cache_dir=cache_dir)


def _class_selection(dataset, imagenet100_classes):
    """ImageNet-100's class list as a function of the available classes; None for every other dataset."""
    if dataset != "imagenet100":
        return None
    return lambda available: imagefolder.imagenet100_classes(available, imagenet100_classes)


def _files(spec):
    """An image folder, or the records `python -m spcl_jax.data.prepare` wrote from one (detected)."""
    size = int(spec.image_size) if spec.dataset == "tinyimagenet" else load_size(spec.image_size)
    select = _class_selection(spec.dataset, spec.imagenet100_classes)
    root = spec.dataset_path
    if storage.is_url(root):  # prepared records on gs://: read from this host's copy
        root = staging.local_copy(root, spec.records_cache_dir)
    if records.is_prepared(root) or records.was_interrupted(root):
        train, classes = records.open_split(root, "train", size, select)
        test, _ = records.open_split(root, "test", size, select)
        return Pool(train, test, len(classes))
    if spec.dataset == "imagefolder" and spec.dataset_path and imagefolder.is_unlabeled(spec.dataset_path):
        train, test, classes = imagefolder.unlabeled_dataset(spec.dataset_path, skip_bad=bool(spec.skip_bad_images),
                                                             cache_dir=spec.listing_cache_dir)
    else:  # `prepare` writes records of these listings only: its records need labels
        train, test, classes = folder_listing(spec.dataset, spec.dataset_path, skip_bad=bool(spec.skip_bad_images),
                                              imagenet100_classes=spec.imagenet100_classes,
                                              cache_dir=spec.listing_cache_dir)
    make = lambda paths, labels: FileSource(paths, labels, size, skip_bad=bool(spec.skip_bad_images))
    return Pool(make(*train), make(*test), len(classes))


def _imagenet_tfds(spec):
    root = tfds_source.tfds_data_dir(spec.data_dir)
    if not os.path.isdir(os.path.join(root, tfds_source.TFDS_NAMES[spec.dataset])):  # before tfds' own warnings
        raise DataError(
            f"dataset {spec.dataset} has no images: pass --config.dataset_path=DIR, an ImageNet folder "
            "(DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG) or the records `python -m spcl_jax.data.prepare "
            f"imagenet --dataset_path DIR --out RECORDS` writes from one (a local path or gs://); or, without "
            f"dataset_path, tfds imagenet2012 in {root}: {tfds_source.prepare_hint(spec.dataset, spec.data_dir)}")
    select = _class_selection(spec.dataset, spec.imagenet100_classes)
    names = tfds_source.label_names(spec.dataset, spec.data_dir)
    classes = names if select is None else select(names)
    remap = np.full(len(names), -1, np.int64)  # tfds label -> our label; -1: class not selected
    remap[[names.index(c) for c in classes]] = np.arange(len(classes))
    size = load_size(spec.image_size)

    def source(split: str) -> TfdsSource:
        labels = remap[tfds_source.record_labels(spec.dataset, split, spec.data_dir)]
        keep = np.flatnonzero(labels >= 0)
        data = tfds_source.open_split(spec.dataset, split, spec.data_dir, encoded_images=True)
        return TfdsSource(data, keep, labels[keep], size, name=f"imagenet2012/{split}")

    return Pool(source("train"), source("validation"), len(classes))


_POOLS = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "stl10": _stl10,
    "imagenet": lambda spec: _files(spec) if spec.dataset_path else _imagenet_tfds(spec),
    "imagenet100": lambda spec: _files(spec) if spec.dataset_path else _imagenet_tfds(spec),
    "tinyimagenet": _files,
    "imagefolder": _files,
}


# (training images, test images, classes) of the datasets a run can be planned for without their data. STL-10's
# training images are its 5,000 labelled and 100,000 unlabelled ones; ImageNet-100 is the CMC list's.
NOMINAL_SIZES = {"cifar10": (50_000, 10_000, 10), "cifar100": (50_000, 10_000, 100), "stl10": (105_000, 8_000, 10),
                 "imagenet": (1_281_167, 50_000, 1000), "imagenet100": (126_689, 5_000, 100),
                 "tinyimagenet": (100_000, 10_000, 200)}


IN_MEMORY = ("digits", "cifar10", "cifar100", "stl10")


def nominal_canvas(dataset: str, image_size: int) -> tuple[int, int]:
    """(height, width) of the canvas `dataset`'s images arrive in, known without the data: in-memory datasets
    at their own size, decoded ones in the canvas of their load size (`decode.canvas_shape`)."""
    own = {"digits": (int(image_size),) * 2, "cifar10": (32, 32), "cifar100": (32, 32), "stl10": (96, 96)}
    if dataset in own:
        return own[dataset]
    return canvas_shape(int(image_size) if dataset == "tinyimagenet" else load_size(image_size))


def nominal_pool(spec: DataSpec, num_examples: int | None = None) -> Pool:
    """A Pool of `ShapeSource`s: the dataset's sizes (NOMINAL_SIZES; `num_examples` training images instead when
    given, needed for an image folder) with the classes dealt evenly, in the canvas its images arrive in.
    What `spcl_jax.plan` plans with when the data is elsewhere; the real class sizes may differ a little."""
    train, test, classes = NOMINAL_SIZES.get(spec.dataset, (None, None, int(spec.n_classes) or 1))
    if num_examples is None and train is None:
        raise DataError(f"the size of dataset {spec.dataset!r} is not known without its data: pass --num_examples")
    if num_examples is not None:
        train, test = num_examples, test or max(num_examples // 10, 1)
    in_memory, canvas = spec.dataset in IN_MEMORY, nominal_canvas(spec.dataset, spec.image_size)
    labels = lambda count: np.arange(count) % classes  # noqa: E731
    if spec.dataset == "stl10" and num_examples is None:
        train_labels = np.concatenate([labels(5_000), np.full(100_000, -1)])
    else:
        train_labels = labels(train)
    return Pool(ShapeSource(train_labels, canvas, in_memory), ShapeSource(labels(test), canvas, in_memory), classes)


def load_pool(spec: DataSpec) -> Pool:
    if spec.dataset not in _POOLS:
        raise DataError(f"dataset={spec.dataset!r} is not one of {DATASETS}: pass e.g. --config.dataset=digits")
    return _POOLS[spec.dataset](spec)


def load_splits(spec: DataSpec, pool: Pool | None = None) -> Splits:
    """Splits of `spec.dataset` (of `pool` when given) honouring n_classes, pre_classes, train_sample, val_sample
    and seed.

    Raises DataError (one line: the bad path or value and the fix) for data that is missing, not
    prepared or malformed.
    """
    pool = load_pool(spec) if pool is None else pool
    n_classes, pre_classes = (class_count(spec, option, pool.classes) for option in ("n_classes", "pre_classes"))
    idx = split_indices(
        pool.train.labels,
        n_classes=n_classes,
        pre_classes=pre_classes,
        train_sample=int(spec.train_sample),
        val_sample=int(spec.val_sample),
        seed=int(spec.seed),
        dataset=spec.dataset,
    )
    mean, std = normalisation(spec.dataset, spec.image_size)
    return Splits(
        pretrain=pool.train.subset(idx.pretrain),
        train=pool.train.subset(idx.train),
        valid=pool.train.subset(idx.valid),
        test=pool.test.subset(test_indices(pool.test.labels, n_classes)),
        num_classes=n_classes,
        mean=tuple(mean),
        std=tuple(std),
        name=spec.dataset,
        pre_classes=pre_classes,
        pretrain_summary=pretrain_summary(pool.train.labels, len(idx.pretrain), pre_classes=pre_classes,
                                          train_sample=int(spec.train_sample), val_sample=int(spec.val_sample)),
    )


def class_count(spec: DataSpec, option: str, available: int) -> int:
    """`spec.<option>` (n_classes or pre_classes) checked against the `available` classes; with infer_from_data,
    0 stands for all of them (none for an unlabeled image folder)."""
    value = int(getattr(spec, option))
    if spec.infer_from_data and value == 0:
        return available
    if not available:
        raise DataError(f"{option}={value} but {spec.dataset_path}/train holds images without class folders "
                        "(unlabeled): pretrain on them with --config configs/imagefolder.py (n_classes=0, "
                        "pre_classes=0, infer_from_data=True)")
    if not 1 <= value <= available:
        raise DataError(f"{option}={value} but {spec.dataset} has {available} classes: pass --config.{option}=1..{available}")
    return value
