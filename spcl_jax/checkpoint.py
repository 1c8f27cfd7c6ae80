"""Orbax checkpoints of everything a run needs to continue exactly, auto-resume and SIGTERM saves.

A checkpoint holds the network parameters and BatchNorm statistics, both optimiser states, the step
(which fixes the epoch and the position in the epoch's deterministic plan), the pseudo labels, and the
resolved config. Orbax writes each step to a temporary directory and renames it when complete, so a
crash during a save never damages the previous checkpoint.
"""
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from spcl_jax.errors import CheckpointError
from spcl_jax.models.param_groups import _key_name

# Keys that decide what the parameters mean: resuming with a different value is refused.
IDENTITY_KEYS = ("method", "model", "stem", "width_multiplier", "proj_dim", "dataset", "image_size",
                 "num_prototypes", "prototype_classifier_width", "batch_size", "n_classes", "pre_classes",
                 "train_sample", "val_sample", "seed", "optimiser", "lars_mode", "dtype")


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run stopped cleanly."""


def checkpoint_dir(workdir):
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def resolved_config(config, method):
    """The config as saved with every checkpoint (JSON types), with the resolved method."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    values["method"] = method
    return values


def open_manager(directory, *, keep=2, read_only=False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory, options=options)


def _to_saved(state, pseudo, num_pretrain):
    labels = np.full(num_pretrain, -1, np.int64) if pseudo is None else np.asarray(pseudo, np.int64)
    return dict(state, pseudo_labels=labels)


class Manager:
    """Saves at epoch ends, every `checkpoint_every_steps` and on SIGTERM; restores the newest on start."""

    def __init__(self, workdir, config, method):
        self.config, self.method = config, method
        self.directory = checkpoint_dir(workdir)
        try:
            self._manager = open_manager(self.directory, keep=config.keep_checkpoints)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.directory}: {e.strerror or e}; "
                                  "pass a writable --workdir") from e
        self._stop = False
        self._num_pretrain = None
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum, frame):
        logging.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self._stop = True

    def stop_requested(self):
        return self._stop

    def restore_or(self, state, num_pretrain):
        """(state, pseudo labels) of the newest checkpoint in the workdir, or the given fresh state."""
        self._num_pretrain = num_pretrain
        step = self._manager.latest_step()
        if step is None:
            return state, None
        saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
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
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        pseudo = np.asarray(restored.pop("pseudo_labels"))
        logging.info("resuming from the checkpoint of step %d in %s", step, self.directory)
        return restored, (None if (pseudo < 0).any() else pseudo)

    def save(self, state, pseudo, *, epoch_end):
        step = int(state["step"])
        if int(state["first_nonfinite_step"]) >= 0 or step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saved(state, pseudo, self._num_pretrain)),
            config=ocp.args.JsonSave(resolved_config(self.config, self.method))), force=True)
        logging.info("checkpoint of step %d %s", step, "(epoch end)" if epoch_end else "")

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def restore_network(directory, step):
    """The saved pretraining state (nested dicts) of step `step` (-1 = newest) and that step."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; pass the "
                              "<workdir>/checkpoints of a pretraining run as load_checkpoint_dir")
    manager = open_manager(directory, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}; pass the <workdir>/checkpoints of a "
                              "pretraining run as load_checkpoint_dir")
    step = max(steps) if step < 0 else step
    if step not in steps:
        raise CheckpointError(f"checkpoint_step={step} is not in {directory}; saved steps: {sorted(steps)}")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    except Exception as e:  # orbax raises many types for truncated or damaged files
        raise CheckpointError(f"checkpoint step {step} in {directory} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from e
    finally:
        manager.close()
    return restored, step


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
