"""Input-pipeline throughput: host JPEG decoding and on-device augmentation.

    python bench/input_pipeline.py [--images 512] [--batch 64] [--threads 1,2] [--aug_batch 64]

Host: ImageNet-size JPEGs (500x375, smooth content plus noise, quality 90) written to a temp dir get
the header check that opening an image folder does, then are decoded by `FileSource` and fitted to
the 256 load size of a 224 crop, directly and through `HostLoader`.
Device: `pretrain_view` (the ImageNet recipe with blur at 224 from 256, the CIFAR recipe at 32) on
whatever backend JAX picks, timed after compilation; reported per 1,000 images.
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from spcl_jax import augment  # noqa: E402
from spcl_jax.data.datasets import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from spcl_jax.data.imagefolder import SCAN_THREADS, check_images  # noqa: E402
from spcl_jax.data.loader import HostLoader  # noqa: E402
from spcl_jax.data.sources import FileSource  # noqa: E402

COLUMNS = [("stage", "stage", "{}"), ("rate", "throughput", "{:,.1f}"), ("unit", "unit", "{}"), ("note", "note", "{}")]


def write_jpegs(folder, count, size=(500, 375)):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    noise = rng.normal(0, 12, (size[1], size[0], 3)).astype(np.float32)
    paths = []
    for i in range(count):
        phase = rng.random(3) * 6.28
        base = 127 + 100 * np.sin(xx[..., None] / (20 + i % 30) + yy[..., None] / 35 + phase)
        image = np.clip(base + np.roll(noise, 7 * i, axis=1), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def host_rows(paths, batch, threads):
    start = time.perf_counter()
    check_images(paths, np.zeros(len(paths)), skip_bad=False, hint="")
    rate = len(paths) / (time.perf_counter() - start)
    rows = [dict(stage=f"header check at open ({SCAN_THREADS} threads)", rate=rate, unit="files/s",
                 note="once per run, before training")]
    plan = np.arange(len(paths) // batch * batch).reshape(-1, batch)
    for t in threads:
        src = FileSource(paths, np.zeros(len(paths)), 256, threads=t)
        src.get(plan[0])  # warm the thread pool and the page cache
        start = time.perf_counter()
        for idx in plan:
            src.get(idx)
        rate = plan.size / (time.perf_counter() - start)
        rows.append(dict(stage=f"FileSource.get, {t} thread(s)", rate=rate, unit="img/s",
                         note=f"{rate / max(t, 1):.0f} img/s/worker"))
    workers = max(threads)
    src = FileSource(paths, np.zeros(len(paths)), 256, threads=1)
    start = time.perf_counter()
    for _ in HostLoader(src, plan, num_workers=workers, prefetch=2 * workers):
        pass
    rate = plan.size / (time.perf_counter() - start)
    rows.append(dict(stage=f"HostLoader, {workers} worker(s) x 1 decode thread", rate=rate, unit="img/s",
                     note=f"{rate / workers:.0f} img/s/worker"))
    return rows


def device_rows(batch, reps):
    recipes = (
        ("pretrain_view 256->224 (imagenet, blur)", 256,
         augment.AugmentParams(224, IMAGENET_MEAN, IMAGENET_STD, crop_scale=(0.008, 1.0), blur=True)),
        ("pretrain_view 32->32 (cifar)", 32, augment.AugmentParams(32, CIFAR_MEAN, CIFAR_STD)),
        ("eval_view 256->224", 256, augment.AugmentParams(224, IMAGENET_MEAN, IMAGENET_STD)),
    )
    rows = []
    for name, load, params in recipes:
        images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, load, load, 3), dtype=np.uint8))
        if name.startswith("eval"):
            fn = jax.jit(augment.eval_view, static_argnums=1)
            run = lambda i: fn(images, params)
        else:
            fn = jax.jit(augment.pretrain_view, static_argnums=2)
            run = lambda i: fn(jax.random.key(i), images, params)
        start = time.perf_counter()
        run(0).block_until_ready()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(reps):
            out = run(i + 1)
        out.block_until_ready()
        ms_per_1000 = (time.perf_counter() - start) / (reps * batch) * 1e6
        rows.append(dict(stage=name, rate=ms_per_1000, unit="ms / 1,000 img",
                         note=f"compile {compile_s:.1f} s, batch {batch}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=common.positive(int), default=512)
    parser.add_argument("--batch", type=common.positive(int), default=64)
    parser.add_argument("--threads", type=common.positive_ints, default="1,2",
                        help="decode thread counts to time, comma-separated")
    parser.add_argument("--aug_batch", type=common.positive(int), default=64)
    parser.add_argument("--reps", type=common.positive(int), default=3)
    args = parser.parse_args(argv)
    if args.images < args.batch:
        parser.error(f"--images {args.images} is below --batch {args.batch}: no batch to time")
    threads = args.threads
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = write_jpegs(folder, args.images)
        print(f"wrote {len(paths)} JPEGs 500x375 in {time.perf_counter() - start:.1f} s; {common.load_note()}; "
              f"JAX backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
        rows = host_rows(paths, args.batch, threads)
    rows += device_rows(args.aug_batch, args.reps)
    print(common.markdown(rows, COLUMNS))


if __name__ == "__main__":
    main()
