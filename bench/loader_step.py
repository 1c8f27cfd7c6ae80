"""The prepared-records loader feeding the real trainer: images/s consumed and data/wait_fraction, end to end.

    python -m bench.loader_step --preset gpu    # ResNet-50 at 224, bfloat16 (configs/imagenet.py), 256 pairs/step
    python -m bench.loader_step --preset cpu    # a smoke run: ResNet-50 at 1/16 width, 72 px

Writes ImageNet-layout JPEGs (500x375 and 375x500 windows of scikit-learn's bundled photos, as
bench/input_pipeline.py), prepares them as records (`python -m spcl_jax.data.prepare imagenet --out`),
then runs `launch.py --config configs/imagenet.py` on the records for one epoch of `--steps` steps without
evaluation, its images decoded by `--workers` processes, and reads its metrics.jsonl: images/s consumed by
the steps (two views per image) and the share of step time spent waiting for data, per logged interval
(the first, which holds the compilation, left out; median and range), and the epoch's clustering time
(feature pass included).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench import common
from bench.input_pipeline import write_jpegs
from spcl_jax import runtime
from spcl_jax.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    "gpu": dict(images=6144, batch=256, steps=20, overrides=[]),
    "cpu": dict(images=96, batch=16, steps=4, overrides=[
        "--config.image_size=72", "--config.width_multiplier=0.0625", "--config.num_prototypes=4",
        "--config.pca_dim=4"]),
}
COLUMNS = [("preset", "preset", "{}"), ("batch", "pairs/step", "{}"), ("workers", "workers", "{}"),
           ("images_per_s", "images/s consumed", "{}"), ("wait", "data/wait_fraction", "{}"),
           ("cluster_s", "clustering s (feature pass incl.)", "{:.1f}")]
CLASSES = 4


def imagenet_folder(root, count):
    """root/{train,val}/<wnid>/*.JPEG: `count` training images over CLASSES classes, 2 per class in val."""
    for split, n in (("train", count), ("val", 2 * CLASSES)):
        folder = os.path.join(root, split, "all")
        os.makedirs(folder)
        paths = write_jpegs(folder, n, seed=len(split))
        for i, path in enumerate(paths):
            wnid = f"n{i % CLASSES:08d}"
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            os.rename(path, os.path.join(root, split, wnid, os.path.basename(path)))
        os.rmdir(folder)


def summary(values):
    return f"{common.spread(values, 1.0, '{:.3g}')}, n={len(values)}"


def run(preset, workers, folder):
    setting = PRESETS[preset]
    imagenet_folder(os.path.join(folder, "src"), setting["images"])
    records = os.path.join(folder, "records")
    subprocess.run([sys.executable, "-m", "spcl_jax.data.prepare", "imagenet", "--dataset_path",
                    os.path.join(folder, "src"), "--out", records], check=True, cwd=os.path.dirname(HERE),
                   stdout=subprocess.DEVNULL)
    workdir = os.path.join(folder, "run")
    command = [sys.executable, os.path.join(os.path.dirname(HERE), "launch.py"), "--config", "configs/imagenet.py",
               f"--workdir={workdir}", f"--config.dataset_path={records}", f"--config.n_classes={CLASSES}",
               f"--config.pre_classes={CLASSES}", "--config.val_sample=1", f"--config.batch_size={setting['batch']}",
               "--config.n_epochs=1", "--config.warmup_epochs=1", f"--config.max_steps_per_epoch={setting['steps']}",
               "--config.evaluate_after_pretrain=False", "--config.log_every_steps=2",
               f"--config.num_workers={workers}", *setting["overrides"]]
    done = subprocess.run(command, cwd=os.path.dirname(HERE), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"launch.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records_seen = read_metrics(workdir)
    train = [r for r in records_seen if "train/loss" in r][1:]
    clustering = [r["kmeans/seconds"] for r in records_seen if "kmeans/seconds" in r]
    return dict(preset=preset, batch=setting["batch"], workers=workers,
                images_per_s=summary([r["train/images_per_sec"] / 2 for r in train]),
                wait=summary([r["data/wait_fraction"] for r in train]), cluster_s=clustering[0],
                images_per_s_median=statistics.median(r["train/images_per_sec"] / 2 for r in train),
                wait_median=statistics.median(r["data/wait_fraction"] for r in train))


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--workers", type=int, default=-1, help="worker processes (-1: usable cores - 1)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object of the numbers")
    args = parser.parse_args(argv)
    print(common.machine_note("child"), flush=True)  # "child": launch.py's process needs the accelerator
    setting = PRESETS[args.preset]
    overrides = " ".join(setting["overrides"]) or "no overrides"
    print(f"configs/imagenet.py (ResNet-50, bfloat16, pca_dim 256, K = 512) with {overrides}; {setting['images']:,} "
          f"images, {setting['steps']} steps of {setting['batch']} pairs; median (min–max) of the logged intervals "
          "after the first", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        row = run(args.preset, args.workers, folder)
    print(common.markdown([row], COLUMNS))
    print(common.load_after())
    if args.json:
        print(json.dumps({k: row[k] for k in ("images_per_s_median", "wait_median", "cluster_s")}))


if __name__ == "__main__":
    main()
