"""Every test sees 8 fake CPU devices, so the sharded code paths run for real, and a home directory of its
own, so that the caches a run keeps under ~/.cache/spcl_jax (compiled programs, image-folder listings) are
the suite's, shared by the tests and the launch.py processes they start.

Shared helpers (`from conftest import ROOT, TINY, launch`): the repository root, the tiny digits run's
overrides, launch.py as a subprocess; the `in_process_launch` fixture runs launch.py's flag parsing and
`main` in this process, up to where training would start; `gcs` is a real GCS API (the registry's
`gcp-storage-emulator`, in memory) and a fresh gs:// folder in it.
"""
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

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


def load_splits(config, pool=None):
    """`data.load_splits` of the `DataSpec` of `config` (a ConfigDict, as the tests build them)."""
    from spcl_jax import data, startup

    return data.load_splits(startup.data_spec(config), pool)


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

    import jax

    import launch as launch_py
    from spcl_jax import train

    started = []
    monkeypatch.setattr(train, "run_mode", lambda config, workdir: started.append((workdir, config)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    handler = absl_logging.get_absl_handler()
    filters, verbosity = list(handler.filters), absl_logging.get_verbosity()
    # launch.py points JAX's compilation cache at the config's compilation_cache_dir (the fuzz test's "inf" too):
    # put it back, or the tests after this one in the process would write their programs there
    cache_dir = jax.config.jax_compilation_cache_dir

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
    jax.config.update("jax_compilation_cache_dir", cache_dir)


BUCKET = "spcl-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """STORAGE_EMULATOR_HOST of a GCS emulator (tests/gcs_emulator.py: the registry's, with GCS's generation
    headers and preconditions) that lives as long as this test process (one per xdist worker). Its request log
    goes to DEVNULL: an unread pipe fills and stalls it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), "start", "--port", str(port),
                               "--in-memory", "--default-bucket", BUCKET, "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the GCS emulator did not start on port {port}")
            time.sleep(0.1)
    host = f"http://127.0.0.1:{port}"
    os.environ["STORAGE_EMULATOR_HOST"] = host  # for this process; subprocesses get it through `gcs.env`
    from spcl_jax import storage

    storage.use_emulator_if_set()
    yield host
    from spcl_jax import progress, workdir

    progress.stop_logging_to_file()  # train.log of an in-process run on gs://: stored now, not at exit
    workdir.release_claims()  # and the leases of in-process runs, while the emulator still answers
    server.kill()
    server.wait()


class GcsFolder(str):
    """A fresh gs:// folder (the str) with `env`: this environment with STORAGE_EMULATOR_HOST alone pointing at
    the emulator, for launch.py subprocesses (spcl_jax derives tensorstore's and gcsfs' variables from it)."""

    def __new__(cls, host, name):
        folder = super().__new__(cls, f"gs://{BUCKET}/{name[:60]}-{secrets.token_hex(3)}")
        derived = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
        folder.env = {k: v for k, v in os.environ.items() if k not in derived}
        folder.env["STORAGE_EMULATOR_HOST"] = host
        return folder


@pytest.fixture
def gcs(gcs_emulator, request):
    return GcsFolder(gcs_emulator, request.node.name.split("[")[0])
