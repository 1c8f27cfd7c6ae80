"""What the bench/ scripts share: the benchmark rows, peak FLOP/s, step timing, the table."""
import argparse
import dataclasses
import os
import statistics
import time

NUM_PROTOTYPES = 512  # K of configs/default.py, the prototype classifier's width on both sides
VIEWS_PER_PAIR = 4  # SPCL: two augmented views of image A and two of image B


@dataclasses.dataclass(frozen=True)
class Row:
    model: str  # resnet18 (CIFAR stem) | resnet50 (ImageNet stem)
    px: int  # crop size fed to the network
    dtype: str  # float32 | bfloat16
    batch: int  # pairs per step


PRESETS = {
    "cpu": dict(width=0.0625, steps=3, rows=[Row("resnet18", 32, "float32", 16)]),
    # The full-width network of the CPU convolution-gap measurement (BENCHMARKS.md, "The CPU convolution gap").
    "cpu-full": dict(width=1.0, steps=5, rows=[Row("resnet18", 32, "float32", 32)]),
    # In order of importance (bench/gpu.sh gives the whole sweep a time limit): the configs' own bfloat16 first.
    "gpu": dict(width=1.0, steps=10, rows=[
        Row("resnet18", 32, "bfloat16", 512), Row("resnet50", 224, "bfloat16", 128),
        Row("resnet18", 32, "float32", 512), Row("resnet18", 32, "bfloat16", 256),
        Row("resnet50", 224, "bfloat16", 64), Row("resnet18", 32, "float32", 256),
        Row("resnet50", 224, "float32", 64)]),
}

# XLA:CPU's YNNPACK fusion types: jaxlib 0.10's default, and what spcl_jax.runtime.configure() keeps (convolutions
# on XLA's own kernels). For compiler_options, which take exact lists.
YNNPACK_DEFAULT = {"xla_cpu_experimental_ynn_fusion_type":
                   "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
YNNPACK_WITHOUT_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                                "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

# Dense peak TFLOP/s: bfloat16 on tensor cores, float32 without them (H200 = H100 SXM compute).
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 67.0}, "H200": {"bfloat16": 989.0, "float32": 67.0}}


def peak_tflops(device_name, dtype):
    """Peak of a known GPU (matched by name; the H100 PCIe is not in the table), else None."""
    if "PCIe" in device_name:
        return None
    return next((peaks[dtype] for kind, peaks in PEAK_TFLOPS.items() if kind in device_name), None)


def result(row, seconds_per_step, setup_s, flops_per_step, device_name):
    """One table row as a dict: the spec, ms/step, views/s, TFLOP/s and the fraction of the peak."""
    tflops = flops_per_step / seconds_per_step / 1e12
    peak = peak_tflops(device_name, row.dtype)
    return dict(dataclasses.asdict(row), setup_s=setup_s, ms_per_step=1e3 * seconds_per_step,
                views_per_s=VIEWS_PER_PAIR * row.batch / seconds_per_step, tflops=tflops,
                pct_peak=None if peak is None else 100 * tflops / peak)


COLUMNS = [("model", "model", "{}"), ("px", "px", "{}"), ("dtype", "dtype", "{}"), ("batch", "batch (pairs)", "{}"),
           ("setup_s", "setup s", "{:.1f}"), ("ms_per_step", "ms/step", "{:.1f}"), ("views_per_s", "views/s", "{:.0f}"),
           ("tflops", "TFLOP/s", "{:.3g}"), ("pct_peak", "% peak", "{:.1f}")]


def positive(kind):
    """argparse type: a positive int or float, else one clear error naming the value."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def positive_ints(text):
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_size_flags(parser):
    """The preset and its overrides, shared by train_step.py and torch_spcl.py (and passed from one to the other)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=positive(int), help="timed steps per row (default: the preset's)")
    parser.add_argument("--width", type=positive(float), help="width multiplier (default: the preset's)")
    parser.add_argument("--batch", type=positive(int), help="pairs per step, every row (default: the preset's)")
    parser.add_argument("--num-prototypes", type=positive(int), default=NUM_PROTOTYPES,
                        help="K, the prototype classifier's width (default %(default)s)")


def size_argv(args):
    """The command-line form of add_size_flags' values."""
    argv = ["--preset", args.preset, "--num-prototypes", str(args.num_prototypes)]
    for flag, value in (("--steps", args.steps), ("--width", args.width), ("--batch", args.batch)):
        argv += [] if value is None else [flag, str(value)]
    return argv


def sizes(args):
    """(width, timed steps, rows) of the chosen preset with the command line's overrides."""
    preset = PRESETS[args.preset]
    rows = [r if args.batch is None else dataclasses.replace(r, batch=args.batch) for r in preset["rows"]]
    return args.width or preset["width"], args.steps or preset["steps"], rows


def time_interleaved(steps, count):
    """Median seconds of each of `steps` ({name: fn running one step to completion}) over `count` rounds,
    the steps taking turns within each round, so that load from other jobs hits them all alike."""
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_note():
    """One line: CPU model, usable cores, load average and the versions of the libraries timed."""
    import importlib.metadata
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    versions = []
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "pillow", "simplejpeg", "grain", "torch", "faiss-cpu"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return (f"machine: {model}, {len(os.sched_getaffinity(0))} usable cores, load average "
            f"{os.getloadavg()[0]:.2f}; {', '.join(versions)}")


def load_note():
    """The 1-minute load average against the CPU count: timings on a shared CPU are upper bounds."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


def save(path, text):
    """Rewrites `path`, when given, with `text`: a run stopped by a time limit leaves the rows it finished."""
    if path:
        with open(path, "w") as f:
            f.write(text)


def markdown(results, columns=COLUMNS):
    """A markdown table; missing values print as '-'."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
