"""Smoke tests of every bench/ script at tiny sizes (1-2 rounds): each runs to the end and prints the machine note
first, its table, with the expected columns and finite numbers, and the load after; the shared helpers (interleaved
rounds, median (min–max), ratio ranges, the machine note, bench/all.sh's part selection); and the CPU convolution
setting the benchmarks led to (spcl_jax.runtime.configure).

The scripts run in this process (their `main` with a command line), on its 8 fake CPU devices. The
train_step and epoch_overhead runs build the same SPCL step (bench/train_step.py's `build_step` with the
same row, width and K), which build_step keeps, so it is traced and compiled once.
"""
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from bench import ablation, common, cpu_conv, epoch_overhead, input_pipeline, kmeans, loader_step, train_step

TINY = ["--batch", "8", "--width", "0.0625"]  # shared by train_step and epoch_overhead: one compiled step
TINY_K = "16"
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?|nan|inf", re.IGNORECASE)


@pytest.fixture(autouse=True)
def no_settling(monkeypatch):
    """The benchmarks' idle pause between timed calls is for real measurements, not for these checks."""
    monkeypatch.setattr(common, "SETTLE_S", 0.0)


def table(text, titles):
    """Rows ({title: cell}) of the markdown table in `text` whose header is exactly `titles`."""
    lines = text.splitlines()
    header = "| " + " | ".join(titles) + " |"
    assert header in lines, f"no table with columns {titles} in:\n{text}"
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(titles, (cell.strip() for cell in line.strip("|").split("|")))))
    assert rows, f"table {titles} has no rows"
    return rows


def numbers(cell):
    """Every number in a cell ('1,234.5', '12.3 (0.45)', '9.1 / 9.2', '1.5 (1.2–1.9)'), each checked finite."""
    values = [float(v.replace(",", "")) for v in NUMBER.findall(cell)]
    assert values and all(math.isfinite(v) for v in values), f"not finite numbers: {cell!r}"
    return values


def spread_of(cell):
    """(median, min, max) of a 'median (min–max)' cell, checked ordered."""
    match = re.fullmatch(r"([-\d,.e+]+) \(([-\d,.e+]+)–([-\d,.e+]+)\)", cell.strip())
    assert match, f"not a 'median (min–max)' cell: {cell!r}"
    middle, low, high = (float(v.replace(",", "")) for v in match.groups())
    assert low <= middle <= high, cell
    return middle, low, high


def framed(out):
    """The output opens with the machine note and closes with the load after (bench/common.py)."""
    lines = out.strip().splitlines()
    assert lines[0].startswith("machine: ") and "usable cores" in lines[0] and "load average" in lines[0], lines[0]
    assert lines[1].startswith("versions: Python ") and " jax " in lines[1], lines[1]
    assert lines[2].startswith("device: "), lines[2]
    assert any(line.startswith("(after: load average ") for line in lines[-2:]), lines[-2:]


def test_kmeans_bench(capsys):
    kmeans.main(["--sizes", "600x8x6", "--pca-sizes", "500x32", "--pca-dim", "8", "--iters", "3", "--repeats", "2"])
    out = capsys.readouterr().out
    framed(out)
    assert "float32; k-means: 3 Lloyd iterations, distance matmul precision highest" in out
    titles = ["N x D", "K", "ours ms/iter, median (min–max)", "compile s", "sklearn ms/iter, median (min–max)",
              "faiss ms/iter, median (min–max)", "sklearn / ours", "faiss / ours", "inertia ours / sklearn / faiss",
              "empty clusters ours / sklearn / faiss"]
    [row] = table(out, titles)
    assert (row["N x D"], row["K"]) == ("600 x 8", "6")
    for title in ("ours ms/iter, median (min–max)", "sklearn ms/iter, median (min–max)", "sklearn / ours"):
        assert spread_of(row[title])[1] > 0
    inertia = [float(v) for v in row["inertia ours / sklearn / faiss"].split(" / ") if v != "-"]
    assert len(inertia) == 2 + kmeans.faiss_available() and all(math.isfinite(v) and v > 0 for v in inertia)
    [pca] = table(out, ["N x D_in", "-> D", "ms, median (min–max)", "rounds", "compile s (first call)",
                        "floored components"])
    assert (pca["N x D_in"], pca["-> D"], pca["rounds"]) == ("500 x 32", "8", "2")
    assert spread_of(pca["ms, median (min–max)"])[1] > 0


def test_kmeans_defaults_are_the_configs_conditions():
    """D = 256 after PCA-whitening, K = 512 and 20 iterations as configs/default.py; PCA from ResNet-50's 2,048."""
    from configs import default, imagenet

    config = default.get_config()
    sizes = kmeans.parse_sizes(kmeans.CPU_SIZES)
    assert {d for _, d, _ in sizes} == {config.pca_dim} == {imagenet.get_config().pca_dim} == {256}
    assert {k for _, _, k in sizes} == {config.num_prototypes} and kmeans.ITERS == config.kmeans_iters
    assert kmeans.PCA_DIM == 256 and {d for _, d in kmeans.parse_pca_sizes(kmeans.CPU_PCA_SIZES)} == {2048}
    assert {d for _, d, _ in kmeans.GPU_SIZES} == {256} and kmeans.GPU_PCA_SIZES == [(1281167, 2048)]


@pytest.mark.timeout(300)
def test_input_pipeline_bench(capsys):
    input_pipeline.main(["--images", "8", "--batch", "4", "--workers", "1", "--aug_batch", "2", "--repeats", "1",
                         "--loader_images", "16", "--json"])
    out = capsys.readouterr().out
    rows = table(out, [title for _, title, _ in input_pipeline.COLUMNS])
    assert [r["stage"] for r in rows] == [
        "host CPU per image, folder", "cores per accelerator at 1,750 img/s, folder",
        "host CPU per image, prepared", "cores per accelerator at 1,750 img/s, prepared",
        "host CPU per image, prepared / folder", "loader, folder, 1 worker process(es)",
        "one worker process per image, folder", "loader, prepared, 1 worker process(es)",
        "one worker process per image, prepared", "device views 256x384 canvas -> 224 (colours, blur, crop)"]
    assert all(numbers(r["value"])[0] > 0 for r in rows)
    for r in rows:
        if r["unit"] in ("ms", "img/s", "ms / 1,000 views", "ratio"):
            spread_of(r["value"])
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("folder_cpu_ms_per_image", "prepared_cpu_ms_per_image", "folder_loader_images_per_s_1_workers",
                "prepared_loader_images_per_s_1_workers", "device_ms_per_1000_views"):
        assert result[key] > 0, key
    low, high = result["prepared_over_folder_range"]
    assert low <= result["prepared_over_folder"] <= high
    framed("\n".join(lines[:-1]))


def test_input_pipeline_skip_loader(capsys):
    """bench/gpu.sh's form: no worker processes, the host and device parts only."""
    input_pipeline.main(["--images", "8", "--batch", "4", "--aug_batch", "2", "--repeats", "2", "--skip-loader"])
    rows = table(capsys.readouterr().out, [title for _, title, _ in input_pipeline.COLUMNS])
    assert not [r for r in rows if "worker" in r["stage"]] and rows[-1]["stage"].startswith("device views")


def test_input_pipeline_rejects_fewer_images_than_two_batches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        input_pipeline.main(["--images", "6", "--batch", "4"])
    assert exit_info.value.code == 2
    assert "--images 6 is below 2 x --batch 4" in capsys.readouterr().err


def test_cpu_conv_bench(capsys):
    cpu_conv.main(["--batch", "2", "--shapes", "8x8x16x2", "--repeats", "2"])
    out = capsys.readouterr().out
    framed(out)
    torch = importlib.util.find_spec("torch") is not None
    rows = table(out, ["H x W x C_in -> C_out /stride", "GFLOP fwd", "ynnpack fwd ms", "ynnpack fwd+bwd ms",
                       "xla fwd ms", "xla fwd+bwd ms", "im2col fwd ms", "im2col fwd+bwd ms"]
                 + (["torch fwd ms", "torch fwd+bwd ms"] if torch else [])
                 + ["ynnpack / xla fwd", "ynnpack / xla fwd+bwd"] + (["torch / xla fwd", "torch / xla fwd+bwd"]
                                                                     if torch else []))
    [row] = rows
    assert (row["H x W x C_in -> C_out /stride"], row["GFLOP fwd"]) == ("8x8x8->16 /2", "0.00")
    assert all(spread_of(cell)[1] > 0 for title, cell in row.items() if title.endswith(" ms") or "/ xla" in title)


@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_conv_im2col_equals_lax_conv(stride):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 9, 9, 5), np.float32), rng.standard_normal((3, 3, 5, 7), np.float32)
    want = cpu_conv.lax_conv(x, w, stride)
    got = jax.jit(cpu_conv.im2col_conv, static_argnums=2)(x, w, stride)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert want.shape == (2, 5 if stride == 2 else 9, 5 if stride == 2 else 9, 7)


def test_train_step_bench(capsys):
    train_step.main(["--preset", "cpu", "--repeats", "2", "--num-prototypes", TINY_K] + TINY)
    out = capsys.readouterr().out
    framed(out)
    [row] = table(out, [title for _, title, _ in common.COLUMNS])
    assert (row["model"], row["px"], row["dtype"], row["batch (pairs)"], row["rounds"]) == (
        "resnet18", "32", "float32", "8", "2")
    for title in ("setup s", "views/s (median)", "TFLOP/s"):
        assert numbers(row[title])[0] > 0
    median_ms = spread_of(row["ms/step, median (min–max)"])[0]
    assert numbers(row["views/s (median)"])[0] == pytest.approx(4 * 8 / (median_ms / 1e3), rel=0.01)
    assert row["% peak"] == "-"  # no peak is known for a CPU
    assert common.PRESETS["cpu"]["steps"] >= 5 and common.PRESETS["cpu-full"]["steps"] >= 5


def test_train_step_ratio_is_ours_over_the_originals_views_per_second():
    """ours/original of views/s = their step time over ours; interleaved: the range of the per-round ratios."""
    row = dict(model="resnet18", px=32, dtype="float32", batch=8, seconds=[1.0, 2.0, 1.0],
               ynnpack_seconds=[3.0, 6.0, 3.0])
    other = dict(row, batch=16)
    theirs = dict(row, seconds=[1.5, 2.0, 2.0], ms_per_step=2000.0, ms_spread="2000 (1500–2000)", views_per_s=16.0,
                  tflops=0.5)
    [paired, missing] = train_step.combine([row, other], {"results": [theirs], "paired": True})
    assert paired["ratio"] == 2.0 and paired["ratio_range"] == (1.0, 2.0) and paired["torch_ms_per_step"] == 2000.0
    assert paired["ratio_cell"] == "2.00 (1.00–2.00)"
    assert paired["ynnpack_ratio"] == pytest.approx(2 / 3)  # --ynnpack-convs: our step with YNNPACK convolutions
    assert "ratio" not in missing and "ynnpack_ratio" not in missing  # no PyTorch row of that size
    [separate, _] = train_step.combine([row, other], {"results": [theirs]})  # a child process: not paired
    assert separate["ratio"] == 2.0 and separate["ratio_range"] == (0.75, 2.0)


def test_train_step_interleaved_with_the_original_prints_the_ratio_range(monkeypatch, capsys):
    """--compare-torch interleaved: ours and the original take turns and the ratio comes with its per-round
    range (the original here a stand-in step, torch being a benchmark-only dependency)."""
    import importlib.machinery
    import time
    import types

    import bench

    fake_torch = types.ModuleType("torch")
    fake_torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    fake_torch.device = lambda name: name
    calls = []
    fake_original = types.SimpleNamespace(
        prepare=lambda row, width, device, k: ((lambda: (calls.append("theirs"), time.sleep(0.002))), 0.1, 1e6),
        note=lambda: "stand-in original.")
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "bench.torch_spcl", fake_original)
    monkeypatch.setattr(bench, "torch_spcl", fake_original, raising=False)
    train_step.main(["--preset", "cpu", "--repeats", "3", "--num-prototypes", TINY_K, "--compare-torch", "interleaved"]
                    + TINY)
    out = capsys.readouterr().out
    framed(out)
    assert calls == ["theirs"] * 3  # prepare warmed ours up; the stand-in's warm-up is its own business
    [row] = table(out, [title for _, title, _ in train_step.COMBINED])
    ours_ms = spread_of(row["ours ms/step, median (min–max)"])[0]
    theirs_ms = spread_of(row["original ms/step, median (min–max)"])[0]
    ratio, low, high = spread_of(row["ours/original (views/s), ratio of medians (range)"])
    assert ratio == pytest.approx(theirs_ms / ours_ms, rel=0.02, abs=0.01) and low <= ratio <= high
    assert "one step of each in turn; the ratio's range is that of the per-round ratios" in out


def test_epoch_overhead_bench(capsys):
    epoch_overhead.main(["--n0", "64", "--k0", TINY_K, "--sizes", "64", "--ks", TINY_K, "--repeats", "2"] + TINY)
    out = capsys.readouterr().out
    framed(out)
    [row] = table(out, [title for _, title, _ in epoch_overhead.COLUMNS])
    assert (row["N"], row["K"], row["steps"], row["steps timed by"], row["rounds"]) == (
        "64", TINY_K, "8", "run_epoch", "2")
    for _, title, _ in epoch_overhead.COLUMNS[3:-1]:
        assert numbers(row[title])[0] >= 0
    for title in ("train steps s", "feature pass s", "clustering.cluster s"):
        assert spread_of(row[f"{title}, median (min–max)"])[1] > 0
    parts = sum(spread_of(row[f"{t}, median (min–max)"])[0]
                for t in ("train steps s", "clustering.cluster s", "pair planning s"))
    assert numbers(row["epoch s"])[0] == pytest.approx(parts, abs=0.02)
    overhead = numbers(row["overhead %, of the medians (range)"])
    assert len(overhead) == 3 and all(0 < v < 100 for v in overhead)
    assert "reference epoch (N0=64, K0=16):" in out
    assert "features of 32 dims, k-means (float32) on D = 32 after PCA-whitening" in out  # width 1/16: 512 / 16


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loader_step_bench(capsys):
    """The prepared loader feeding launch.py's ResNet-50 step (configs/imagenet.py at a smoke size)."""
    loader_step.main(["--preset", "cpu", "--workers", "1", "--json"])
    out = capsys.readouterr().out
    [row] = table(out, [title for _, title, _ in loader_step.COLUMNS])
    assert (row["preset"], row["pairs/step"], row["workers"]) == ("cpu", "16", "1")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images_per_s_median"] > 0 and 0 <= result["wait_median"] <= 1 and result["cluster_s"] > 0


@pytest.mark.slow
def test_ablation_runs_a_variant_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    ablation.main(["--seeds", "1", "--epochs", "1", "--variants", "simclr", "--out", str(out)])
    [row] = table(out.read_text(), ["variant"] + [title for _, title in ablation.METRICS])
    assert row["variant"] == "simclr" and row["last pseudo-label NMI"] == "-"
    assert 10 < numbers(row["linear probe top-1 %"])[0] <= 100 and 10 < numbers(row["kNN top-1 %"])[0] <= 100
    assert "Protocol: test top-1" in out.read_text()
    with pytest.raises(SystemExit):
        ablation.main(["--variants", "byol"])
    assert "--variants 'byol'; valid: spcl, simclr" in capsys.readouterr().err


def test_epoch_overhead_growth_and_shares():
    """The cost-curve lines and the overhead share, on made-up timings (a second size costs a k-means compile)."""
    rows = [epoch_overhead.with_steps(dict(n=n, k=8, features_s=n / 1e3, kmeans_s=(n / 1e3) ** 2, plan_s=0.01,
                                           cluster_s=3.0), steps_s=7.0, timing="run_epoch") for n in (1000, 4000)]
    assert rows[0]["epoch_s"] == pytest.approx(10.01) and rows[0]["overhead_pct"] == pytest.approx(100 * 3.01 / 10.01)
    assert rows[0]["overhead_cell"] == "30.1" and rows[0]["steps_cell"] == "7.00 (scaled)"
    # Rounds: the overhead's range comes from each round's parts (and, at the reference, its own epoch).
    rounds = dict(cluster_s=[2.0, 3.0, 4.0], plan_s=[0.0, 0.0, 0.0], steps_s=[8.0, 7.0, 6.0])
    reference = epoch_overhead.with_steps(dict(n=1, k=1, features_s=1.0, kmeans_s=1.0, plan_s=0.0, cluster_s=3.0),
                                          rounds["steps_s"], "run_epoch", rounds)
    assert reference["steps_s"] == 7.0 and reference["overhead_cell"] == "30.0 (20.0–40.0)"
    assert reference["cluster_cell"] == "3.00 (2.00–4.00)" and reference["steps_cell"] == "7.00 (6.00–8.00)"
    line = epoch_overhead.growth(rows, "n", "k", 8)
    assert line == ("growth with N (K=8, N 1,000 -> 4,000): feature pass ^1.00, PCA + k-means ^2.00, "
                    "planning ^0.00, clustering.cluster ^0.00")
    assert epoch_overhead.growth(rows, "k", "n", 1000) is None  # one K only: no curve


def test_epoch_overhead_rejects_a_size_not_above_k(capsys):
    with pytest.raises(SystemExit):
        epoch_overhead.parse_args(["--n0", "64", "--k0", "16", "--sizes", "16,64", "--ks", "16", "--batch", "8"])
    assert "N=16 with K=16" in capsys.readouterr().err


def test_torch_spcl_bench(capsys):
    """torch is a benchmark-only dependency (bench/requirements.txt), absent in CI: there the script must stop
    with one line saying how to install it; where torch is installed, its step runs and prints its table."""
    if importlib.util.find_spec("torch") is None:
        done = subprocess.run([sys.executable, "bench/torch_spcl.py"], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [
            "bench/torch_spcl.py needs torch, a benchmark-only dependency: pip install -r bench/requirements.txt"]
        return
    from bench import torch_spcl

    torch_spcl.main(["--preset", "cpu", "--steps", "1", "--num-prototypes", TINY_K] + TINY)
    [row] = table(capsys.readouterr().out, [title for _, title, _ in common.COLUMNS])
    for title in ("setup s", f"ms/step, {common.SPREAD}", "views/s (median)", "TFLOP/s"):
        assert numbers(row[title])[0] > 0


def numpy_conv3x3(x, w, cotangent):
    """float64 reference of a 3x3, stride-1, pad-1 NHWC convolution: output and the (x, w) gradients."""
    x, w, cotangent = (np.asarray(a, np.float64) for a in (x, w, cotangent))
    size = x.shape[1]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros(x.shape[:3] + w.shape[-1:])
    dpadded, dw = np.zeros_like(padded), np.zeros_like(w)
    for i in range(3):
        for j in range(3):
            window = padded[:, i:i + size, j:j + size]
            y += window @ w[i, j]
            dw[i, j] = window.reshape(-1, x.shape[-1]).T @ cotangent.reshape(-1, w.shape[-1])
            dpadded[:, i:i + size, j:j + size] += cotangent @ w[i, j].T
    return y, dpadded[:, 1:-1, 1:-1], dw


def test_cpu_convolutions_run_on_xla_kernels_and_match_float64():
    """spcl_jax takes convolutions off YNNPACK (the slower kernels on this CPU, BENCHMARKS.md); both kernels agree
    with a float64 reference, forward and backward, and the flag is what decides which one runs."""
    rng = np.random.default_rng(0)
    x, w, cotangent = (rng.standard_normal(shape, np.float32) for shape in [(8, 16, 16, 32), (3, 3, 32, 32),
                                                                             (8, 16, 16, 32)])

    def conv_and_grads(x, w, cotangent):
        conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y, pullback = jax.vjp(conv, x, w)
        return (y,) + pullback(cotangent)

    lowered = jax.jit(conv_and_grads).lower(x, w, cotangent)
    ours = lowered.compile()
    ynnpack = lowered.compile(compiler_options={
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    assert "ynn_fusion" not in ours.as_text() and "ynn_fusion" in ynnpack.as_text()
    reference = numpy_conv3x3(x, w, cotangent)
    for compiled in (ours, ynnpack):
        for got, want in zip(compiled(x, w, cotangent), reference):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_interleaved_takes_turns_after_one_warm_up_each():
    """Every method runs once per round, the order rotated each round; the warm-up calls are not timed."""
    calls, clock = [], iter(range(1000))
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.interleaved(fns, repeats=4, clock=lambda: next(clock))
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t == [1] * 4 for t in times.values())  # each timing spans one call (the fake clock ticks once)
    calls.clear()
    assert common.interleaved(fns, repeats=1, warmup=0, clock=lambda: next(clock)) == {n: [1] for n in "abc"}
    assert calls == ["a", "b", "c"]
    with pytest.raises(ValueError):
        common.interleaved(fns, repeats=0)


def test_interleaved_pauses_before_each_timed_call(monkeypatch):
    """settle: an untimed sleep before every timed call (none before the warm-up calls)."""
    events = []
    monkeypatch.setattr(common.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    common.interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=2, settle=0.25)
    pause = ("sleep", 0.25)
    assert events == ["a", "b"] + [pause, "a", pause, "b", pause, "b", pause, "a"]


def test_spread_and_ratio_cells():
    assert common.spread([0.003, 0.001, 0.002], 1e3) == "2.0 (1.0–3.0)"
    assert common.spread([5.0], fmt="{:.2f}") == "5.00 (5.00–5.00)"
    ours, theirs = [1.0, 2.0, 4.0, 1.0, 2.0], [2.0, 2.0, 4.0, 3.0, 3.0]
    assert common.ratio(theirs, ours) == (1.5, 1.0, 3.0)  # medians 3 / 2; per round 2, 1, 1, 3, 1.5
    assert common.ratio_cell(theirs, ours) == "1.50 (1.00–3.00)"
    assert common.ratio(theirs, ours, paired=False) == (1.5, 0.5, 4.0)  # not paired: min/max to max/min
    with pytest.raises(ValueError):
        common.ratio([1.0], [1.0, 2.0])
    middle, low, high = common.ratio([3.0, 1.0, 2.0, 9.0], [1.0, 2.0, 5.0, 1.0])
    assert low <= middle <= high  # the ratio of the medians lies within the per-round range


def test_machine_note_fields():
    info = common.machine_info()
    assert info["cpu"] and info["usable_cores"] == len(os.sched_getaffinity(0)) >= 1
    assert len(info["load"]) == 3 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", info["date"])
    assert {"jax", "jaxlib", "flax", "optax", "numpy"} <= set(info["versions"])
    assert info["versions"]["jax"] == jax.__version__ and info["device"].startswith(jax.devices()[0].device_kind)
    assert info["env"]["JAX_PLATFORMS"] == "cpu"  # set by conftest: a timing-relevant variable is named
    note = common.machine_note()
    first, versions, device = note.splitlines()
    assert first.startswith(f"machine: {info['cpu']}, {info['usable_cores']} usable cores")
    assert "before: load average" in first and "(1 / 5 / 15 min)" in first
    assert versions.startswith("versions: Python ") and f"jax {jax.__version__}" in versions
    assert device.startswith(f"device: {jax.devices()[0].device_kind}") and "UTC" in device
    assert common.load_after().startswith("(after: load average ")
    assert common.machine_info("cuda:0 (torch)")["device"] == "cuda:0 (torch)"  # given as is, JAX untouched


def test_machine_note_asks_a_child_for_the_device():
    """Scripts whose children need the accelerator (loader_step, ablation, train_step --compare-torch) ask a
    short-lived child process, which leaves the accelerator's memory free."""
    assert common.device_kind("child").startswith("cpu (cpu, ")


def test_all_sh_runs_every_part_or_says_why_not(tmp_path):
    log = tmp_path / "all.log"
    done = subprocess.run(["bash", "bench/all.sh", str(log)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, BENCH_ONLY="no-such-part"))
    assert done.returncode == 0, done.stderr
    text = log.read_text()
    for part in ("kmeans", "cpu_conv", "train_step", "train_step_1core", "train_step_narrow", "cpu_step_profile",
                 "huge_pages", "huge_pages_full", "epoch_overhead", "input_pipeline", "ablation"):
        assert f"## {part}: skipped (BENCH_ONLY / BENCH_SKIP)" in text, part
    assert "## loader_step: skipped (it times the ResNet-50 step fed by the loader: accelerators only" in text
    assert "uptime before:" in text and "uptime after:" in text and "JAX backend: cpu" in text


def test_cpu_step_profile_lists_operation_kinds_and_times_the_relu_variant(capsys):
    from bench import cpu_step_profile

    relu = cpu_step_profile.resnet.relu
    # every kind listed (--top): which kinds lead depends on the load (CI ranked the collectives above the transposes)
    cpu_step_profile.main(["--preset", "cpu", "--steps", "2", "--num-prototypes", TINY_K, "--relu-max", "--top", "1000"]
                          + TINY)
    out = capsys.readouterr().out
    rows = table(out, ["operation kind", "ms per step (all threads)",
                       f"share of step time x {len(os.sched_getaffinity(0))} threads", "events per step"])
    assert rows and all(numbers(r["ms per step (all threads)"])[0] >= 0 for r in rows)
    assert "transpose_copy_fusion" in {r["operation kind"] for r in rows}  # the weight gradients' transposes
    assert re.search(r"relu as jnp.maximum: [\d.]+ \([\d.]+–[\d.]+\) ms per step, [\d.]+x ours", out)
    assert cpu_step_profile.resnet.relu is relu  # restored for whatever runs next in this process


def test_huge_pages_bench_runs_each_setting_in_its_own_process_in_turns(monkeypatch, capsys):
    from bench import huge_pages

    settings, real_run = [], subprocess.run

    def child_process(command, env=None, **kwargs):  # the child, run in this process (sharing the compiled step)
        if "--child" not in command:  # the machine note's device probe
            return real_run(command, env=env, **kwargs)
        settings.append(env["GLIBC_TUNABLES"])
        huge_pages.main(command[command.index("--child"):])
        return subprocess.CompletedProcess(command, 0, capsys.readouterr().out, "")

    monkeypatch.setattr(huge_pages.subprocess, "run", child_process)
    huge_pages.main(["--preset", "cpu", "--steps", "2", "--rounds", "2", "--num-prototypes", TINY_K] + TINY)
    out = capsys.readouterr().out
    assert settings == ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=1",
                        "glibc.malloc.hugetlb=0"]  # the order rotates every round
    rows = table(out, ["setting", "ms/step", "minor page faults/step", "kernel CPU ms/step"])
    assert [r["setting"] for r in rows] == list(huge_pages.SETTINGS)
    assert all(numbers(r["ms/step"])[0] > 0 and numbers(r["minor page faults/step"])[0] >= 0 for r in rows)
    assert re.search(r"4 KiB / huge pages \(time\): [\d.]+ \([\d.]+–[\d.]+\)", out)


def test_digits_preset_is_the_demo_step():
    from configs import digits

    [row], demo = common.PRESETS["digits"]["rows"], digits.get_config()
    config = train_step.config_for(row, common.PRESETS["digits"]["width"])
    assert (config.image_size, config.width_multiplier, config.batch_size, config.model) == (
        demo.image_size, demo.width_multiplier, demo.batch_size, demo.model)
