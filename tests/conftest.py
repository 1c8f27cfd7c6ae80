"""Every test sees 8 fake CPU devices, so the sharded code paths run for real, and a home directory of its
own, so that the caches a run keeps under ~/.cache/spcl_jax (compiled programs, image-folder listings) are
the suite's, shared by the tests and the launch.py processes they start.

Shared helpers (`from conftest import ROOT, TINY, launch`): the repository root, the tiny digits run's
overrides, launch.py as a subprocess; the `in_process_launch` fixture runs launch.py's flag parsing and
`main` in this process, up to where training would start.
"""
import os
import subprocess
import sys
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HOME"] = os.path.join(tempfile.gettempdir(), "spcl_jax_test_home")
# In-process tests compile the same small programs as the launch.py runs: the same cache as configs/default.py's.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["HOME"], ".cache", "spcl_jax", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from spcl_jax import runtime  # noqa: E402  (after the environment it reads)

runtime.configure()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.image_size=16", "--config.width_multiplier=0.0625", "--config.batch_size=16",
        "--config.num_prototypes=8", "--config.pca_dim=8", "--config.max_steps_per_epoch=2",
        "--config.n_epochs=2", "--config.warmup_epochs=1", "--config.finetune_epochs=1",
        "--config.finetune_batch_size=64", "--config.knn_k=5", "--config.log_every_steps=1"]


def launch_cli(*args, cwd=ROOT, env=None, timeout=600):
    """launch.py with exactly these arguments, as a subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def launch(workdir, *overrides, env=None, timeout=600):
    """The tiny digits run in `workdir` through launch.py, with more overrides."""
    return launch_cli("--config", "configs/digits.py", f"--workdir={workdir}", *TINY, *overrides,
                      env=env, timeout=timeout)


@pytest.fixture
def in_process_launch(monkeypatch, tmp_path):
    """run(overrides) -> exit status: launch.py's own flag parsing and `main` on configs/digits.py in this
    process, stopping where training would start (0; the config it would train with is `run.accepted`)."""
    from absl import flags
    from absl import logging as absl_logging

    import launch as launch_py
    from spcl_jax import train

    started = []
    monkeypatch.setattr(train, "run_mode", lambda config, workdir: started.append((workdir, config)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    handler = absl_logging.get_absl_handler()
    filters, verbosity = list(handler.filters), absl_logging.get_verbosity()

    def forget_flags():
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()

    def run(overrides):
        argv = ["launch.py", "--config", "configs/digits.py", f"--workdir={tmp_path / 'run'}", *overrides]
        monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
        forget_flags()
        started.clear()
        try:
            launch_py.main(launch_py._parse_flags(argv))
        except SystemExit as e:
            return e.code
        assert [workdir for workdir, _ in started] == [str(tmp_path / "run")]
        run.accepted = started[0][1]
        return 0

    yield run
    forget_flags()
    handler.filters[:] = filters
    absl_logging.set_verbosity(verbosity)
