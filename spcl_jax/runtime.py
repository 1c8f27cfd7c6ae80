"""Process-wide set-up, done explicitly (never at import): launch.py, the tools, the benchmarks and the tests call
`configure()` before their first JAX computation; multi-process runs then `connect()`.

`configure` chooses XLA:CPU's convolution library, has orbax write replicated arrays whole, keeps orbax's and
JAX's INFO chatter out of the run log and turns on the persistent compilation cache. `connect` starts JAX's
distributed runtime with a bounded wait and one-line error.
"""
import logging as std_logging
import os
import sys
import threading
from typing import Any, NoReturn

from absl import logging

EXIT_USAGE = 2
_YNN_TYPES = "--xla_cpu_experimental_ynn_fusion_type"


def configure(compilation_cache_dir: str = "", verbose: bool = False) -> None:
    """Idempotent; the XLA flag only takes effect when called before JAX starts its CPU backend."""
    _choose_cpu_convolutions()
    _save_replicated_arrays_whole()
    handler = logging.get_absl_handler()
    if not any(isinstance(f, LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(LibraryInfoFilter(keep_tracebacks=verbose))
    if verbose:
        logging.set_verbosity(logging.DEBUG)
    if compilation_cache_dir:  # a restart or resume loads its programs instead of compiling them again
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(compilation_cache_dir))
        # Every program, not only those compiling for over a second (JAX's default): a run has ~80 small ones
        # (k-means, PCA, evaluation, metrics), several seconds of compiling on each start on a CPU.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _choose_cpu_convolutions():
    """XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK, which made a full-width ResNet-18 step 1.6x slower
    than XLA's own convolutions on an AVX-512 CPU (about 2x in older, unreproduced runs on AVX2; BENCHMARKS.md,
    "The CPU convolution gap"); convolutions leave its list unless XLA_FLAGS already chooses. Accelerators
    ignore the flag. XLA stops the process on a flag it does not know, and this one is experimental, hence the
    version check."""
    from jaxlib import version

    flags = os.environ.get("XLA_FLAGS", "")
    if version.__version__.startswith("0.10.") and _YNN_TYPES not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_YNN_TYPES}=-individual_convolution".strip()


def _save_replicated_arrays_whole():
    """Orbax's replica-parallel saving (its default except on GPU) compiles a slicing program per array, slice
    and device at a process's first save (BENCHMARKS.md, "Checkpoints"). Our state is replicated and small, so
    the first replica writes each array whole, as orbax does on GPUs."""
    import jax
    import orbax.checkpoint as ocp

    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)  # orbax warns that this replaces its jax.Array handler: the point
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl_logger.setLevel(level)


class LibraryInfoFilter(std_logging.Filter):
    """Keeps orbax's and jax's per-save/compile INFO chatter out of the run log; their warnings and errors
    show as one line each, without the traceback (a failed background save logs several), unless verbose."""

    def __init__(self, keep_tracebacks: bool = False):
        super().__init__()
        self.keep_tracebacks = keep_tracebacks

    # orbax warnings that mean nothing to a user: a read-only manager (evaluation, export) announcing itself
    MEANINGLESS = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: std_logging.LogRecord) -> bool:
        quiet = any(part in record.pathname for part in ("/orbax/", "/jax/_src/"))
        if quiet and not self.keep_tracebacks:
            record.exc_info, record.exc_text = None, None
        if quiet and any(str(record.msg).startswith(text) for text in self.MEANINGLESS):
            return False
        return record.levelno >= std_logging.WARNING or not quiet


def auto_cluster() -> bool:
    """True under launchers JAX detects by itself (SLURM with several tasks, Open MPI, TPU pods)."""
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or "OMPI_COMM_WORLD_SIZE" in env
            or "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"])


def connect(initialization_timeout_seconds: int, heartbeat_timeout_seconds: int, program: str = "spcl_jax",
            **explicit: Any) -> None:
    """jax.distributed.initialize, bounded: when not every process has connected within
    `initialization_timeout_seconds` this prints one line and exits 2 (JAX itself would abort with a C++ stack
    trace blaming a dead task). A peer lost later is JAX's: it aborts the survivors (SIGABRT) after
    `heartbeat_timeout_seconds`. `explicit`: coordinator_address, num_processes, process_id, where the
    cluster is not detected by itself."""
    import jax

    timeout = initialization_timeout_seconds
    where = explicit.get("coordinator_address", "the address the cluster gave")

    def give_up() -> NoReturn:
        print(f"{program}: error: not every process connected to the coordinator at {where} within {timeout} s; "
              "start all processes with the same --coordinator_address (process 0's host) and --num_processes, "
              "or raise --initialization_timeout_seconds", file=sys.stderr, flush=True)
        os._exit(EXIT_USAGE)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**explicit, initialization_timeout=timeout + 30,
                                   heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        from spcl_jax import sharding

        sharding.connect_processes()
    finally:
        watchdog.cancel()
