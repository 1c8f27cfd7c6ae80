"""Orbax checkpoints of everything a run needs to continue exactly, auto-resume and SIGTERM saves.

A checkpoint holds the network parameters and BatchNorm statistics, both optimiser states, the step
(which fixes the epoch and the position in the epoch's deterministic plan), the pseudo labels, and the
resolved config. Orbax writes each step to a temporary directory and renames it when complete, so a
crash during a save never damages the previous checkpoint; a save that fails (disk full, directory not
writable) or a step that cannot be read ends the run with one CheckpointError line saying which step is
intact.
"""
import contextlib
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from spcl_jax import sharding
from spcl_jax.errors import CheckpointError
from spcl_jax.models.param_groups import _key_name

# Keys that decide what the parameters mean: resuming with a different value is refused.
IDENTITY_KEYS = ("method", "model", "stem", "width_multiplier", "proj_dim", "dataset", "image_size",
                 "num_prototypes", "prototype_classifier_width", "batch_size", "n_classes", "pre_classes",
                 "train_sample", "val_sample", "seed", "optimiser", "lars_mode", "dtype")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """SIGTERM or a first Ctrl-C arrived; a checkpoint was saved and the run stopped cleanly."""

    def __init__(self, signum, step):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, run the "
                         "same command to resume")
        self.exit_status = 128 + signum  # what a shell reports for a process the signal ended


def _reason(error):
    """One line about an orbax/tensorstore error, whose text may span lines, hold a traceback or end in
    a long tensorstore spec; the middle of a long line goes (its end says what was wrong)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = (lines[-1] if any(line.startswith("Traceback") for line in lines) else lines[0]) if lines else ""
    line = line.split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {line if len(line) <= 320 else line[:100] + ' ... ' + line[-200:]}"


def checkpoint_dir(workdir):
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def resolved_config(config, method):
    """The config as saved with every checkpoint (JSON types), with the resolved method's name."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    values["method"] = method.name
    return values


def open_manager(directory, *, keep=2, read_only=False):
    """Writable managers delete the temporary directories of saves that a crash cut short."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory, options=options)


def _to_saved(state, pseudo, num_pretrain):
    labels = np.full(num_pretrain, -1, np.int64) if pseudo is None else np.asarray(pseudo, np.int64)
    return dict(state, pseudo_labels=labels)


def _finished_steps(directory):
    """Steps whose save completed (orbax renames a step's temporary directory to the bare number)."""
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


class Manager:
    """Saves at epoch ends, every `checkpoint_every_steps` and on SIGTERM or Ctrl-C; restores the newest on
    start. A second Ctrl-C stops at once (KeyboardInterrupt); `close` gives the signals back."""

    def __init__(self, workdir, config, method):
        self.config, self.method = config, method
        self.directory = checkpoint_dir(workdir)
        try:
            self._manager = open_manager(self.directory, keep=config.keep_checkpoints)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.directory}: {e.strerror or e}; "
                                  "pass a writable --workdir") from e
        self.stop_signal = None
        self._num_pretrain = None
        self._pending = None  # the step of a save that may still be running in the background
        self._previous_handlers = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}

    def _request_stop(self, signum, frame):
        if signum == signal.SIGINT and self.stop_signal is not None:
            raise KeyboardInterrupt
        logging.warning("%s: saving a checkpoint and stopping after this step%s", signal.Signals(signum).name,
                        " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")
        self.stop_signal = signum

    def stop_requested(self, agree=True):
        """Whether to save and stop now. The processes of a multi-process run must stop at the same step (a
        save is collective), so there they compare signals when `agree`, which all of them pass alike."""
        if jax.process_count() > 1:
            if not agree:
                return False
            from jax.experimental import multihost_utils

            signals = multihost_utils.process_allgather(np.int32(self.stop_signal or 0))
            self.stop_signal = int(np.max(signals)) or None
        return self.stop_signal is not None

    def restore_or(self, state, num_pretrain):
        """(state, pseudo labels) of the newest checkpoint in the workdir, or the given fresh state."""
        self._num_pretrain = num_pretrain
        step = self._manager.latest_step()
        if step is None:
            logging.info("no checkpoint in %s: starting at step 0", self.directory)
            return state, None
        try:
            saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # orbax raises many types for truncated or damaged files
            raise self._unreadable(step, e) from e
        current = resolved_config(self.config, self.method)
        differing = sorted(k for k in IDENTITY_KEYS if saved.get(k) != current[k])
        if differing and not self.config.overwrite_checkpoints:
            raise CheckpointError(
                f"{self.directory} holds a run with different {', '.join(differing)} "
                f"({', '.join(f'{k}: {saved.get(k)!r} -> {current[k]!r}' for k in differing)}); "
                "use a new --workdir, or --config.overwrite_checkpoints=True to start fresh here")
        if differing:
            logging.warning("overwrite_checkpoints: ignoring the checkpoints in %s", self.directory)
            return state, None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saved(state, None, num_pretrain))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:
            raise self._unreadable(step, e) from e
        pseudo = np.asarray(restored.pop("pseudo_labels"))
        logging.info("resuming from the checkpoint of step %d in %s", step, self.directory)
        return restored, (None if (pseudo < 0).any() else pseudo)

    def _unreadable(self, step, error):
        older = [s for s in _finished_steps(self.directory) if s < step]
        fallback = f"resume from step {older[-1]}" if older else "start afresh"
        return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read ({_reason(error)}); "
                               f"delete {os.path.join(self.directory, str(step))} to {fallback}, or pass a new --workdir")

    def save(self, state, pseudo, *, epoch_end):
        step = int(state["step"])
        if int(state["first_nonfinite_step"]) >= 0 or step in self._manager.all_steps():
            return
        self.wait()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saved(state, pseudo, self._num_pretrain)),
                config=ocp.args.JsonSave(resolved_config(self.config, self.method))), force=True)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._pending = step
        logging.info("checkpoint of step %d %s", step, "(epoch end)" if epoch_end else "")

    def wait(self):
        """Blocks until the background save is complete; its failure becomes a CheckpointError."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self._pending, e) from e
        self._pending = None

    def _save_failed(self, step, error):
        self._shutdown()
        intact = _finished_steps(self.directory)
        kept = f"the checkpoint of step {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
        return CheckpointError(f"saving the checkpoint of step {step} to {self.directory} failed ({_reason(error)}); "
                               f"{kept}: free disk space or pass a writable --workdir, then run the same command "
                               "to resume")

    def close(self):
        """Waits for the last save, then gives SIGTERM and SIGINT back to their previous handlers."""
        self.wait()
        self._shutdown()

    def _shutdown(self):
        with contextlib.suppress(Exception):  # after a failed save orbax may raise it again; it was reported
            self._manager.close()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)


def _open_step(directory, step):
    """A read-only manager of `directory` and its saved step `step` (-1 = newest). Orbax reads absolute
    paths only; messages name the directory as given."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; pass the "
                              "<workdir>/checkpoints of a pretraining run")
    manager = open_manager(os.path.abspath(directory), read_only=True)
    steps = manager.all_steps()
    if not steps:
        inner = os.path.join(directory, "checkpoints")
        raise CheckpointError(f"no checkpoint in {directory}; pass " + (
            inner if os.path.isdir(inner) else "the <workdir>/checkpoints of a pretraining run"))
    step = max(steps) if step < 0 else step
    if step not in steps:
        raise CheckpointError(f"step {step} is not saved in {directory}; saved steps: {sorted(steps)}")
    return manager, step


def restore_network(directory, step):
    """The saved pretraining state (nested dicts) of step `step` (-1 = newest) and that step."""
    manager, step = _open_step(directory, step)
    try:
        # Saved on other devices (another process or device count): replicate on this run's devices.
        fallback = sharding.replicated(sharding.data_mesh())
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(fallback_sharding=fallback)))["state"]
    except Exception as e:  # orbax raises many types for truncated or damaged files
        others = sorted(s for s in manager.all_steps() if s != step)
        raise CheckpointError(f"checkpoint step {step} in {directory} cannot be read ({_reason(e)})" + (
            f"; other saved steps: {others}" if others else "")) from e
    finally:
        manager.close()
    return restored, step


def restore_config(directory, step):
    """The resolved config (a dict, see `resolved_config`) saved with step `step` (-1 = newest), and that step."""
    manager, step = _open_step(directory, step)
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"], step
    except Exception as e:
        raise CheckpointError(f"checkpoint step {step} in {directory} has no readable config ({_reason(e)}); "
                              "pass the <workdir>/checkpoints of a spcl_jax pretraining run") from e
    finally:
        manager.close()


def fill(template, raw, *, what):
    """`template` (an nnx State or any pytree) with its leaves taken from `raw`, the nested dicts a
    target-less orbax restore returns (string keys, Variables as {'value': array})."""

    def lookup(path, leaf):
        node = raw
        for key in path:
            name = str(_key_name(key))
            if name == "value" and not (isinstance(node, dict) and "value" in node):
                continue
            if not isinstance(node, dict) or name not in node:
                raise CheckpointError(f"{what}: the checkpoint has no {'/'.join(str(_key_name(k)) for k in path)}; "
                                      "was it written for another model or method?")
            node = node[name]
        if np.shape(node) != np.shape(leaf):
            raise CheckpointError(f"{what}: {'/'.join(str(_key_name(k)) for k in path)} has shape "
                                  f"{np.shape(node)} in the checkpoint but {np.shape(leaf)} in this model; "
                                  "check model, width_multiplier and proj_dim")
        return np.asarray(node, dtype=np.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(lookup, template)
