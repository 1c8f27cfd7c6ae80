"""Input pipeline: host CPU per image, loader throughput by worker count, and the device-side views.

    python -m bench.input_pipeline [--images 256] [--batch 32] [--workers 1,2] [--repeats 5] [--json] [--skip-loader]

Writes ImageNet-like JPEGs (500x375 and 375x500 windows of scikit-learn's two bundled photos, quality
90) to a temporary folder and measures, in one run:

* host CPU ms per image, per format (the JPEG files; the records `python -m spcl_jax.data.prepare` writes
  of them: shorter side 256, quality 90): the CPU time (this process) of `BatchMaker` making
  SimCLR-style batches (each image decoded whole into its canvas, plus the boxes and uniforms of its two
  views), the formats taking turns over `--repeats` rounds after one untimed pass each (median (min–max));
* loader throughput: `pipeline.Loader` over the same batches, repeated to `--loader_images`, with each
  worker count (images/s after the first batch, in steady state; the workers' start-up separately), every
  (format, worker count) taking its turn in each of `--repeats` rounds (no warm-up round: the start-up is
  reported apart), and what one worker process costs per image (its decoding, plus shared memory and
  hand-over), 1 / its rate; the speed-up of the most workers over one is the ratio of the median rates with
  the range of the per-round ratios (`--skip-loader` leaves this part out);
* the cores one accelerator needs to be fed 1,750 images/s (an H100 at 3,500 views/s of ResNet-50) at
  those costs;
* the device side (`augment.views`: crops, colours, blur from the 256x384 canvas to 224) on whatever
  backend JAX picks, per 1,000 views (median (min–max) of `--repeats` rounds).

Everything goes through bench/common.py `interleaved`; the output starts with the machine note (CPU, cores,
load, versions, device) and ends with the load after.

`--json` ends the output with one JSON object holding every number (`folder_cpu_ms_per_image`, ...).
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from bench import common
from spcl_jax import runtime
from spcl_jax.data import crops, pipeline, records
from spcl_jax.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from spcl_jax.data.imagefolder import check_images
from spcl_jax.data.sources import FileSource

COLUMNS = [("stage", "stage", "{}"), ("value", "value", "{}"), ("unit", "unit", "{}"), ("note", "note", "{}")]
SPECS = (("a", "pretrain"), ("a", "pretrain"))  # two views per image, as SimCLR; a pair step holds two images
RECIPE = pipeline.Recipe(crop_scale=(0.008, 1.0), eval_crop=196)
LOAD_SIZE = 256  # the shorter side images are capped at for 224 crops
FEED_RATE = 1750  # images/s one H100 consumes at 3,500 views/s


def write_jpegs(folder, count, seed=0):
    """`count` 500x375 (a third of them 375x500) JPEG windows of the bundled photos, quality 90."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 375 + 1), rng.integers(0, photo.shape[1] - 500 + 1)
        image = Image.fromarray(photo[top:top + 375, left:left + 500])
        if i % 3 == 2:
            image = image.transpose(Image.Transpose.ROTATE_90)
        path = os.path.join(folder, f"{i:05d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def sources(folder, count):
    """{format: source} of the same images: the JPEG files, and the records `prepare` writes of them."""
    paths = write_jpegs(folder, count)
    check_images(paths, np.zeros(len(paths)), skip_bad=False, hint="")
    labels = np.zeros(len(paths), np.int64)
    out = os.path.join(folder, "records")
    records.prepare("imagefolder", folder, {"train": (paths, labels), "test": (paths[:1], labels[:1])}, ["all"], out,
                    max_side=LOAD_SIZE, log=lambda _: None)
    return {"folder": FileSource(paths, labels, LOAD_SIZE), "prepared": records.open_split(out, "train", LOAD_SIZE)[0]}


def makers(formats, batch):
    """{format: BatchMaker of one pass over every image in order}."""
    out = {}
    for name, source in formats.items():
        steps = len(source) // batch
        out[name] = pipeline.make_pass(source, {"a": np.arange(steps * batch).reshape(steps, batch)}, SPECS, RECIPE,
                                       seed=(0,))
    return out


def host_cpu_ms(passes, repeats):
    """{format: [CPU ms per image of each round]}, the formats taking turns (after one untimed pass each)."""
    def whole_pass(maker):
        for step in range(maker.num_steps):
            maker(step)

    seconds = common.interleaved({name: (lambda maker=maker: whole_pass(maker)) for name, maker in passes.items()},
                                 repeats, clock=time.process_time)
    return {name: [s / (passes[name].num_steps * passes[name].batch_size) * 1e3 for s in t]
            for name, t in seconds.items()}


def loader_rates(passes, workers, images, repeats):
    """{(format, workers): [(images/s, start-up s) of each round]}, every (format, worker count) taking turns."""
    out = {(name, w): [] for name in passes for w in workers}
    common.interleaved({key: (lambda key=key: out[key].append(loader_rate(passes[key[0]], key[1], images)))
                        for key in out}, repeats, warmup=0)
    return out


def loader_rate(maker, workers, images):
    """(images/s after the first batch, seconds to the first batch) of a Loader with `workers` processes
    over `maker`'s plan repeated to at least `images` images."""
    repeats = -(-images // (maker.num_steps * maker.batch_size))
    maker = dataclasses.replace(maker, sets={name: np.tile(plan, (repeats, 1)) for name, plan in maker.sets.items()})
    began = time.perf_counter()
    with pipeline.Loader(maker, num_workers=workers) as loader:
        next(loader)
        first = time.perf_counter()
        for _ in loader:
            pass
    end = time.perf_counter()
    return (maker.num_steps - 1) * maker.batch_size / max(end - first, 1e-9), first - began


def device_ms_per_1000_views(batch, reps):
    """([ms per 1,000 views of the ImageNet recipe, each round], compile s) of augment.views on the default JAX
    backend."""
    import jax

    from spcl_jax import augment

    params = augment.AugmentParams(224, IMAGENET_MEAN, IMAGENET_STD, blur=True)
    rng = np.random.default_rng(0)
    canvas = (LOAD_SIZE, LOAD_SIZE * 3 // 2)
    host = {"pixels_a": rng.integers(0, 256, (batch, *canvas, 3), dtype=np.uint8),
            "frame_a": np.tile(np.asarray([[256, 341, 0, 256 / 375]], np.float32), (batch, 1)),
            "boxes": np.tile(np.asarray([[[20, 30, 180, 200]]], np.float32), (batch, len(SPECS), 1)),
            "draws": rng.random((batch, len(SPECS), crops.VIEW_DRAWS),
                                dtype=np.float32)}
    fn = jax.jit(lambda b: augment.views(b, SPECS, params))
    data = jax.device_put(host)
    start = time.perf_counter()
    fn(data).block_until_ready()
    compile_s = time.perf_counter() - start
    seconds = common.interleaved({"views": lambda: fn(data).block_until_ready()}, reps, warmup=0)["views"]
    return [s / (batch * len(SPECS)) * 1e6 for s in seconds], compile_s


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=common.positive(int), default=256)
    parser.add_argument("--batch", type=common.positive(int), default=32)
    parser.add_argument("--workers", type=common.positive_ints, default="1,2",
                        help="worker process counts to time the loader with, comma-separated")
    parser.add_argument("--repeats", type=common.positive(int), default=5)
    parser.add_argument("--loader_images", type=common.positive(int), default=8192,
                        help="images each loader run loads (the images repeated): long enough for a steady state")
    parser.add_argument("--aug_batch", type=common.positive(int), default=16)
    parser.add_argument("--json", action="store_true", help="end with one JSON object of every number")
    parser.add_argument("--skip-loader", action="store_true",
                        help="leave out the loader throughput (worker processes; bench/gpu.sh, for time)")
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch:
        parser.error(f"--images {args.images} is below 2 x --batch {args.batch}: the loader needs two batches")
    print(common.machine_note(), flush=True)
    print(f"{args.images} images, batch {args.batch}, {args.repeats} interleaved rounds; {common.SPREAD} per cell; "
          f"uint8 host batches, float32 device views", flush=True)
    rows, numbers = [], {}
    with tempfile.TemporaryDirectory() as folder:
        passes = makers(sources(folder, args.images), args.batch)
        load_before = os.getloadavg()[0]
        per_format = host_cpu_ms(passes, args.repeats)
        for name, values in per_format.items():
            median = statistics.median(values)
            numbers[f"{name}_cpu_ms_per_image"] = median
            numbers[f"{name}_cpu_ms_per_image_range"] = [min(values), max(values)]
            rows.append(dict(stage=f"host CPU per image, {name}", value=common.spread(values, 1.0, "{:.3f}"), unit="ms",
                             note="decode into the canvas + both views' boxes and uniforms"))
            rows.append(dict(stage=f"cores per accelerator at {FEED_RATE:,} img/s, {name}",
                             value=f"{FEED_RATE * median / 1e3:.2f}", unit="cores", note="at the median CPU cost"))
        ratio, low, high = common.ratio(per_format["prepared"], per_format["folder"])
        numbers["prepared_over_folder"] = ratio
        numbers["prepared_over_folder_range"] = [low, high]
        rows.append(dict(stage="host CPU per image, prepared / folder", value=f"{ratio:.2f} ({low:.2f}–{high:.2f})",
                         unit="ratio", note="of the medians (range of the per-round ratios)"))
        measured = {} if args.skip_loader else loader_rates(passes, args.workers, args.loader_images, args.repeats)
        for name in passes if measured else ():
            rates = {w: [rate for rate, _ in measured[name, w]] for w in args.workers}
            for workers, values in rates.items():
                startup = statistics.median(s for _, s in measured[name, workers])
                numbers[f"{name}_loader_images_per_s_{workers}_workers"] = statistics.median(values)
                numbers[f"{name}_loader_images_per_s_{workers}_workers_range"] = [min(values), max(values)]
                rows.append(dict(stage=f"loader, {name}, {workers} worker process(es)",
                                 value=common.spread(values, 1.0, "{:,.0f}"), unit="img/s",
                                 note=f"steady state; start-up {startup:.1f} s (median)"))
            if 1 in rates:
                worker_ms = [1e3 / r for r in rates[1]]
                numbers[f"{name}_worker_ms_per_image"] = statistics.median(worker_ms)
                rows.append(dict(stage=f"one worker process per image, {name}",
                                 value=common.spread(worker_ms, 1.0, "{:.3f}"), unit="ms",
                                 note=f"{FEED_RATE * statistics.median(worker_ms) / 1e3:.2f} cores per accelerator "
                                      "at this cost"))
            if 1 in rates and len(rates) > 1:
                top = max(rates)
                speedup, low, high = common.ratio(rates[top], rates[1])
                numbers[f"{name}_loader_speedup_{top}_over_1"] = speedup
                numbers[f"{name}_loader_speedup_{top}_over_1_range"] = [low, high]
                rows[-1]["note"] += f"; {top} workers: {speedup:.2f}x one ({low:.2f}–{high:.2f})"
        load_after = os.getloadavg()[0]
    ms, compile_s = device_ms_per_1000_views(args.aug_batch, args.repeats)
    numbers["device_ms_per_1000_views"] = statistics.median(ms)
    import jax

    rows.append(dict(stage="device views 256x384 canvas -> 224 (colours, blur, crop)",
                     value=common.spread(ms, 1.0, "{:,.1f}"),
                     unit="ms / 1,000 views", note=f"{jax.devices()[0].device_kind}; compile {compile_s:.1f} s"))
    numbers.update(load_before=load_before, load_after=load_after)
    print(f"load average (1 min) before the host and loader parts {load_before:.2f}, after {load_after:.2f}")
    print(common.markdown(rows, COLUMNS))
    print(common.load_after())
    if args.json:
        print(json.dumps(numbers))


if __name__ == "__main__":
    main()
