"""Orbax checkpoints of everything a run needs to continue exactly, auto-resume and SIGTERM saves.

A checkpoint holds the network parameters and BatchNorm statistics, both optimiser states, the step
(which fixes the epoch and the position in the epoch's deterministic plan), the pseudo labels, and the
resolved config. Orbax writes each step to a temporary directory and renames it when complete, so a
crash during a save never damages the previous checkpoint; a save that fails (disk full, directory not
writable) or a step that cannot be read ends the run with one CheckpointError line saying which step is
intact.

Over 400 lines on purpose: saving, resuming (with the checks that refuse another run's checkpoint), setting steps
aside, diagnosing unreadable ones and the read-only restores of evaluation and export all read or write one orbax
layout, which is defined here once.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from spcl_jax import sharding, storage, workdir as workdirs
from spcl_jax.errors import SAME_COMMAND, CheckpointError, WorkdirError
from spcl_jax.models.param_groups import key_name

if TYPE_CHECKING:  # for the hints only: importing them here would make a circle
    from types import FrameType

    from ml_collections import ConfigDict

    from spcl_jax.data.datasets import Splits
    from spcl_jax.method import Method
    from spcl_jax.train_state import TrainState

# Keys that decide what the parameters mean: resuming with a different value is refused.
IDENTITY_KEYS = ("method", "model", "stem", "width_multiplier", "proj_dim", "dataset", "image_size",
                 "num_prototypes", "prototype_classifier_width", "batch_size", "n_classes", "pre_classes",
                 "train_sample", "val_sample", "seed", "optimiser", "lars_mode", "dtype")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """SIGTERM or a first Ctrl-C arrived; a checkpoint was saved and the run stopped cleanly (`evaluating`: after
    pretraining was complete, before or during its evaluation)."""

    def __init__(self, signum: int, step: int, *, evaluating: bool = False):
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at the evaluation after pretraining; pretraining is complete (checkpoint of step "
            f"{step}): to run the evaluation, run {SAME_COMMAND}" if evaluating else
            f"stopped by {name} at step {step}; checkpoint saved; to resume, run {SAME_COMMAND}")
        self.exit_status = 128 + signum  # what a shell reports for a process the signal ended


@contextlib.contextmanager
def stop_at_once_on_sigterm(step: int) -> Iterator[None]:
    """During the evaluation after pretraining, SIGTERM stops at once with a `Preempted` saying so."""
    def stop(signum: int, frame: FrameType | None) -> NoReturn:
        raise Preempted(signum, step, evaluating=True)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reason(error):
    """One line about an orbax/tensorstore error, whose text may span lines, hold a traceback or end in
    a long tensorstore spec; the middle of a long line goes (its end says what was wrong)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = (lines[-1] if any(line.startswith("Traceback") for line in lines) else lines[0]) if lines else ""
    line = line.split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {line if len(line) <= 320 else line[:100] + ' ... ' + line[-200:]}"


def checkpoint_dir(workdir: str) -> str:
    return storage.absolute(storage.join(workdir, "checkpoints"))


def resolved_config(config: ConfigDict, method: Method, facts: dict | None = None) -> dict:
    """The config as saved with every checkpoint (JSON types), with the resolved method's name and, when
    given, the facts of the run that a resume must find unchanged (`run_facts`)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    values["method"] = method.name
    if facts is not None:
        values["run_facts"] = facts
    return values


def write_config_json(workdir: str, config: ConfigDict, method: Method, facts: dict | None = None) -> None:
    """`<workdir>/config.json`: the resolved config (and run facts) of what the workdir holds, written whole."""
    text = json.dumps(resolved_config(config, method, facts), indent=2, sort_keys=True)
    path = storage.join(workdir, "config.json")
    try:
        storage.write_atomic(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise WorkdirError(f"writing {path} failed ({e.strerror or e}); free disk space or pass another --workdir"
                           ) from e


def _digest(values):
    return hashlib.sha256("\n".join(map(str, values)).encode()).hexdigest()[:16]


def data_fingerprint(splits: Splits) -> dict:
    """What identifies the pretraining data: a resume over other data would index other images (or fail)."""
    pretrain = splits.pretrain
    fingerprint = {"pretrain_examples": len(pretrain), "classes": splits.num_classes,
                   "labels": _digest(pretrain.labels.tolist()), "pool_positions": _digest(pretrain.index.tolist())}
    paths = getattr(pretrain, "paths", None)
    if paths is not None:  # image files: their names under the dataset root (a moved copy still matches)
        fingerprint["files"] = _digest("/".join(paths[int(i)].split(os.sep)[-2:]) for i in pretrain.index)
    return fingerprint


def run_facts(steps_per_epoch: int, splits: Splits) -> dict:
    """Facts saved with every checkpoint that must hold on resume (see `Manager.restore_or`)."""
    return {"steps_per_epoch": int(steps_per_epoch), "data": data_fingerprint(splits)}


def open_manager(directory: str, *, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """Writable managers delete the temporary directories of saves that a crash cut short."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory, options=options)


def _parts(state):
    """{name: part} of a train state: a `train_state.TrainState`, or a dict of such parts."""
    return dict(state) if isinstance(state, dict) else state.parts()


def _to_saved(state, pseudo, num_pretrain):
    """What a checkpoint stores: the state's parts by name and the pseudo labels (-1 before any clustering)."""
    labels = np.full(num_pretrain, -1, np.int64) if pseudo is None else np.asarray(pseudo, np.int64)
    return dict(_parts(state), pseudo_labels=labels)


def _permission_denied(step_dir, error):
    """The first path of a step that this user cannot read (or the error's own permission text), else ''."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for e in chain:
        if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
            return str(getattr(e, "filename", None) or e)
    for root, folders, files in ([] if storage.is_url(step_dir) else os.walk(step_dir, onerror=chain.append)):
        for name in folders + files:
            path = os.path.join(root, name)
            if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
                return path
    if any(isinstance(e, PermissionError) for e in chain) or "permission denied" in str(error).lower():
        return _reason(error)
    return ""


DAMAGE_SIGNS = ("OUT_OF_RANGE", "DATA_LOSS", "not valid for value of size", "Unexpected end", "JSONDecodeError",
                "Expecting value", "No such file", "NOT_FOUND", "truncated", "corrupt")


def _damaged(step_dir, error):
    """Whether a read error proves damaged files (truncated, missing or undecodable), not e.g. a mount."""
    text = f"{type(error).__name__}: {error}"
    missing = not all(storage.isdir(storage.join(step_dir, item)) for item in ("config", "state"))
    return missing or any(sign.lower() in text.lower() for sign in DAMAGE_SIGNS)


COMMIT_MARKER = workdirs.COMMIT_MARKER


def _finished_steps(directory):
    """Steps whose save completed: on a disk orbax renames a step's temporary directory to the bare number; on
    gs:// it writes the step in place and `COMMIT_MARKER` last."""
    if not storage.isdir(directory):
        return []
    steps = sorted(int(name) for name in storage.listdir(directory) if name.isdigit())
    if storage.is_url(directory):
        steps = [s for s in steps if storage.isfile(storage.join(directory, str(s), COMMIT_MARKER))]
    return steps


class Manager:
    """Saves at epoch ends, every `checkpoint_every_steps` and on SIGTERM or Ctrl-C; restores the newest on
    start. A second Ctrl-C stops at once (KeyboardInterrupt); `close` gives the signals back.

    `facts` (see `run_facts`) are saved with every step; a resume refuses different ones.
    """

    def __init__(self, workdir: str, config: ConfigDict, method: Method, facts: dict | None = None):
        self.config, self.method, self.facts = config, method, facts
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self._manager = self._open()
        self.stop_signal = None
        self._num_pretrain = None
        self._pending = None  # the step of a save that may still be running in the background
        self._previous_handlers = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}

    def _open(self):
        try:
            return open_manager(self.directory, keep=self.config.keep_checkpoints)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.directory}: {e.strerror or e}; "
                                  "pass a writable --workdir") from e

    def _request_stop(self, signum, frame):
        if signum == signal.SIGINT and self.stop_signal is not None:
            raise KeyboardInterrupt
        logging.warning("%s: saving a checkpoint and stopping after this step%s", signal.Signals(signum).name,
                        " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")
        self.stop_signal = signum

    def stop_requested(self, agree: bool = True) -> bool:
        """Whether to save and stop now. The processes of a multi-process run must stop at the same step (a
        save is collective), so there they compare signals when `agree`, which all of them pass alike."""
        if jax.process_count() > 1:
            if not agree:
                return False
            from jax.experimental import multihost_utils

            signals = multihost_utils.process_allgather(np.int32(self.stop_signal or 0))
            self.stop_signal = int(np.max(signals)) or None
        return self.stop_signal is not None

    def restore_or(self, state: TrainState | dict, num_pretrain: int) -> tuple[TrainState | dict, np.ndarray | None]:
        """(state, pseudo labels) of the newest checkpoint in the workdir, or the given fresh state.

        A checkpoint of another run (identity keys, data or steps per epoch differ) is refused, or with
        `overwrite_checkpoints` moved aside with the run's other outputs; accepted changes are logged.
        """
        self._num_pretrain = num_pretrain
        step = self._manager.latest_step()
        if step is None:
            logging.info("no checkpoint in %s: starting at step 0", self.directory)
            return state, None
        try:
            saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # orbax raises many types for truncated or damaged files
            raise self._unreadable(step, e) from e
        differing = self._differences(saved)
        if differing:
            described = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differing.items())
            if not self.config.overwrite_checkpoints:
                raise CheckpointError(
                    f"{self.directory} holds another run (step {step}; {described}); use a new --workdir, or "
                    "--config.overwrite_checkpoints=True to move that run aside and start fresh here")
            self._set_aside(step, described)
            return state, None
        self._log_changes(saved)
        if self.facts is not None and "first_step_loss" in (saved.get("run_facts") or {}):
            self.facts["first_step_loss"] = saved["run_facts"]["first_step_loss"]
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saved(state, None, num_pretrain))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:
            raise self._unreadable(step, e) from e
        pseudo = np.asarray(restored.pop("pseudo_labels"))
        logging.info("resuming from the checkpoint of step %d in %s", step, self.directory)
        return type(state)(**restored), (None if (pseudo < 0).any() else pseudo)

    def _differences(self, saved):
        """{what: (saved, now)} of everything that makes the saved checkpoint another run's."""
        current = resolved_config(self.config, self.method)
        differing = {k: (saved.get(k), current[k]) for k in IDENTITY_KEYS if saved.get(k) != current[k]}
        saved_facts, facts = saved.get("run_facts"), self.facts
        if saved_facts is None or facts is None:  # written before facts were saved, or a test's bare Manager
            return differing
        for key, value in facts["data"].items():
            if saved_facts["data"].get(key) != value:
                differing[f"data {key}"] = (saved_facts["data"].get(key), value)
        if saved_facts["steps_per_epoch"] != facts["steps_per_epoch"]:  # the saved step would map elsewhere
            differing["steps per epoch (max_steps_per_epoch, batch_size, data)"] = (
                saved_facts["steps_per_epoch"], facts["steps_per_epoch"])
        return differing

    def _log_changes(self, saved):
        current = resolved_config(self.config, self.method)
        for key in sorted(k for k in current if k in saved and saved[k] != current[k]):
            logging.warning("resuming with a changed %s: %r -> %r", key, saved[key], current[key])

    def _set_aside(self, step, described):
        """overwrite_checkpoints: the previous run's checkpoints and outputs move to a new folder of the
        workdir (process 0; the others wait), so the new run starts clean and nothing is deleted."""
        self._manager.close()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints: before setting aside")
        if jax.process_index() == 0:
            folder = workdirs.set_aside(self.workdir)
            logging.warning("overwrite_checkpoints: the run of step %d in %s (%s) was moved to %s; delete it when "
                            "you no longer need it", step, self.directory, described, folder)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints: set aside")
        self._manager = self._open()

    def _unreadable(self, step, error):
        """Deleting is advised only for a step whose files are provably damaged; permissions are named."""
        step_dir = storage.join(self.directory, str(step))
        denied = _permission_denied(step_dir, error)
        if denied:
            return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read: permission denied "
                                   f"({denied}); give this user read access (chmod -R u+rwX {step_dir}) or run as "
                                   "the user who wrote it")
        older = [s for s in _finished_steps(self.directory) if s < step]
        fallback = f"resume from step {older[-1]}" if older else "start afresh"
        if _damaged(step_dir, error):
            advice = f"delete {step_dir} to {fallback}, or pass a new --workdir"
        else:
            advice = f"if it is damaged, move it aside (mv {step_dir} {step_dir}.unreadable) to {fallback}"
        return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read ({_reason(error)}); {advice}")

    def set_aside_from(self, step: int, reason: str) -> int | None:
        """Moves saved steps >= `step` to `<step>.<reason>` (process 0) and stops saving; returns the newest
        step left, or None."""
        self.wait()
        self._shutdown()
        if jax.process_index() == 0:
            for late in (s for s in _finished_steps(self.directory) if s >= step):
                storage.move(storage.join(self.directory, str(late)), storage.join(self.directory, f"{late}.{reason}"),
                             markers=(COMMIT_MARKER,))
        return max(_finished_steps(self.directory), default=None)

    def save(self, state: TrainState | dict, pseudo: np.ndarray | None, *, epoch_end: bool) -> None:
        parts = _parts(state)
        step = int(parts["step"])
        if int(parts["first_nonfinite_step"]) >= 0 or step in self._manager.all_steps():
            return
        self.wait()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saved(state, pseudo, self._num_pretrain)),
                config=ocp.args.JsonSave(resolved_config(self.config, self.method, self.facts))), force=True)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._pending = step
        logging.info("checkpoint of step %d %s", step, "(epoch end)" if epoch_end else "")

    def wait(self) -> None:
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
                               f"{kept}: free disk space (or make the workdir writable), then to resume, run "
                               f"{SAME_COMMAND}")

    def close(self) -> None:
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
    if not storage.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; pass the "
                              "<workdir>/checkpoints of a pretraining run")
    try:
        manager = open_manager(storage.absolute(directory), read_only=True)
        steps = manager.all_steps()
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {directory} cannot be read ({e.strerror or e}); give this user "
                              f"read access (chmod -R u+rwX {directory}) or pass a readable one") from e
    if not steps:
        inner = storage.join(directory, "checkpoints")
        raise CheckpointError(f"no checkpoint in {directory}; pass " + (
            inner if storage.isdir(inner) else "the <workdir>/checkpoints of a pretraining run"))
    step = max(steps) if step < 0 else step
    if step not in steps:
        raise CheckpointError(f"step {step} is not saved in {directory}; saved steps: {sorted(steps)}")
    return manager, step


def restore_network(directory: str, step: int) -> tuple[dict, int]:
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


def restore_config(directory: str, step: int) -> tuple[dict, int]:
    """The resolved config (a dict, see `resolved_config`) saved with step `step` (-1 = newest), and that step."""
    manager, step = _open_step(directory, step)
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"], step
    except Exception as e:
        raise CheckpointError(f"checkpoint step {step} in {directory} has no readable config ({_reason(e)}); "
                              "pass the <workdir>/checkpoints of a spcl_jax pretraining run") from e
    finally:
        manager.close()


def fill(template: Any, raw: dict, *, what: str) -> Any:
    """`template` (an nnx State or any pytree) with its leaves taken from `raw`, the nested dicts a
    target-less orbax restore returns (string keys, Variables as {'value': array})."""

    def lookup(path: jax.tree_util.KeyPath, leaf: Any) -> np.ndarray:
        node = raw
        for key in path:
            name = str(key_name(key))
            if name == "value" and not (isinstance(node, dict) and "value" in node):
                continue
            if not isinstance(node, dict) or name not in node:
                raise CheckpointError(f"{what}: the checkpoint has no {'/'.join(str(key_name(k)) for k in path)}; "
                                      "was it written for another model or method?")
            node = node[name]
        if np.shape(node) != np.shape(leaf):
            raise CheckpointError(f"{what}: {'/'.join(str(key_name(k)) for k in path)} has shape "
                                  f"{np.shape(node)} in the checkpoint but {np.shape(leaf)} in this model; "
                                  "check model, width_multiplier and proj_dim")
        return np.asarray(node, dtype=np.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(lookup, template)
