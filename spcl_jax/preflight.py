"""launch.py's `--print_config` and `--dry_run`: what a run would use, shown before spending hours on it.
Neither trains, and neither writes anything in the workdir."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jax
import ml_collections

from spcl_jax import checkpoint, sharding, startup, storage, train
from spcl_jax import config_validation

if TYPE_CHECKING:
    from spcl_jax.train_state import TrainState


def print_config(config: ml_collections.ConfigDict) -> None:
    """Every option after the overrides, with `method` resolved from the original's flags: config.json's
    content, less the facts that only loading the data gives."""
    print(json.dumps(checkpoint.resolved_config(config, config_validation.method_of(config)), indent=2, sort_keys=True))


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Loads the data (image folders are listed and checked), builds the network, its optimiser and the mesh
    as the run would, so that their errors show now, and prints what they are."""
    config, method, splits = startup.prepare(config, jax.device_count())
    run, state = train.build(config, method, splits, sharding.data_mesh())
    print("\n".join(summary(config, run, state, workdir)))


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def summary(config: ml_collections.ConfigDict, run: train.Run, state: TrainState, workdir: str) -> list[str]:
    """The lines `dry_run` prints."""
    splits, method = run.splits, run.method
    devices = jax.device_count()
    model = (f"model: {config.model} (width x{config.width_multiplier:g}), {_count(state.params):,} parameters "
             f"(encoder {_count(state.params['encoder']):,})")
    if method.prototype_classifier:
        model += f" + prototype classifier {_count(state.classifier_params):,}"
    pretrains = config_validation.pretrains(config)
    work = (f"pretraining: {run.steps_per_epoch:,} steps per epoch x {config.n_epochs} epochs = "
            f"{run.steps_per_epoch * config.n_epochs:,} steps" if pretrains
            else f"evaluation of the checkpoint in {config.load_checkpoint_dir}")
    where = ("exists: a run there resumes from its newest checkpoint, if any" if storage.isdir(workdir)
             else "would be created")
    return ["dry run: nothing trained, nothing written",
            f"method {method.name}, dataset {splits.name}",
            (f"data: pretrain {len(splits.pretrain):,}, train {len(splits.train):,}, valid {len(splits.valid):,}, "
             f"test {len(splits.test):,} examples; {splits.num_classes} classes"),
            model,
            (f"mesh: {devices} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); global "
             f"batch {config.batch_size} = {config.batch_size // devices} per device"),
            work,
            f"workdir: {workdir} ({where})"]
