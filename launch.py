"""Entry point: parses flags, validates the config, then hands over to the trainer or evaluator.

    python launch.py --config configs/digits.py [--workdir DIR] [--config.<key>=<value> ...]

Bad input (unknown key, wrong type, invalid value, missing data or checkpoint) ends the run with
one line on stderr naming the problem and exit status 2, before anything is written. SIGTERM or
Ctrl-C during pretraining saves a checkpoint after the current step and exits 143 or 130 (a second
Ctrl-C stops at once); the same command resumes. A workdir in use by another run is refused.
"""
import datetime
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/digits.py; override any option with "
    "--config.<key>=<value> (all options and their meaning: configs/default.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (config.json, metrics.jsonl, tensorboard/, checkpoints/). "
    "Default: runs/<config name>/<UTC timestamp>. Re-using a workdir resumes its newest checkpoint.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs on clusters without auto-detection: host:port "
    "of process 0 (TPU pods, SLURM and Open MPI need no flag).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "A peer silent for this long ends a multi-process run with an error.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_seconds", 300, "Multi-process runs: how long each process waits for all of them to "
    "connect to the coordinator before it gives up with an error.")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a job Ctrl-C ended


def _program():
    """launch.py, or the console script's name (spcl-train) when started through it."""
    return os.path.basename(sys.argv[0]) or "launch.py"


def _die(message):
    print(f"{_program()}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _parse_flags(argv):
    """absl parsing with one-line errors and exit 2 instead of absl's usage dump and exit 1."""
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if path is not None and not os.path.isfile(path):
            _die(f"config file {path!r} not found; valid: a file like configs/digits.py")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _die(" ".join(str(e).split()))
    except (KeyError, AttributeError) as e:
        text = str(e.args[0] if e.args else e).encode().decode("unicode_escape")
        key, *hint = [line.strip("'\" ") for line in text.splitlines() if line.strip("'\" ")]
        _die(f"unknown config key {key!r}{' (' + hint[0] + ')' if hint else ''}; valid keys are "
             "those of configs/default.py")
    except (TypeError, ValueError) as e:
        _die(f"bad --config override: {' '.join(str(e).split())}")


def _default_workdir(config_path):
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
    from spcl_jax import checkpoint, config_validation
    from spcl_jax.errors import UserError

    try:
        jax = _start_runtime(config)
        config_validation.validate(config, default.get_config(), jax.device_count())
        if jax.process_count() > 1 and not _WORKDIR.value:  # each process would stamp its own default
            _die("a multi-process run needs --workdir: one directory that every process sees")
        workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].config_filename)
        from spcl_jax import train

        train.run_mode(config, workdir)
    except UserError as e:
        _die(str(e))
    except checkpoint.Preempted as e:
        print(f"{_program()}: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        print(f"{_program()}: interrupted; the newest checkpoint (if any) resumes with the same command",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def run():
    """The `spcl-train` console script."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
