"""What bench/train_step.py and bench/torch_spcl.py share: the benchmark rows, peak FLOP/s, the table."""
import dataclasses

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
    # In order of importance (bench/gpu.sh gives the whole sweep a time limit): the configs' own bfloat16 first.
    "gpu": dict(width=1.0, steps=10, rows=[
        Row("resnet18", 32, "bfloat16", 512), Row("resnet50", 224, "bfloat16", 128),
        Row("resnet18", 32, "float32", 512), Row("resnet18", 32, "bfloat16", 256),
        Row("resnet50", 224, "bfloat16", 64), Row("resnet18", 32, "float32", 256),
        Row("resnet50", 224, "float32", 64)]),
}

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


def markdown(results, columns=COLUMNS):
    """A markdown table; missing values print as '-'."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
