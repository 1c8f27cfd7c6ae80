"""Smoke tests of every bench/ script at tiny sizes: each runs to the end and prints its table, with the
expected columns and finite numbers; and the CPU convolution setting the benchmarks led to (spcl_jax.runtime.configure).

The scripts run in this process (their `main` with a command line), on its 8 fake CPU devices. The
train_step and epoch_overhead runs build the same SPCL step (bench/train_step.py's `build_step` with the
same row, width and K), which build_step keeps, so it is traced and compiled once.
"""
import importlib
import importlib.util
import json
import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from bench import ablation, common, cpu_conv, epoch_overhead, input_pipeline, kmeans, loader_step, memory, train_step

TINY = ["--batch", "8", "--width", "0.0625"]  # shared by train_step and epoch_overhead: one compiled step
TINY_K = "16"
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?|nan|inf", re.IGNORECASE)


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
    """Every number in a cell ('1,234.5', '12.3 (0.45)', '9.1 / 9.2'), each checked finite."""
    values = [float(v.replace(",", "")) for v in NUMBER.findall(cell)]
    assert values and all(math.isfinite(v) for v in values), f"not finite numbers: {cell!r}"
    return values


def test_kmeans_bench(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kmeans.py", "--sizes", "600x8x6", "--iters", "3", "--repeats", "1"])
    kmeans.main()
    out = capsys.readouterr().out
    titles = ["N x D", "K", "ours ms/iter (compile s)", "sklearn ms/iter", "faiss ms/iter",
              "inertia ours / sklearn / faiss", "empty clusters ours / sklearn / faiss"]
    [row] = table(out, titles)
    assert (row["N x D"], row["K"]) == ("600 x 8", "6")
    for title in ("ours ms/iter (compile s)", "sklearn ms/iter"):
        assert all(v >= 0 for v in numbers(row[title]))
    inertia = [float(v) for v in row["inertia ours / sklearn / faiss"].split(" / ") if v != "-"]
    assert len(inertia) == 2 and all(math.isfinite(v) and v > 0 for v in inertia)


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
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("folder_cpu_ms_per_image", "prepared_cpu_ms_per_image", "folder_loader_images_per_s_1_workers",
                "prepared_loader_images_per_s_1_workers", "device_ms_per_1000_views"):
        assert result[key] > 0, key
    assert out.startswith("machine: ")


def test_input_pipeline_rejects_fewer_images_than_two_batches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        input_pipeline.main(["--images", "6", "--batch", "4"])
    assert exit_info.value.code == 2
    assert "--images 6 is below 2 x --batch 4" in capsys.readouterr().err


def test_cpu_conv_bench(capsys):
    cpu_conv.main(["--batch", "2", "--shapes", "8x8x16x2", "--reps", "1"])
    rows = table(capsys.readouterr().out, ["H x W x C_in -> C_out /stride", "GFLOP fwd", "ynnpack fwd ms",
                                           "ynnpack fwd+bwd ms", "xla fwd ms", "xla fwd+bwd ms", "im2col fwd ms",
                                           "im2col fwd+bwd ms"] + (["torch fwd ms", "torch fwd+bwd ms"]
                                                                   if importlib.util.find_spec("torch") else []))
    [row] = rows
    assert (row["H x W x C_in -> C_out /stride"], row["GFLOP fwd"]) == ("8x8x8->16 /2", "0.00")
    assert all(numbers(cell)[0] > 0 for title, cell in row.items() if title.endswith(" ms"))


@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_conv_im2col_equals_lax_conv(stride):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 9, 9, 5), np.float32), rng.standard_normal((3, 3, 5, 7), np.float32)
    want = cpu_conv.lax_conv(x, w, stride)
    got = jax.jit(cpu_conv.im2col_conv, static_argnums=2)(x, w, stride)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert want.shape == (2, 5 if stride == 2 else 9, 5 if stride == 2 else 9, 7)


def test_train_step_bench(capsys):
    train_step.main(["--preset", "cpu", "--steps", "1", "--num-prototypes", TINY_K] + TINY)
    out = capsys.readouterr().out
    [row] = table(out, [title for _, title, _ in common.COLUMNS])
    assert (row["model"], row["px"], row["dtype"], row["batch (pairs)"]) == ("resnet18", "32", "float32", "8")
    for title in ("setup s", "ms/step", "views/s", "TFLOP/s"):
        assert numbers(row[title])[0] > 0
    views_per_s = numbers(row["views/s"])[0]
    assert views_per_s == pytest.approx(4 * 8 / (numbers(row["ms/step"])[0] / 1e3), rel=0.01)
    assert row["% peak"] == "-"  # no peak is known for a CPU


def test_train_step_ratio_is_ours_over_the_originals_views_per_second():
    row = dict(model="resnet18", px=32, dtype="float32", batch=8, views_per_s=300.0, ynnpack_views_per_s=100.0)
    other = dict(row, batch=16)
    theirs = dict(row, views_per_s=200.0, ms_per_step=160.0, tflops=0.5)
    combined = train_step.combine([row, other], {"results": [theirs]})
    assert combined[0]["ratio"] == 1.5 and combined[0]["torch_ms_per_step"] == 160.0
    assert combined[0]["ynnpack_ratio"] == 0.5  # --ynnpack-convs: our step with YNNPACK convolutions
    assert "ratio" not in combined[1] and "ynnpack_ratio" not in combined[1]  # no PyTorch row of that size


def test_epoch_overhead_bench(capsys):
    epoch_overhead.main(["--n0", "64", "--k0", TINY_K, "--sizes", "64", "--ks", TINY_K] + TINY)
    out = capsys.readouterr().out
    [row] = table(out, [title for _, title, _ in epoch_overhead.COLUMNS])
    assert (row["N"], row["K"], row["steps"], row["steps timed by"]) == ("64", TINY_K, "8", "run_epoch")
    for _, title, _ in epoch_overhead.COLUMNS[3:-1]:
        assert numbers(row[title])[0] >= 0
    parts = sum(numbers(row[t])[0] for t in ("train steps s", "train.cluster s", "pair planning s"))
    assert numbers(row["epoch s"])[0] == pytest.approx(parts, abs=0.02)
    assert 0 < numbers(row["overhead %"])[0] < 100
    assert "reference epoch (N0=64, K0=16):" in out


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


def test_memory_bench(capsys):
    """XLA's memory analysis of the real train step, here with rematerialised blocks."""
    memory.main(["--model", "resnet18", "--px", "16", "--width", "0.0625", "--batches", "2,4", "--remat", "block",
                 "--device-gib", "1"])
    [row] = table(capsys.readouterr().out, [title for _, title, _ in memory.COLUMNS] + ["max pairs / 1 GiB device"])
    assert row["remat"] == "block" and numbers(row["MiB per pair"])[0] > 0
    assert numbers(row["max pairs / 1 GiB device"])[0] > 10


def test_epoch_overhead_growth_and_shares():
    """The cost-curve lines and the overhead share, on made-up timings (a second size costs a k-means compile)."""
    rows = [epoch_overhead.with_steps(dict(n=n, k=8, features_s=n / 1e3, kmeans_s=(n / 1e3) ** 2, plan_s=0.01,
                                           cluster_s=3.0), steps_s=7.0, timing="run_epoch") for n in (1000, 4000)]
    assert rows[0]["epoch_s"] == pytest.approx(10.01) and rows[0]["overhead_pct"] == pytest.approx(100 * 3.01 / 10.01)
    line = epoch_overhead.growth(rows, "n", "k", 8)
    assert line == ("growth with N (K=8, N 1,000 -> 4,000): feature pass ^1.00, PCA + k-means ^2.00, "
                    "planning ^0.00, train.cluster ^0.00")
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
    for title in ("setup s", "ms/step", "views/s", "TFLOP/s"):
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
