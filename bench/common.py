"""What the bench/ scripts share: the benchmark rows, peak FLOP/s, interleaved timing with its median and range,
the machine note every script prints first (and the load after, last), the table."""
import argparse
import dataclasses
import os
import statistics
import time

NUM_PROTOTYPES = 512  # K of configs/default.py, the prototype classifier's width on both sides
VIEWS_PER_PAIR = 4  # SPCL: two augmented views of image A and two of image B
SPREAD = "median (min–max)"  # how every timed cell reads: the median of the rounds and their range


@dataclasses.dataclass(frozen=True)
class Row:
    model: str  # resnet18 (CIFAR stem) | resnet50 (ImageNet stem)
    px: int  # crop size fed to the network
    dtype: str  # float32 | bfloat16
    batch: int  # pairs per step


PRESETS = {
    "cpu": dict(width=0.0625, steps=5, rows=[Row("resnet18", 32, "float32", 16)]),
    # The full-width network of the CPU convolution-gap measurement (BENCHMARKS.md, "The CPU convolution gap").
    "cpu-full": dict(width=1.0, steps=5, rows=[Row("resnet18", 32, "float32", 32)]),
    # The embedded demo's network and batch (configs/digits.py: 16 px, width 1/8, 128 pairs).
    "digits": dict(width=0.125, steps=10, rows=[Row("resnet18", 16, "float32", 128)]),
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


def result(row, seconds, setup_s, flops_per_step, device_name):
    """One table row as a dict: the spec, ms/step (median and range of the rounds' `seconds`), views/s,
    TFLOP/s and the fraction of the peak (of the median); `seconds` kept for ratios."""
    seconds = list(seconds)
    seconds_per_step = statistics.median(seconds)
    tflops = flops_per_step / seconds_per_step / 1e12
    peak = peak_tflops(device_name, row.dtype)
    return dict(dataclasses.asdict(row), setup_s=setup_s, ms_per_step=1e3 * seconds_per_step,
                ms_spread=spread(seconds, 1e3), seconds=seconds, rounds=len(seconds),
                views_per_s=VIEWS_PER_PAIR * row.batch / seconds_per_step, tflops=tflops,
                pct_peak=None if peak is None else 100 * tflops / peak)


COLUMNS = [("model", "model", "{}"), ("px", "px", "{}"), ("dtype", "dtype", "{}"), ("batch", "batch (pairs)", "{}"),
           ("setup_s", "setup s", "{:.1f}"), ("ms_spread", f"ms/step, {SPREAD}", "{}"),
           ("rounds", "rounds", "{}"), ("views_per_s", "views/s (median)", "{:.0f}"),
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
    parser.add_argument("--steps", "--repeats", dest="steps", type=positive(int),
                        help="timed rounds per row, one step of each method per round (default: the preset's, "
                             ">= 5)")
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


# Seconds of idle before each timed call of `interleaved`: PyTorch's OpenMP threads (and faiss' and scikit-learn's)
# spin-wait after a parallel region, and on 2 cores that spinning took ~12% from a JAX step timed right after a
# PyTorch one (BENCHMARKS.md, the CPU step).
SETTLE_S = 0.1


def interleaved(fns, repeats=5, warmup=1, clock=time.perf_counter, settle=None):
    """{name: [seconds of each round]} of `fns` ({name: callable running one measurement to completion}).

    Each fn is first called `warmup` times, untimed (compilation, caches, allocator), in order; then come
    `repeats` rounds in which every fn runs once, the order rotated by one place each round (round r starts
    with the r-th fn), so that load from other jobs and "who ran just before" hit every method alike and
    round i of two methods can be compared as a pair (`ratio`). `clock`: time.perf_counter (wall) or
    time.process_time (this process's CPU time). repeats >= 1; 5 or more for a number worth quoting.
    `settle`: seconds slept (untimed) before each timed call, so that no method's threads are still spinning
    (default SETTLE_S).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    settle = SETTLE_S if settle is None else settle
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            time.sleep(settle)
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def spread(values, scale=1.0, fmt="{:.1f}"):
    """'median (min–max)' of `values` x `scale` (an en dash, so that the range never reads as a minus)."""
    scaled = [v * scale for v in values]
    return f"{fmt.format(statistics.median(scaled))} ({fmt.format(min(scaled))}–{fmt.format(max(scaled))})"


def ratio(numerator, denominator, paired=True):
    """(ratio of the medians, lowest, highest) of two series of timings.

    paired (the same rounds of `interleaved`): the range is that of the per-round ratios. Not paired (separate
    runs, e.g. two processes one after the other): the widest range the series allow, min/max to max/min.
    The ratio of the medians always lies within the range."""
    if not numerator or not denominator:
        raise ValueError("ratio of an empty series")
    middle = statistics.median(numerator) / statistics.median(denominator)
    if paired:
        if len(numerator) != len(denominator):
            raise ValueError(f"paired series of different lengths: {len(numerator)} and {len(denominator)}")
        per_round = [a / b for a, b in zip(numerator, denominator)]
        return middle, min(per_round), max(per_round)
    return middle, min(numerator) / max(denominator), max(numerator) / min(denominator)


def ratio_cell(numerator, denominator, paired=True, fmt="{:.2f}"):
    """'ratio of medians (lowest–highest)', see `ratio`."""
    middle, low, high = ratio(numerator, denominator, paired)
    return f"{fmt.format(middle)} ({fmt.format(low)}–{fmt.format(high)})"


# Packages whose versions a note names when they are installed (the timed code and its baselines).
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "scikit-learn", "torch", "faiss-cpu", "pillow", "simplejpeg",
             "grain")
# Environment variables that change what is timed (threads, XLA options, platform), named when set.
TIMING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS",
              "CUDA_VISIBLE_DEVICES")
_DEVICE_PROBE = ("import jax; d = jax.devices()[0]; "
                 "print(f'{d.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))')")


def cpu_model():
    """The CPU's model name (/proc/cpuinfo, else what platform knows)."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return model


def device_kind(where="jax"):
    """What the benchmark runs on. "jax": JAX's first device, here (this starts JAX's backend: on a GPU it
    takes JAX's share of the memory); "child": the same, asked in a short-lived child process (for scripts whose
    children need the GPU); anything else is returned as given (e.g. torch's device name)."""
    if where == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))"
    if where == "child":
        import subprocess
        import sys

        try:
            done = subprocess.run([sys.executable, "-c", _DEVICE_PROBE], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "unknown (the device probe timed out)"
        lines = done.stdout.strip().splitlines()
        return lines[-1] if done.returncode == 0 and lines else f"unknown (device probe exit status {done.returncode})"
    return where


def machine_info(device="jax"):
    """The conditions of a measurement: date, CPU model, usable cores, load averages, Python, library versions,
    the device (see `device_kind`) and the timing-relevant environment variables that are set."""
    import datetime
    import importlib.metadata
    import platform

    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                cpu=cpu_model(), usable_cores=len(os.sched_getaffinity(0)), cpus=os.cpu_count(),
                load=os.getloadavg(), python=platform.python_version(), versions=versions,
                device=device_kind(device), env={k: os.environ[k] for k in TIMING_ENV if os.environ.get(k)})


def load_text(load=None):
    load = os.getloadavg() if load is None else load
    return (f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) on "
            f"{len(os.sched_getaffinity(0))} usable cores")


def machine_note(device="jax"):
    """Three lines for the top of a benchmark's output (the first starts "machine: "): CPU, usable cores and
    the load average before; versions; device, date and environment. See `machine_info`."""
    info = machine_info(device)
    env = "; ".join(f"{k}={v}" for k, v in info["env"].items()) or "no thread or XLA variables set"
    return "\n".join([
        f"machine: {info['cpu']}, {info['usable_cores']} usable cores (of {info['cpus']}); before: "
        f"{load_text(info['load'])}",
        f"versions: Python {info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"device: {info['device']}; {info['date']}; {env}"])


def load_after():
    """The line for the bottom of a benchmark's output. In parentheses, like the other notes bench/gpu.sh
    keeps from the scripts' output."""
    return f"(after: {load_text()})"


def load_note():
    """The 1-minute load average now, short (for notes between rows)."""
    return f"load average {os.getloadavg()[0]:.2f} (1 min) on {len(os.sched_getaffinity(0))} usable cores"


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
