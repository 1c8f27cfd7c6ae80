"""The planner through both routes to hardware that is not here, on a narrow ResNet-18: TPU slices through libtpu
(`pip install -e ".[plan-tpu]"`) and an H100 host through the CUDA plugin (`.[plan-gpu]`; CI puts it in
.ci/gpu-route, outside the environment, because the plugin prints start-up lines in every JAX process of a
machine without a GPU). Each route runs the same checks (`route_checks`): the plan compiles and fits, bytes per
device grow with the batch and shrink with more devices, FLOPs agree with an analytic count of the convolutions
and matrix products, a step that does not fit is reported so, and `remat=block` lowers the step's temporaries.

On TPUs XLA keeps a small program's activations in on-chip memory, so the remat check there needs activations
larger than it (full width, 64 images of 32 px per chip), which costs the longest compiles of this file.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_splits

pytestmark = pytest.mark.slow  # minutes of compiles for a TPU and a GPU

GPU_ROUTE = os.environ.get("SPCL_JAX_GPU_ROUTE", os.path.join(ROOT, ".ci", "gpu-route"))
# Per route: the plan's target, its step's image size, width and global batch (64 images of 32 px per device: on a
# TPU at full width, whose activations outgrow the chip's on-chip memory, as the remat check needs; below that,
# XLA keeps them there and remat=block only adds temporaries), and two targets of one chip with 4 and 8 devices
# for the feature pass.
ROUTES = {"tpu": {"target": "v5e-4", "px": 32, "width": 1.0, "batch": 256, "pass_targets": ("v5e-4", "v5e-8")},
          "gpu": {"target": "h100x4", "px": 32, "width": 0.25, "batch": 256, "pass_targets": ("h100x4", "h100x8")}}


def _config(px=16, width=1.0, batch=64, method="supervised", remat="none"):
    from configs import digits

    config = digits.get_config()
    config.method, config.image_size, config.width_multiplier, config.batch_size = method, px, width, batch
    config.dtype, config.remat, config.num_prototypes, config.pca_dim = "bfloat16", remat, 8, 8
    config.finetune_batch_size, config.knn_k = 64, 5
    return config


def resnet18_flops(px, width, batch, classes):
    """FLOPs of a supervised ResNet-18 training step (CIFAR stem) counted by hand: 2 x the multiply-adds of every
    convolution over the image's pixels (taps on the zero padding multiply nothing) and of the linear head,
    forward, then twice again backward (input and weight gradients; no input gradient for the stem), plus the
    forward crop-and-resize products of the augmentation (rows, then columns, of a px x px canvas)."""
    def conv(h, cin, cout, k, stride):
        pad = (k - 1) // 2
        out = (h + 2 * pad - k) // stride + 1
        taps = sum(1 for o in range(out) for t in range(k) if 0 <= o * stride - pad + t < h)  # per row of outputs
        return out, 2 * taps * taps * cin * cout

    scaled = lambda c: max(1, round(c * width))  # noqa: E731
    h, stem = conv(px, 3, scaled(64), 3, 1)
    forward, channels = stem, scaled(64)
    for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        planes = scaled(planes)
        for block in range(2):
            s = stride if block == 0 else 1
            h_in = h
            h, first = conv(h_in, channels, planes, 3, s)
            forward += first + conv(h, planes, planes, 3, 1)[1]
            if s != 1 or channels != planes:
                forward += conv(h_in, channels, planes, 1, s)[1]
            channels = planes
    forward += 2 * channels * classes
    crop = 2 * px * px * px * 3 * 2
    return batch * (3 * forward - stem + crop)


def route_checks(platform):
    """The numbers the tests assert, for one route (run in this process for TPUs, in a child for the GPU)."""
    import dataclasses

    from spcl_jax.plan import targets

    targets.prepare_environment()
    import jax

    from spcl_jax import runtime, sharding, startup
    from spcl_jax.data.sizes import Sizes
    from spcl_jax.method import METHODS
    from spcl_jax.plan import analysis, planner, programs, report

    runtime.configure()
    jax.config.update("jax_enable_compilation_cache", False)  # executables for absent devices cannot be loaded back
    route = ROUTES[platform]
    out = {}

    def sizes_of(config):
        return Sizes.of(load_splits(config), nominal=False)

    config = _config(px=route["px"], width=route["width"], batch=route["batch"])
    target = targets.parse(route["target"])
    sizes = sizes_of(config)
    parts = startup.parts(config, METHODS["supervised"], sizes.splits(config.dataset))
    plan = planner.plan(parts, sizes, target, quick=True, jobs=1)
    out["plan"] = report.summary(plan)
    step = plan.programs["train_step"]
    tight = dataclasses.replace(plan, usable_memory=step.bytes_per_device - 1)  # one byte short for the step
    out["tight"] = report.summary(tight)
    out["tight_markdown"] = report.markdown(out["tight"])
    out["analytic_flops_per_device"] = resnet18_flops(route["px"], route["width"], route["batch"], 10) / target.chips
    block = planner.run_task(planner.Task(parts, sizes, target, ("train_step",), remat="block"))[0]
    steps = {"none": step, "block": block}
    out["remat"] = {remat: (m.temporaries, m.flops) for remat, m in steps.items()}

    spcl = _config(width=0.0625, method="spcl")

    def feature_pass_bytes(target_name, batch, slices=1):
        spcl.batch_size = batch
        mesh = sharding.data_mesh(targets.devices(targets.parse(target_name, slices=slices)))
        sizes = sizes_of(spcl)
        parts = startup.parts(spcl, METHODS["spcl"], sizes.splits(spcl.dataset))
        program = programs.build(parts, sizes, mesh, ("feature_pass",))["feature_pass"]
        return analysis.measure(program).program_bytes

    four, eight = route["pass_targets"]
    out["feature_pass"] = {"small": feature_pass_bytes(four, 64), "large": feature_pass_bytes(four, 256),
                           "more_devices": feature_pass_bytes(eight, 256)}
    if platform == "tpu":  # two slices of 4 chips (multislice): the mesh spans both
        out["feature_pass"]["two_slices"] = feature_pass_bytes(four, 256, slices=2)

    return out


@pytest.fixture(scope="module", params=["tpu", "gpu"])
def checks(request):
    platform = request.param
    if platform == "tpu":
        pytest.importorskip("libtpu", reason="the TPU route: pip install -e '.[plan-tpu]' (CI installs it)")
        return platform, route_checks("tpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([GPU_ROUTE, ROOT, os.environ.get("PYTHONPATH", "")]),
               JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    probe = subprocess.run([sys.executable, "-c", "import jax_plugins.xla_cuda12"], env=env, capture_output=True)
    if probe.returncode:
        pytest.skip(f"the GPU route: pip install --target {GPU_ROUTE} jax-cuda12-plugin jax-cuda12-pjrt (CI does)")
    done = subprocess.run([sys.executable, __file__, "gpu"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return platform, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_plan_compiles_every_program_and_fits(checks):
    platform, out = checks
    plan = out["plan"]
    assert plan["platform"] == ("tpu" if platform == "tpu" else "cuda")
    assert set(plan["programs"]) == {"train_step", "linear_eval_step", "knn"}  # supervised: no clustering
    assert plan["fits"] and plan["max_global_batch"] is None  # --quick: no search
    for name, p in plan["programs"].items():
        assert p["bytes_per_device"] > 0 and p["fits"] and p["flops_per_device"] > 0, name
    assert plan["least_step_seconds"] > 0 and plan["least_run_seconds"] > plan["least_epoch_seconds"] > 0
    assert plan["programs"]["train_step"]["collectives"]["all-reduce"]["bytes"] > 0  # the gradients' all-reduce
    assert plan["device_kind"] == ("TPU v5 lite" if platform == "tpu" else "NVIDIA H100 80GB HBM3")


def test_bytes_per_device_grow_with_the_batch_and_shrink_with_more_devices(checks):
    _, out = checks
    passes = out["feature_pass"]
    assert passes["large"] > passes["small"] and passes["more_devices"] < passes["large"]
    assert passes.get("two_slices", 0) < passes["large"]


def test_step_flops_agree_with_an_analytic_count(checks):
    platform, out = checks
    step = out["plan"]["programs"]["train_step"]
    assert step["cost_source"] == ("xla" if platform == "tpu" else "counted")
    assert step["flops_per_device"] == pytest.approx(out["analytic_flops_per_device"], rel=0.10)


def test_a_step_that_does_not_fit_is_reported_so(checks):
    _, out = checks
    tight = out["tight"]
    assert not tight["fits"] and not tight["programs"]["train_step"]["fits"]
    assert tight["programs"]["train_step"]["headroom_bytes"] == -1
    assert tight["programs"]["linear_eval_step"]["fits"]
    assert "**Fits: no.**" in out["tight_markdown"] and "| train_step |" in out["tight_markdown"]


def test_remat_lowers_the_step_temporaries(checks):
    _, out = checks
    (none, none_flops), (block, block_flops) = out["remat"]["none"], out["remat"]["block"]
    assert block < 0.8 * none, out["remat"]  # less memory ...
    assert block_flops > none_flops  # ... for recomputed blocks


def test_the_cli_prints_the_plan_and_one_json_line(tmp_path):
    """`python -m spcl_jax.plan ... --json` for a TPU v4 slice: the markdown plan, then the JSON object on the last
    line; a target that does not exist is one line and exit 2."""
    pytest.importorskip("libtpu", reason="the TPU route: pip install -e '.[plan-tpu]' (CI installs it)")
    command = [sys.executable, "-m", "spcl_jax.plan", "--config", "configs/digits.py", "--target", "v4-8",
               "--quick", "--json", "--jobs=1", "--config.method=supervised", "--config.width_multiplier=0.0625",
               "--config.finetune_batch_size=64", "--memory_fraction=0.0002"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"target", "devices", "device_kind", "device_memory_bytes", "programs", "max_global_batch",
            "least_step_seconds", "least_epoch_seconds", "least_run_seconds"} <= set(plan)
    assert (plan["target"], plan["devices"], plan["device_kind"]) == ("v4-8", 4, "TPU v4")
    for p in plan["programs"].values():
        assert {"bytes_per_device", "fits", "flops_per_device"} <= set(p)
    assert not plan["programs"]["train_step"]["fits"]  # 6.9 MB usable
    assert "| train_step |" in done.stdout and "**no**" in done.stdout
    bad = subprocess.run(command[:6] + ["v5e-3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "python -m spcl_jax.plan: error: target 'v5e-3': valid: TPU slices")


if __name__ == "__main__":  # the GPU route's checks, in a process that sees the CUDA plugin
    print(json.dumps(route_checks(sys.argv[1])))
