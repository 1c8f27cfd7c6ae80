"""Make a dataset ready for training: `python -m spcl_jax.data.prepare <dataset> [options]`.

* digits: bundled with scikit-learn, nothing to do.
* image folders (imagefolder, tinyimagenet, imagenet/imagenet100 with --dataset_path): with
  `--out DST`, writes the prepared record format (`spcl_jax.data.records`: images re-encoded with the
  shorter side capped at --max_side, in array_record shards; about 5x less host CPU per image than the
  raw files, BENCHMARKS.md); training then reads `--config.dataset_path=DST`. An interrupted prepare
  resumes with the same command. Without --out it checks the layout and every file header and reports
  the counts.
* tfds datasets (cifar10, cifar100, stl10, imagenet/imagenet100 without --dataset_path): builds them
  as array_record, which training reads without TensorFlow. The stock tfds builders need TensorFlow to
  *write* the data (and ImageNet needs its tar files, downloaded by hand); when something is missing
  this prints what and how in one message and exits 1. For ImageNet it also caches the label array.

Exit status: 0 ready, 1 a prerequisite is missing, 2 the data is malformed (DataError).
"""
import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from spcl_jax.data import datasets, records, tfds_source
from spcl_jax.data.pipeline import default_workers
from spcl_jax.errors import DataError

TFDS_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "stl10": ("train", "unlabelled", "test"), "imagenet2012": ("train", "validation")}
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def _readable(dataset, data_dir):
    try:
        for split in TFDS_SPLITS[tfds_source.TFDS_NAMES[dataset]]:
            tfds_source.open_split(dataset, split, data_dir)
        return True
    except DataError:
        return False


def _build_with_tensorflow(name, root, manual_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=root, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def prepare_tfds(dataset: str, data_dir: str, manual_dir: str) -> int:
    name = tfds_source.TFDS_NAMES[dataset]
    root = tfds_source.tfds_data_dir(data_dir)
    manual_dir = manual_dir or os.path.join(root, "downloads", "manual")
    if not _readable(dataset, data_dir):
        tars = f" with {' and '.join(IMAGENET_TARS)} (from image-net.org) in {manual_dir}" if name == "imagenet2012" else ""
        if importlib.util.find_spec("tensorflow") is None:
            print(
                f"preparing {name} needs TensorFlow to write the data, and it is not installed: run `pip install tensorflow-cpu` once, "
                f"then `python -m spcl_jax.data.prepare {dataset} --data_dir {root}`{tars}; or build it elsewhere with "
                f"`tfds build {name} --file_format=array_record --data_dir DIR` and pass --config.data_dir=DIR (training never needs TensorFlow)"
            )
            return 1
        if name == "imagenet2012" and not all(os.path.isfile(os.path.join(manual_dir, t)) for t in IMAGENET_TARS):
            print(f"imagenet2012 must be downloaded by hand: put {' and '.join(IMAGENET_TARS)} (from image-net.org) in {manual_dir} and run this again")
            return 1
        _build_with_tensorflow(name, root, manual_dir)
        if not _readable(dataset, data_dir):
            print(f"{name} in {root} is prepared but not as array_record (an older tfrecord build?): delete {os.path.join(root, name)} or pick another --data_dir, and run this again")
            return 1
    if name == "imagenet2012":
        for split in TFDS_SPLITS[name]:
            tfds_source.record_labels(dataset, split, data_dir)
    print(f"{name} is ready in {root}")
    return 0


def prepare_folder(args: argparse.Namespace) -> int:
    """Checks an image folder and, with --out, writes its records."""
    train, test, classes = datasets.folder_listing(args.dataset, args.dataset_path, skip_bad=args.skip_bad_images,
                                                   imagenet100_classes=args.imagenet100_classes, cache_dir="")
    if not args.out:
        print(f"{args.dataset} in {args.dataset_path} is ready: {len(classes)} classes, {len(train[0])} training and "
              f"{len(test[0])} test images; `--out DST` writes them as records, which load about 5x cheaper")
        return 0
    meta = records.prepare(args.dataset, args.dataset_path, {"train": train, "test": test}, classes, args.out,
                           max_side=args.max_side, quality=args.quality, workers=args.workers,
                           skip_bad=args.skip_bad_images)
    counts = {split: meta["splits"][split]["count"] for split in records.SPLITS}
    print(f"{args.dataset} records are ready in {args.out}: {len(classes)} classes, {counts['train']} training and "
          f"{counts['test']} test images; train with --config.dataset_path={args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=datasets.DATASETS)
    parser.add_argument("--data_dir", default="", help="tensorflow-datasets directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--dataset_path", default="", help="root of an image folder (imagefolder, tinyimagenet, imagenet, imagenet100)")
    parser.add_argument("--manual_dir", default="", help="where the ImageNet tar files are (default DATA_DIR/downloads/manual)")
    parser.add_argument("--out", default="", help="image folders: write the prepared records here")
    parser.add_argument("--max_side", type=int, default=256,
                        help="records: cap of the shorter side (the longer one at 1.5x); 256 suits crops up to 224")
    parser.add_argument("--quality", type=int, default=90, help="records: JPEG quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=max(default_workers(), 1), help="records: writing processes")
    parser.add_argument("--skip_bad_images", action="store_true", help="leave out unreadable files with a warning")
    parser.add_argument("--imagenet100_classes", default="first100", choices=("first100", "cmc"),
                        help="imagenet100: which 100 classes")
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        print("digits ships with scikit-learn: nothing to prepare")
        return 0
    if args.max_side < 8 or not 1 <= args.quality <= 100 or args.workers < 1:
        parser.error(f"--max_side {args.max_side} --quality {args.quality} --workers {args.workers}; valid: "
                     "max_side >= 8, 1 <= quality <= 100, workers >= 1")
    try:
        if args.dataset_path or args.dataset in ("imagefolder", "tinyimagenet"):
            return prepare_folder(args)
        if args.out:
            parser.error(f"--out needs --dataset_path: {args.dataset} without it is prepared with tensorflow-datasets")
        return prepare_tfds(args.dataset, args.data_dir, args.manual_dir)
    except DataError as e:
        print(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
