"""Entry point: parses flags, validates the config, then hands over to the trainer or evaluator.

    python launch.py --config configs/digits.py [--workdir DIR] [--config.<key>=<value> ...]

Bad input (unknown key, wrong type, invalid value, missing data or checkpoint) ends the run with
one line on stderr naming the problem and exit status 2, before anything is written. SIGTERM or
Ctrl-C during pretraining saves a checkpoint after the current step and exits 143 or 130 (a second
Ctrl-C stops at once); the same command resumes. A workdir in use by another run is refused.

Where things are documented: every config option, each with a comment, in configs/default.py; running,
the outputs (train.log, metrics.jsonl, results) and these flags in README.md. --print_config and
--dry_run show what a run would use, without training or writing anything.
"""
import datetime
import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from spcl_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/digits.py; override any option with "
    "--config.<key>=<value> (all options and their meaning: configs/default.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory or gs://bucket/path (config.json, metrics.jsonl, tensorboard/, checkpoints/). "
    "Default: runs/<config name>/<UTC timestamp>. Re-using a workdir resumes its newest checkpoint.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs on clusters without auto-detection: host:port "
    "of process 0 (TPU pods, SLURM and Open MPI need no flag).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "A peer silent for this long ends a multi-process run with an error.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (after the overrides and validation, `method` resolved) as "
    "JSON and exit, writing nothing.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, load the data, build the model and the mesh, print a summary (examples, "
    "classes, parameters, devices, steps) and exit without training or writing anything.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_seconds", 300, "Multi-process runs: how long each process waits for all of them to "
    "connect to the coordinator before it gives up with an error.")

EXIT_USAGE = cli.EXIT_USAGE
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a job Ctrl-C ended


_program = cli.program
_die = cli.die


def _preview(config, workdir):
    """--print_config and --dry_run: show, write nothing, exit 0."""
    if not (_PRINT_CONFIG.value or _DRY_RUN.value):
        return
    from spcl_jax import preflight

    if _PRINT_CONFIG.value:
        preflight.print_config(config)
    if _DRY_RUN.value:
        preflight.dry_run(config, workdir)
    sys.exit(0)


def _parse_flags(argv):
    return cli.parse_flags(argv, __doc__)


def _resume_command(workdir):
    """The command line as typed, with the workdir made explicit: what resumes this run."""
    args = sys.argv[1:]
    program = ["python", sys.argv[0]] if sys.argv[0].endswith(".py") else [_program()]
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in args):
        args = [*args, f"--workdir={workdir}"]
    return shlex.join(program + args)


def _default_workdir(config, config_path):
    """Pretraining: runs/<config name>/<UTC timestamp>; evaluating a checkpoint: next to the run it evaluates."""
    from spcl_jax import config_validation, evaluate

    if not config_validation.pretrains(config):
        return evaluate.default_workdir(config)
    name = os.path.splitext(os.path.basename(config_path))[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join("runs", name, stamp)


def _start_runtime(config):
    """Initialises JAX (and its distributed runtime for multi-process runs); returns the jax module."""
    from spcl_jax import runtime

    if config.gpu_id:
        os.environ["CUDA_VISIBLE_DEVICES"] = config.gpu_id
    runtime.configure(config.compilation_cache_dir, verbose=config.verbose)
    import jax

    timeouts = dict(initialization_timeout_seconds=_INIT_TIMEOUT.value,
                    heartbeat_timeout_seconds=_HEARTBEAT.value, program=_program())
    if _COORDINATOR.value and not config.no_distributed:
        runtime.connect(**timeouts, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                        process_id=_PROCESS_ID.value)
    elif runtime.auto_cluster() and not config.no_distributed:
        runtime.connect(**timeouts)
    return jax


def _check_distributed_flags():
    if _HEARTBEAT.value < 1 or _INIT_TIMEOUT.value < 1:
        _die(f"--heartbeat_timeout_seconds={_HEARTBEAT.value} --initialization_timeout_seconds="
             f"{_INIT_TIMEOUT.value}; valid: positive numbers of seconds")
    if not _COORDINATOR.value:
        if _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
            _die("--num_processes and --process_id need --coordinator_address=<host of process 0>:<port>")
        return
    host, _, port = _COORDINATOR.value.rpartition(":")
    if not host or not port.isdigit():
        _die(f"--coordinator_address={_COORDINATOR.value!r}; valid: host:port of process 0, e.g. 10.0.0.1:1234")
    count, index = _NUM_PROCESSES.value, _PROCESS_ID.value
    if count is None or index is None or count < 1 or not 0 <= index < count:
        _die(f"--num_processes={count} --process_id={index}; valid: with --coordinator_address, both, "
             "with 0 <= process_id < num_processes")


def main(argv):
    if len(argv) > 1:
        _die(f"unexpected arguments {argv[1:]}; options are given as --config.<key>=<value>")
    try:
        config = _CONFIG.value
    except OSError as e:
        _die(" ".join(str(e).split()))
    if config is None:
        _die("--config is required, e.g. --config configs/digits.py")
    _check_distributed_flags()
    from configs import default
    from spcl_jax import checkpoint, config_validation, storage
    from spcl_jax.errors import SAME_COMMAND, UserError

    workdir = None
    with_command = lambda message: message.replace(SAME_COMMAND, _resume_command(workdir)) if workdir else message  # noqa: E731
    try:
        jax = _start_runtime(config)
        config_validation.validate(config, default.get_config(), jax.device_count())
        # each process would stamp its own default workdir
        if jax.process_count() > 1 and not _WORKDIR.value and config_validation.pretrains(config):
            _die("a multi-process run needs --workdir: one directory that every process sees")
        workdir = _WORKDIR.value or _default_workdir(config, flags.FLAGS["config"].config_filename)
        if storage.unsupported_scheme(workdir):
            _die(f"--workdir={workdir}: {storage.unsupported_scheme(workdir)}:// is not supported; valid: a local "
                 "directory or gs://bucket/path")
        _preview(config, workdir)
        from spcl_jax import train

        train.run_mode(config, workdir)
    except UserError as e:
        _die(with_command(str(e)))
    except checkpoint.Preempted as e:
        print(f"{_program()}: {with_command(str(e))}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        print(f"{_program()}: interrupted; to resume from the newest checkpoint (if any), run "
              f"{with_command(SAME_COMMAND)}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def run():
    """The `spcl-train` console script."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
