"""Make a dataset ready for training: `python -m spcl_jax.data.prepare <dataset> [--data_dir DIR]`.

* digits: bundled with scikit-learn, nothing to do.
* image folders (imagefolder, tinyimagenet, and imagenet/imagenet100 with --dataset_path): checks the
  layout and every file header, and reports the counts.
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

from configs.default import get_config
from spcl_jax.data import datasets, tfds_source
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


def prepare_tfds(dataset, data_dir, manual_dir):
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=datasets.DATASETS)
    parser.add_argument("--data_dir", default="", help="tensorflow-datasets directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--dataset_path", default="", help="root of an image folder (imagefolder, tinyimagenet, imagenet, imagenet100)")
    parser.add_argument("--manual_dir", default="", help="where the ImageNet tar files are (default DATA_DIR/downloads/manual)")
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        print("digits ships with scikit-learn: nothing to prepare")
        return 0
    try:
        if args.dataset_path or args.dataset in ("imagefolder", "tinyimagenet"):
            config = get_config()
            config.update(dataset=args.dataset, dataset_path=args.dataset_path, data_dir=args.data_dir, image_size=64)
            pool = datasets.load_pool(config)
            print(f"{args.dataset} in {args.dataset_path} is ready: {pool.classes} classes, {len(pool.train)} training and {len(pool.test)} test images")
            return 0
        return prepare_tfds(args.dataset, args.data_dir, args.manual_dir)
    except DataError as e:
        print(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
