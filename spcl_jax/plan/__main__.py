"""Plan a run for a TPU slice or GPU hosts from a CPU machine: compile every program of the run for the target, check
that each fits a device's memory, and bound the time of a step, an epoch and the run.

    python -m spcl_jax.plan --config configs/imagenet.py --target v5e-64 [--quick] [--json]
    spcl-plan --config configs/imagenet.py --target h100x8 --hosts 2 --config.batch_size=1024

Targets: TPU slices by their Cloud names (v5e-1 ... v5e-256, v6e-1 ... v6e-256, v4-8 ..., v5p-8 ...;
--slices N for multislice) and GPU hosts (h100x8, h200x8, a100-80x8; x1/x2/x4 too; --hosts N). The TPU route
needs `pip install -e ".[plan-tpu]"` (libtpu), the GPU route `pip install -e ".[plan-gpu]"` (the CUDA plugin).
Nothing runs on an accelerator and none needs to be attached. --quick plans the config's batch only; without it
the largest global batch that fits is searched by compiles, with and without --config.remat=block. The data
sets the sizes when it is on this machine (else the dataset's nominal sizes, or --num_examples). --json ends the
output with one JSON object on one line. Times are lower bounds from the chips' peak rates, not measurements.
"""
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from spcl_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/imagenet.py; override any option with "
    "--config.<key>=<value> (all options and their meaning: configs/default.py).")
_TARGET = flags.DEFINE_string("target", None, "The hardware: v5e-64, v4-32, v5p-128, v6e-256, h100x8, h200x8, "
                              "a100-80x8, ...")
_HOSTS = flags.DEFINE_integer("hosts", 1, "GPU targets: how many such hosts.")
_SLICES = flags.DEFINE_integer("slices", 1, "TPU targets: how many such slices (multislice).")
_QUICK = flags.DEFINE_bool("quick", False, "Plan the config's batch only, without the largest-batch search.")
_JSON = flags.DEFINE_bool("json", False, "End the output with the plan as one JSON object on one line.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Training images of the dataset when its data is not on this machine (default: the "
    "dataset's nominal size; an image folder needs it).")
_JOBS = flags.DEFINE_integer("jobs", 2, "Compiles at a time, each in its own process (1: all in this process).")
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", None, "Share of a device's memory a run may use (default: all of a TPU's; 0.75 of a GPU's, "
    "JAX's default preallocation, XLA_PYTHON_CLIENT_MEM_FRACTION).")

NAME = "spcl-plan" if os.path.basename(sys.argv[0]) == "spcl-plan" else "python -m spcl_jax.plan"
ROUTES = {"tpu": ("libtpu", "plan-tpu"), "cuda": ("jax_plugins.xla_cuda12", "plan-gpu")}


def _die(message):
    cli.die(message, NAME)


def _target():
    from spcl_jax.plan import targets

    if not _TARGET.value:
        _die(f"--target is required; valid: {', '.join(targets.names()[:4])}, ... (see --help)")
    try:
        target = targets.parse(_TARGET.value, _HOSTS.value, _SLICES.value)
    except ValueError as e:
        _die(str(e))
    module, extra = ROUTES[target.platform]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        _die(f"planning for {target.chip.device_kind} needs {module.split('.')[-1]}: pip install -e \".[{extra}]\"")
    if _MEMORY_FRACTION.value is not None and not 0 < _MEMORY_FRACTION.value <= 1:
        _die(f"--memory_fraction={_MEMORY_FRACTION.value}; valid: a fraction in (0, 1]")
    if _NUM_EXAMPLES.value is not None and _NUM_EXAMPLES.value < 1:
        _die(f"--num_examples={_NUM_EXAMPLES.value}; valid: a positive number of images")
    if _JOBS.value < 1:
        _die(f"--jobs={_JOBS.value}; valid: a positive number of processes")
    return target


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        _die(f"unexpected arguments {argv[1:]}; options are given as --config.<key>=<value>")
    config = _CONFIG.value
    if config is None:
        _die("--config is required, e.g. --config configs/imagenet.py")
    target = _target()
    from spcl_jax.plan import targets

    targets.prepare_environment()
    from configs import default
    from spcl_jax import config_validation, runtime, startup
    from spcl_jax.errors import UserError
    from spcl_jax.plan import planner, report

    runtime.configure()
    try:
        config_validation.validate(config, default.get_config(), target.chips)
        config, method, sizes = startup.prepare_plan(config, target.chips, _NUM_EXAMPLES.value)
        parts = startup.parts(config, method, sizes.splits(config.dataset))
        plan = planner.plan(parts, sizes, target, quick=_QUICK.value, jobs=_JOBS.value,
                            memory_fraction=_MEMORY_FRACTION.value)
    except UserError as e:
        _die(str(e))
    summary = report.summary(plan)
    print(report.markdown(summary), flush=True)
    if _JSON.value:
        print(json.dumps(summary, sort_keys=True))


def run() -> None:
    """The `spcl-plan` console script."""
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, __doc__, NAME))


if __name__ == "__main__":
    run()
