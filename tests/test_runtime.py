"""spcl_jax.runtime: the process-wide set-up is explicit (importing the library changes nothing and does not
start JAX until load_encoder is used), the CPU convolution choice yields to XLA_FLAGS, and library log
records are filtered as the run log needs."""
import errno
import logging as std_logging
import os
import subprocess
import sys

import jax
import orbax.checkpoint as ocp

from conftest import ROOT
from spcl_jax import runtime


def test_importing_the_library_sets_nothing_up():
    code = ("import sys, spcl_jax; assert 'jax' not in sys.modules; assert callable(spcl_jax.load_encoder); "
            "import os, spcl_jax.checkpoint, spcl_jax.train, orbax.checkpoint as ocp, jax; "
            "print(os.environ.get('XLA_FLAGS', ''), "
            "ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel)")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["--xla_force_host_platform_device_count=2", "True"]


def test_configure_writes_replicated_arrays_whole():
    runtime.configure()
    assert not ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel


def test_an_xla_flags_choice_of_ynnpack_fusions_wins(monkeypatch):
    chosen = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
    monkeypatch.setenv("XLA_FLAGS", chosen)
    runtime.configure()
    assert os.environ["XLA_FLAGS"] == chosen
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    runtime.configure()
    runtime.configure()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                       "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")


def test_library_errors_show_as_one_line_unless_verbose():
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        exc_info = sys.exc_info()
    orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"

    def record(level, pathname):
        return std_logging.LogRecord("absl", level, pathname, 1, "save failed", (), exc_info)

    error = record(std_logging.ERROR, orbax_file)
    assert runtime.LibraryInfoFilter().filter(error) and error.exc_info is None
    verbose = record(std_logging.ERROR, orbax_file)
    assert runtime.LibraryInfoFilter(keep_tracebacks=True).filter(verbose) and verbose.exc_info is exc_info
    assert not runtime.LibraryInfoFilter().filter(record(std_logging.INFO, orbax_file))
    ours = record(std_logging.ERROR, os.path.join(ROOT, "spcl_jax", "train.py"))
    assert runtime.LibraryInfoFilter().filter(ours) and ours.exc_info is exc_info
