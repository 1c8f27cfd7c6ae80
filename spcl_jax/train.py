"""SPCL pretraining (DIFFERENCES.md, one SPCL epoch) and the other methods, as one jitted step sharded over the `data` mesh.

`train_and_evaluate(config, workdir)` runs: every `reassign` epochs the feature pass, PCA-whitening,
k-means and pseudo labels; every `classifier_init_freq` epochs a fresh prototype classifier with its
own SGD; then the epoch's steps over a pair plan (spcl/metric) or a permutation (other methods);
finally linear and kNN evaluation, `figs/losses.png` and the results table in `results.json` and `results.md`.
"""
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from spcl_jax import checkpoint, clustering, config_validation, data, epoch_batches, evaluate, features
from spcl_jax import method as methods
from spcl_jax import network, optim, progress, sharding, startup, streams
from spcl_jax.data import pipeline
from spcl_jax.data.sizes import Sizes
from spcl_jax.errors import ConfigError
from spcl_jax.loop_support import DivergenceGuard, Patience, log_epoch, log_start, warn_if_waiting, write_or_save
from spcl_jax.metrics import MetricWriter
from spcl_jax.objective import make_loss_fn, view_specs
from spcl_jax.train_state import TrainState
from spcl_jax.plan import fit
from spcl_jax.workdir import check_outputs, claim_workdir


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything static about a run: its parts, the data, the networks' graphs, optimisers and jitted steps."""

    parts: startup.Parts
    splits: data.Splits
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    graphdef: nnx.GraphDef  # of network.Network
    classifier_graphdef: nnx.GraphDef | None  # of the prototype classifier (methods that keep one)
    tx: optax.GradientTransformation
    classifier_tx: optax.GradientTransformation
    specs: tuple  # (image set, recipe) of each view, see view_specs
    schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate
    train_step: Callable  # (state, batch) -> (state, metrics)
    encode: Callable  # (params, batch_stats, batch) -> features of the clustering view

    @property
    def method(self) -> methods.Method:
        """The pretraining method (the parts')."""
        return self.parts.method

    @property
    def source(self) -> Any:
        """The split the method trains on."""
        return getattr(self.splits, self.method.source_split)


@dataclasses.dataclass
class Loop:
    """What the training loop writes to: the run's metrics, its checkpoints and its workdir."""

    run: Run
    writer: MetricWriter
    manager: checkpoint.Manager
    workdir: str
    warned_waiting: bool = False
    pace: progress.Pace = dataclasses.field(init=False)
    guard: DivergenceGuard = dataclasses.field(init=False)

    def __post_init__(self):
        training, steps = self.run.parts.training, self.run.steps_per_epoch
        self.guard = DivergenceGuard(training.divergence_factor, self.manager.facts)
        clusters, reassign = self.run.method.clustering, self.run.parts.clustering.reassign
        self.pace = progress.Pace(training.n_epochs * steps, [epoch * steps for epoch in range(training.n_epochs)
                                                              if clusters and epoch % reassign == 0])


def make_train_step(parts: startup.Parts, graphdef: nnx.GraphDef, classifier_graphdef: nnx.GraphDef | None,
                    tx: optax.GradientTransformation, classifier_tx: optax.GradientTransformation,
                    specs: tuple[tuple[str, str], ...], mesh: jax.sharding.Mesh) -> jax.stages.Wrapped:
    """One jitted, donated step: state (replicated) x batch (sharded by rows) -> state, metrics."""
    loss_fn = make_loss_fn(parts.objective, parts.method, graphdef, classifier_graphdef, parts.augment, specs)
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        (total, (terms, batch_stats, diagnostics)), (grads, classifier_grads) = grad_fn(
            state.params, state.classifier_params, state.batch_stats, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        classifier_updates, classifier_opt_state = classifier_tx.update(
            classifier_grads, state.classifier_opt_state, state.classifier_params)
        classifier_params = optax.apply_updates(state.classifier_params, classifier_updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        new_state = TrainState(
            params=params, batch_stats=batch_stats, opt_state=opt_state, classifier_params=classifier_params,
            classifier_opt_state=classifier_opt_state, step=state.step + 1,
            first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                           state.first_nonfinite_step))
        metrics = {"train/loss": total, "train/grad_norm": grad_norm}
        metrics.update({f"train/loss_{k}": v for k, v in terms.items()})
        metrics.update({f"train/{k}": v for k, v in diagnostics.items()})
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(replicated, batch_sh), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def make_run(parts: startup.Parts, splits: data.Splits, mesh: jax.sharding.Mesh) -> Run:
    """The `Run` of `parts` on `splits` and `mesh`: networks as graphs, optimisers, jitted steps. Computes and places
    nothing, so the same run is built for this machine's mesh or for a mesh of devices elsewhere (`spcl_jax.plan`);
    the state comes from `initial_state` or, as shapes, `abstract_state`."""
    method, training = parts.method, parts.training
    source = getattr(splits, method.source_split)
    steps_per_epoch = len(source) // training.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"invalid config: batch_size={training.batch_size}; valid: at most the training "
                          f"set size {len(source)} (pretraining drops the incomplete last batch)")
    if training.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, training.max_steps_per_epoch)
    graphdef, params, _ = network.abstract(parts.architecture, method, splits.num_classes)
    schedule, tx, classifier_tx = optim.pretrain_optimisers(
        parts.optimisation, batch_size=training.batch_size, n_epochs=training.n_epochs,
        steps_per_epoch=steps_per_epoch, params=params)
    classifier_graphdef = None
    if method.prototype_classifier:
        abstract = nnx.eval_shape(lambda: clustering.classifier_module(
            parts.architecture.features_dim, parts.clustering.classifier_width, 0))
        classifier_graphdef = nnx.split(abstract)[0]
    specs = view_specs(method, parts.objective.asymmetric_first_view)
    view = features.FEATURE_VIEWS[parts.clustering.feature_view]
    return Run(parts=parts, splits=splits, mesh=mesh, steps_per_epoch=steps_per_epoch,
               graphdef=graphdef, classifier_graphdef=classifier_graphdef, tx=tx, classifier_tx=classifier_tx,
               specs=specs, schedule=schedule,
               train_step=make_train_step(parts, graphdef, classifier_graphdef, tx, classifier_tx, specs, mesh),
               encode=features.make_encode(graphdef, parts.augment, mesh, view))


def initial_state(run: Run) -> TrainState:
    """The state at step 0 from the seed, not yet placed on the mesh."""
    parts = run.parts
    _, params, batch_stats = network.create(parts.architecture, run.method, run.splits.num_classes, parts.seed)
    classifier_params = (clustering.classifier_params(parts.architecture.features_dim,
                                                      parts.clustering.classifier_width,
                                                      streams.network_init(parts.seed))
                         if run.method.prototype_classifier else {})
    return TrainState(params=params, batch_stats=batch_stats, opt_state=run.tx.init(params),
                      classifier_params=classifier_params,
                      classifier_opt_state=run.classifier_tx.init(classifier_params), step=jnp.int32(0),
                      first_nonfinite_step=jnp.int32(-1))


def abstract_state(run: Run) -> TrainState:
    """`initial_state` as shapes, replicated on the run's mesh: the train step's first argument, computed by
    nothing."""
    replicated = sharding.replicated(run.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(lambda: initial_state(run)))


def batch_spec(run: Run, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's second argument as shapes, sharded by rows: the host batch of `pipeline.batch_spec` and
    the step's labels (and the pairs' similarity)."""
    spec = pipeline.batch_spec(run.method.image_sets, len(run.specs), run.source.canvas_shape, batch_size)
    spec.update({f"labels_{name}": ((batch_size,), np.int32) for name in run.method.image_sets})
    if run.method.pairs:
        spec["similarity"] = ((batch_size,), np.float32)
    rows = sharding.batch_sharding(run.mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in spec.items()}


def build(config: ml_collections.ConfigDict, method: methods.Method, splits: data.Splits,
          mesh: jax.sharding.Mesh) -> tuple[Run, TrainState]:
    """The `Run` of `config` (fitted to the data) and its initial state on the mesh (nothing here touches the
    workdir)."""
    run = make_run(startup.parts(config, method, splits), splits, mesh)
    return run, jax.device_put(initial_state(run), sharding.replicated(mesh))


def check_step_fits(config: ml_collections.ConfigDict, method: methods.Method, mesh: jax.sharding.Mesh) -> None:
    """Raises ConfigError (`fit.check_memory`: the bytes needed and available, the remedies) when the training step
    of `config` on `mesh`, compiled from shapes alone before the data is loaded, cannot fit a device's memory.
    CPUs skip it. The compiled step lands in the compilation cache: the run does not compile it twice."""
    device = mesh.devices.flat[0]
    available = fit.device_memory(device)
    if available is None:
        return
    sizes = Sizes.for_step(config.dataset, config.image_size, config.batch_size, config.n_classes)
    splits = sizes.splits(config.dataset)
    run = make_run(startup.parts(config, method, splits), splits, mesh)
    compiled = run.train_step.lower(abstract_state(run), batch_spec(run, config.batch_size)).compile()
    fit.check_memory(compiled.memory_analysis(), available, config.batch_size, config.remat, device,
                     mesh.devices.size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict[str, float]]:
    """Pretrain with the config's method, then (unless switched off) linear and kNN evaluation."""
    check_outputs(workdir)
    mesh = sharding.data_mesh()
    # accelerators only: before minutes of loading data (after it, where the data may still change the config)
    config, method, splits = startup.prepare(config, jax.device_count(),
                                             check_step=lambda config, method: check_step_fits(config, method, mesh))
    run, state = build(config, method, splits, mesh)
    is_main = jax.process_index() == 0
    if is_main:  # the processes of one run share its workdir
        claim_workdir(workdir)
    facts = checkpoint.run_facts(run.steps_per_epoch, splits)
    manager = checkpoint.Manager(workdir, config, method, facts)
    state, pseudo = manager.restore_or(state, len(splits.pretrain))  # may move another run's outputs aside
    loop = Loop(run, MetricWriter(workdir, enabled=is_main), manager, workdir)
    if is_main:
        progress.log_to_file(workdir)  # after restore_or: a refused resume leaves the workdir as it was
        checkpoint.write_config_json(workdir, config, method, facts)
    log_start(run, workdir)
    start_step = int(state.step)
    done = start_step == config.n_epochs * run.steps_per_epoch
    finished = evaluate.finished_results(workdir, config, method, start_step) if done else None
    if done and (finished or not config.evaluate_after_pretrain):
        loop.manager.close()
        loop.writer.close()
        logging.info("this run is finished (step %d, the last)%s", start_step,
                     "; its results:" if finished else "; evaluate_after_pretrain is off")
        if finished:
            evaluate.show_results(finished, workdir)
        return state, finished["metrics"] if finished else {}
    patience = Patience()
    monitor = evaluate.Evaluator(run.parts, splits, run.graphdef, run.mesh) if config.knn_every_epochs else None
    for epoch in range(start_step // run.steps_per_epoch, config.n_epochs):
        first_step = max(start_step - epoch * run.steps_per_epoch, 0)
        if first_step == 0:
            state, pseudo = start_epoch(loop, state, pseudo, epoch)
        began = time.time()
        state, epoch_means = run_epoch(loop, state, pseudo, epoch, first_step)
        loop.manager.save(state, pseudo, epoch_end=True)
        patience.update(epoch_means["train/loss"])
        summary = {"train/epoch_loss": epoch_means["train/loss"], "train/epochs_without_improvement": patience.count}
        if monitor and (epoch + 1) % config.knn_every_epochs == 0:
            summary.update(monitor.knn_monitor(state.params, state.batch_stats))
        loop.writer.write(int(state.step), epoch, summary)
        loop.writer.flush()  # on gs://: the epoch's records stored with its checkpoint
        log_epoch(epoch, run.parts.training, epoch_means, summary, time.time() - began, patience,
                  loop.pace.eta(int(state.step)))
    step = int(state.step)
    if loop.manager.stop_requested():  # a signal after the last step: pretraining is saved, say so and stop
        loop.manager.close()
        loop.writer.close()
        raise checkpoint.Preempted(loop.manager.stop_signal, step, evaluating=config.evaluate_after_pretrain)
    loop.manager.close()  # last save complete; Ctrl-C and SIGTERM act at once again during evaluation
    results = {}
    if config.evaluate_after_pretrain:
        with checkpoint.stop_at_once_on_sigterm(step):
            results = evaluate.after_pretraining(run, state, loop.writer)
    loop.writer.close()
    if is_main:
        evaluate.write_summary(workdir, results, config, method.name, step)
    return state, results


def start_epoch(loop: Loop, state: TrainState, pseudo: np.ndarray | None,
                epoch: int) -> tuple[TrainState, np.ndarray | None]:
    """Re-clustering (every `reassign` epochs) and classifier re-initialisation (every `classifier_init_freq`)."""
    run, c = loop.run, loop.run.parts.clustering
    if run.method.clustering and (epoch % c.reassign == 0 or pseudo is None):
        pseudo = clustering.recluster(loop, state, epoch)
    if run.method.prototype_classifier and epoch % c.classifier_init_freq == 0:
        params, opt_state = clustering.new_classifier(run, streams.classifier_init(run.parts.seed, epoch))
        state = state.replace(**jax.device_put(dict(classifier_params=params, classifier_opt_state=opt_state),
                                               sharding.replicated(run.mesh)))
        loop.writer.write(int(state.step), epoch, {"prototypes/classifier_reinitialised": 1})
    return state, pseudo


def train_step(loop: Loop, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """`run.train_step`. This process's first call compiles it: announced and timed, waiting for its result."""
    if loop.pace.started:
        return loop.run.train_step(state, batch)
    compiling = progress.Announcement("compiling the training step")
    state, metrics = loop.run.train_step(state, batch)
    state.step.block_until_ready()
    compiling.done("compiled", " (its first step included)")
    loop.pace.start(int(state.step))
    return state, metrics


def run_epoch(loop: Loop, state: TrainState, pseudo: np.ndarray | None, epoch: int,
              first_step: int) -> tuple[TrainState, dict[str, float]]:
    """The steps of `epoch` from `first_step` on; (state, the epoch's mean metrics)."""
    run, manager = loop.run, loop.manager
    training = run.parts.training
    plan = epoch_batches.epoch_plan(run, epoch, pseudo)
    maker = epoch_batches.epoch_pass(run, epoch, plan)
    totals, count, last_time, last_step, last_wait = {}, 0, time.time(), int(state.step), 0.0
    epoch_sums, epoch_count = {}, 0
    bar = progress.Bar(epoch, training.n_epochs, run.steps_per_epoch, first_step, loop.pace,
                       enabled=jax.process_index() == 0)
    with bar, pipeline.Loader(maker, num_workers=run.parts.num_workers, start=first_step) as loader:
        for i, host_batch in zip(range(first_step, run.steps_per_epoch), loader):
            step = epoch * run.steps_per_epoch + i
            state, metrics = train_step(loop, state, epoch_batches.make_batch(run, plan, maker, i, host_batch, pseudo))
            bar.dispatched(metrics["train/loss"])  # not state.step: the next step donates the state
            if step == 0:
                loop.guard.first_step(metrics)
            totals = jax.tree.map(jnp.add, totals, metrics) if totals else metrics
            count += 1
            last = i == run.steps_per_epoch - 1
            every = training.checkpoint_every_steps
            save_due = every and (step + 1) % every == 0 and not last
            logged = (step + 1) % training.log_every_steps == 0 or last or save_due  # every save is checked first
            stop = manager.stop_requested(agree=logged)  # multi-process runs stop at the next logged step
            if logged or stop:
                sums = {k: float(v) for k, v in totals.items()}
                epoch_sums = {k: epoch_sums.get(k, 0.0) + v for k, v in sums.items()}
                epoch_count += count
                means = {k: v / count for k, v in sums.items()}
                now = time.time()
                means["train/lr"] = float(run.schedule(jnp.int32(step)))
                means["train/images_per_sec"] = ((step + 1 - last_step) * training.batch_size * len(run.specs)
                                                 / max(now - last_time, 1e-9))
                means["data/wait_fraction"] = min((loader.wait_seconds - last_wait) / max(now - last_time, 1e-9), 1.0)
                loop.guard.check(state, means, step, last_step, manager)
                write_or_save(loop, state, pseudo, step + 1, epoch, means)
                warn_if_waiting(loop, means["data/wait_fraction"])
                bar.logged(means["train/loss"], means["train/lr"], means["train/images_per_sec"])
                totals, count, last_time, last_step, last_wait = {}, 0, now, step + 1, loader.wait_seconds
            if save_due:
                manager.save(state, pseudo, epoch_end=False)
                loop.writer.flush()  # on gs://: the records stored with the checkpoint
            if stop:
                manager.save(state, pseudo, epoch_end=False)
                manager.close()
                loop.writer.close()
                raise checkpoint.Preempted(manager.stop_signal, step + 1)
    epoch_means = {k: v / max(epoch_count, 1) for k, v in epoch_sums.items()}
    epoch_means["train/lr"] = float(run.schedule(jnp.int32(epoch * run.steps_per_epoch)))
    return state, epoch_means


def run_mode(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict[str, float]] | dict[str, float]:
    """What `launch.py` calls: pretraining or, for `mode=linear_eval|knn_eval`, evaluation of a checkpoint."""
    if config_validation.pretrains(config):
        return train_and_evaluate(config, workdir)
    return evaluate.evaluate_checkpoint(config, workdir)
