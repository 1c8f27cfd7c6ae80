"""What watches the training loop and reports on it: the divergence guard, the patience counter, the warning when
the steps wait for data, a metrics write that fails (the state saved first) and the start-up and epoch logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from absl import logging

from spcl_jax.data import pipeline
from spcl_jax.errors import SAME_COMMAND, DivergedError, UserError, WorkdirError

if TYPE_CHECKING:
    import numpy as np

    from spcl_jax.checkpoint import Manager
    from spcl_jax.startup import Training
    from spcl_jax.train_state import TrainState

WAIT_WARNING = 0.1  # warn once when the steps wait for the loader more than this share of the time


class DivergenceGuard:
    """Stops a run whose loss or gradient turned non-finite (the step flags it on the device) or whose logged
    mean loss exceeds `divergence_factor` times the loss of the run's first step (kept in the checkpoints'
    run facts, so a resume keeps it).

    A step's loss is computed on the state before it, so a saved state is confirmed healthy only by a later
    check. Every save is preceded by a check; on divergence the checkpoints not yet confirmed are moved
    aside (`<step>.diverged`), so the newest checkpoint left, and resumed from, is a healthy one.
    """

    def __init__(self, factor: float, facts: dict | None):
        self.factor, self.facts = factor, {} if facts is None else facts

    def first_step(self, metrics: dict[str, jax.Array]) -> None:
        """Call with the metrics of the run's very first step."""
        self.facts["first_step_loss"] = float(metrics["train/loss"])

    def check(self, state: TrainState, means: dict[str, float], step: int, checked_before: int,
              manager: Manager) -> None:
        """`means` of the steps after `checked_before` (the step of the previous check) up to `step` (0-based)."""
        bad = int(state.first_nonfinite_step)
        reference = self.facts.get("first_step_loss")
        loss = means["train/loss"]
        if bad >= 0:
            what, unconfirmed = f"non-finite loss or gradient at step {bad + 1} (noticed at step {step + 1})", bad
        elif self.factor and reference is not None and loss > self.factor * abs(reference):
            what = (f"the loss exploded by step {step + 1}: {loss:.4g} is more than divergence_factor={self.factor:g} "
                    f"times the first step's {reference:.4g}")
            unconfirmed = checked_before
        else:
            return
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(means.items()) if "loss" in k or "grad_norm" in k)
        newest = manager.set_aside_from(unconfirmed, "diverged")
        resume = (f"to resume from the checkpoint of step {newest} (the newest before it diverged), run "
                  f"{SAME_COMMAND} with that change" if newest is not None else
                  f"then run {SAME_COMMAND} with that change (no checkpoint before it diverged)")
        raise DivergedError(f"{what}: {terms}; lower learning_rate or set grad_clip_norm (divergence_factor=0 turns "
                            f"the explosion check off), {resume}")


class Patience:
    """The original's patience counter: epochs since the train loss last improved (logged, never stops)."""

    def __init__(self):
        self.best, self.count = float("inf"), 0

    def update(self, loss: float) -> None:
        self.best, self.count = (loss, 0) if loss < self.best else (self.best, self.count + 1)


def write_or_save(loop: Any, state: TrainState, pseudo: np.ndarray | None, step: int, epoch: int,  # train.Loop
                  scalars: dict[str, float]) -> None:
    """`writer.write`; when that fails (disk full), the state is saved if it can be and the run stops."""
    try:
        loop.writer.write(step, epoch, scalars)
    except OSError as e:
        try:
            loop.manager.save(state, pseudo, epoch_end=False)
            loop.manager.close()
            kept = f"the checkpoint of step {int(state.step)} was saved"
        except UserError:
            kept = "no checkpoint could be saved either (the newest left is intact)"
        raise WorkdirError(f"writing {loop.writer.path} failed ({e.strerror or e}); {kept}: free disk space, then "
                           f"to resume, run {SAME_COMMAND}") from e


def warn_if_waiting(loop: Any, wait_fraction: float) -> None:  # train.Loop
    """Once per run, when the steps spend more than WAIT_WARNING of their time waiting for data."""
    if wait_fraction <= WAIT_WARNING or loop.warned_waiting:
        return
    loop.warned_waiting = True
    source = loop.run.source
    if source.in_memory:
        advice = "the data is in memory and gathered in the main process: is the CPU shared with other jobs?"
    else:
        advice = (f"raise --config.num_workers (now {pipeline.worker_count(loop.run.parts.num_workers, source)}), "
                  "or train from records written by `python -m spcl_jax.data.prepare ... --out` (5x cheaper to decode)")
    logging.warning("the training steps waited for input data %.0f%% of the time: %s", 100 * wait_fraction, advice)


def log_start(run: Any, workdir: str) -> None:  # train.Run
    """What runs where: processes and devices, the method and data (how many images pretraining uses and why),
    the batch split, the input, the lr."""
    parts, training = run.parts, run.parts.training
    logging.info("process %d of %d with %d of %d devices; workdir %s (the same options with --workdir=%s resume "
                 "this run)", jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 workdir, workdir)
    logging.info("method=%s dataset=%s pretrain=%d examples; global batch %d = %d per host x %d hosts "
                 "= %d per device x %d devices; %d steps per epoch (incomplete last batch dropped)",
                 run.method.name, parts.dataset, len(run.splits.pretrain), training.batch_size,
                 training.batch_size // jax.process_count(), jax.process_count(),
                 training.batch_size // jax.device_count(), jax.device_count(), run.steps_per_epoch)
    logging.info("%s", run.splits.pretrain_summary)
    logging.info("input: %s", pipeline.describe_workers(parts.num_workers, run.source))
    warmup = parts.optimisation.warmup_epochs
    peak_epoch = warmup - 1 if warmup else 0
    logging.info("learning rate: peak %.4g (epoch %d of %d; %d warmup epochs, cosine after), prototype classifier "
                 "SGD %.4g", float(run.schedule(jnp.int32(peak_epoch * run.steps_per_epoch))), peak_epoch + 1,
                 training.n_epochs, warmup, parts.optimisation.classifier_learning_rate(training.batch_size))


def log_epoch(epoch: int, training: Training, epoch_means: dict[str, float], summary: dict[str, float], seconds: float,
              patience: Patience, eta: str) -> None:
    """One line per epoch: its mean loss and terms, lr, time, patience, the kNN monitor's accuracies and the ETA."""
    logging.info("epoch %d/%d: loss %.4f (%s), lr %.4g, %.1f s, %d epochs without improvement (patience %d)%s, ETA %s",
                 epoch + 1, training.n_epochs, epoch_means["train/loss"],
                 ", ".join(f"{k.removeprefix('train/loss_')} {v:.4f}" for k, v in epoch_means.items()
                           if k.startswith("train/loss_")),
                 epoch_means["train/lr"], seconds, patience.count, training.patience,
                 "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("knn_monitor/")), eta)
