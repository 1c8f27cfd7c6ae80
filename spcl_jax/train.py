"""SPCL pretraining (DIFFERENCES.md, one SPCL epoch) and the other methods, as one jitted step sharded over the `data` mesh.

`train_and_evaluate(config, workdir)` runs: every `reassign` epochs the feature pass, PCA-whitening,
k-means and pseudo labels; every `classifier_init_freq` epochs a fresh prototype classifier with its
own SGD; then the epoch's steps over a pair plan (spcl/metric) or a permutation (other methods);
finally linear and kNN evaluation, `figs/losses.png` and the results table in `results.json` and `results.md`.
"""
import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from spcl_jax import augment, checkpoint, data, evaluate, features, kmeans, losses
from spcl_jax import method as methods
from spcl_jax import models, network, optim, progress, prototypes, sharding, startup, streams, visual
from spcl_jax.data import pipeline
from spcl_jax.data.sizes import Sizes
from spcl_jax.errors import SAME_COMMAND, ConfigError, UserError, WorkdirError
from spcl_jax.metrics import MetricWriter, read_metrics
from spcl_jax.network import prototype_classifier_width
from spcl_jax.plan import fit
from spcl_jax.workdir import check_outputs, claim_workdir


WAIT_WARNING = 0.1  # warn once when the steps wait for the loader more than this share of the time
VISUAL_POINTS = 5000  # examples in the `visual_cls` figure: a fixed random subset (datasets may be sorted by class)


class DivergedError(UserError):
    """The loss or gradient became non-finite, or the loss exploded; the message names the step and the terms."""


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything static about a run: the method, the data, the networks' graphs, optimisers and jitted steps."""

    config: ml_collections.ConfigDict
    method: methods.Method
    splits: data.Splits
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    graphdef: nnx.GraphDef  # of network.Network
    classifier_graphdef: nnx.GraphDef | None  # of the prototype classifier (methods that keep one)
    tx: optax.GradientTransformation
    classifier_tx: optax.GradientTransformation
    aug: augment.AugmentParams
    recipe: pipeline.Recipe
    specs: tuple  # (image set, recipe) of each view, see view_specs
    schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate
    train_step: Callable  # (state, batch) -> (state, metrics)
    encode: Callable  # (params, batch_stats, batch) -> features of the clustering view

    @property
    def source(self):
        """The split the method trains on."""
        return getattr(self.splits, self.method.source_split)


class DivergenceGuard:
    """Stops a run whose loss or gradient turned non-finite (the step flags it on the device) or whose logged
    mean loss exceeds `divergence_factor` times the loss of the run's first step (kept in the checkpoints'
    run facts, so a resume keeps it).

    A step's loss is computed on the state before it, so a saved state is confirmed healthy only by a later
    check. Every save is preceded by a check; on divergence the checkpoints not yet confirmed are moved
    aside (`<step>.diverged`), so the newest checkpoint left, and resumed from, is a healthy one.
    """

    def __init__(self, factor, facts):
        self.factor, self.facts = factor, {} if facts is None else facts

    def first_step(self, metrics):
        """Call with the metrics of the run's very first step."""
        self.facts["first_step_loss"] = float(metrics["train/loss"])

    def check(self, state, means, step, checked_before, manager):
        """`means` of the steps after `checked_before` (the step of the previous check) up to `step` (0-based)."""
        bad = int(state["first_nonfinite_step"])
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
        config, steps = self.run.config, self.run.steps_per_epoch
        self.guard = DivergenceGuard(config.divergence_factor, self.manager.facts)
        clusters = self.run.method.clustering
        self.pace = progress.Pace(config.n_epochs * steps, [epoch * steps for epoch in range(config.n_epochs)
                                                            if clusters and epoch % config.reassign == 0])


def view_specs(method, config):
    """(image set, recipe) of each view: A1, A2, B1, B2 for pair methods, two views of one image for
    simclr/cluster, one for supervised. With `asymmetric_first_view` (B-7) the first view of every image
    is the clean eval view where the original's code leaves it so (simclr and metric)."""
    if method.supervised:
        return (("a", "train"),)
    first = "eval" if config.asymmetric_first_view and method.first_view_clean_as_written else "pretrain"
    return tuple(view for name in method.image_sets for view in ((name, first), (name, "pretrain")))


def encode_views(graphdef, params, batch_stats, views, *, project, frozen_bn):
    """Encoder (+ projection) on each view in turn, each its own BatchNorm batch, running statistics
    updated view after view exactly like the original's separate calls.

    Unrolled on purpose: a lax.scan over the views compiles no faster and its backward pass ran 8x
    slower on CPU.
    """
    net = nnx.merge(graphdef, params, batch_stats, copy=True)
    if frozen_bn:
        net.encoder.eval()
    h = [net.encoder(view) for view in views]
    z = [net.projection(x) for x in h] if project else h
    return nnx.state(net, nnx.BatchStat), (h, z)


def make_loss_fn(config, method, graphdef, classifier_graphdef, aug, specs):
    """loss(params, classifier_params, batch_stats, batch) -> (total, (terms, batch_stats, diagnostics)):
    the views of the batch through the network, then `losses.spcl_objective` with the config's weights for
    the terms of `method` (or, supervised, the cross-entropy of its linear head on the labels)."""

    def loss_fn(params, classifier_params, batch_stats, batch):
        views = augment.views(batch, specs, aug)
        batch_stats, (h, z) = encode_views(graphdef, params, batch_stats, views, project=method.contrastive,
                                           frozen_bn=config.encoder_bn_mode == "frozen_init_stats")
        net = nnx.merge(graphdef, params, batch_stats, copy=True)
        if method.supervised:
            loss = losses.prototype_loss(net.supervised_head(h[0]), batch["labels_a"])
            return loss, ({"supervised": loss}, batch_stats, {})
        logits = None
        if method.prototype_classifier:
            classifier = nnx.merge(classifier_graphdef, classifier_params)
            logits = [classifier(x) for x in h]
        pairs = {}
        if method.pairs:
            pairs = dict(z_vi=z[2], z_vj=z[3], h_i=h[0], h_j=h[1], v_i=h[2], v_j=h[3], labels_b=batch["labels_b"],
                         similarity=batch["similarity"], metric_fn=net.metric_learner.from_difference)
        total, terms = losses.spcl_objective(
            z[0], z[1], logits=logits, labels_a=batch["labels_a"], temperature=config.temperature,
            contras_weight=config.contras_weight, metric_weight=config.metric_weight if method.pairs else 0.0,
            cluster_weight=config.cluster_weight if method.prototype_classifier else 0.0,
            cluster_loss=config.cluster_loss, metric_loss_kind=config.metric_loss, **pairs)
        diagnostics = losses.contrastive_diagnostics(z[0], z[1], batch["labels_a"], config.temperature)
        return total, (terms, batch_stats, diagnostics)

    return loss_fn


def make_train_step(config, method, graphdef, classifier_graphdef, tx, classifier_tx, aug, specs, mesh):
    """One jitted, donated step: state (replicated) x batch (sharded by rows) -> state, metrics."""
    loss_fn = make_loss_fn(config, method, graphdef, classifier_graphdef, aug, specs)
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def step(state, batch):
        (total, (terms, batch_stats, diagnostics)), (grads, classifier_grads) = grad_fn(
            state["params"], state["classifier_params"], state["batch_stats"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        classifier_updates, classifier_opt_state = classifier_tx.update(
            classifier_grads, state["classifier_opt_state"], state["classifier_params"])
        classifier_params = optax.apply_updates(state["classifier_params"], classifier_updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        new_state = dict(
            params=params, batch_stats=batch_stats, opt_state=opt_state, classifier_params=classifier_params,
            classifier_opt_state=classifier_opt_state, step=state["step"] + 1,
            first_nonfinite_step=jnp.where((state["first_nonfinite_step"] < 0) & ~finite, state["step"],
                                           state["first_nonfinite_step"]))
        metrics = {"train/loss": total, "train/grad_norm": grad_norm}
        metrics.update({f"train/loss_{k}": v for k, v in terms.items()})
        metrics.update({f"train/{k}": v for k, v in diagnostics.items()})
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(replicated, batch_sh), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def _classifier_module(config, num_classes, key):
    dim = models.feature_dim(config.model, config.width_multiplier)
    return models.PrototypeClassifier(dim, prototype_classifier_width(config, num_classes), rngs=nnx.Rngs(key))


def _classifier(config, num_classes, key):
    return nnx.split(_classifier_module(config, num_classes, key))


def make_run(config, method, splits, mesh):
    """The `Run`: networks as graphs, optimisers, jitted steps. Computes and places nothing, so the same run is
    built for this machine's mesh or for a mesh of devices elsewhere (`spcl_jax.plan`); the state comes from
    `initial_state` or, as shapes, `abstract_state`."""
    source = getattr(splits, method.source_split)
    steps_per_epoch = len(source) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"invalid config: batch_size={config.batch_size}; valid: at most the training "
                          f"set size {len(source)} (pretraining drops the incomplete last batch)")
    if config.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    graphdef, params, _ = network.abstract(config, method, splits.num_classes)
    schedule = optim.pretrain_lr_schedule(
        base_lr=config.learning_rate, batch_size=config.batch_size, n_epochs=config.n_epochs,
        warmup_epochs=config.warmup_epochs, steps_per_epoch=steps_per_epoch, stepping=config.lr_stepping,
        epoch0_zero_lr=config.epoch0_zero_lr, no_warmup_peak=config.no_warmup_peak)
    tx = optim.build_optimizer(config.optimiser, schedule, weight_decay=config.weight_decay, params=params,
                               lars_mode=config.lars_mode, lars_eta=config.lars_eta, momentum=config.momentum)
    if config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    classifier_tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                                optax.sgd(config.learning_rate * config.batch_size / 256))
    classifier_graphdef = (nnx.split(nnx.eval_shape(lambda: _classifier_module(config, splits.num_classes, 0)))[0]
                           if method.prototype_classifier else None)
    aug = augment.AugmentParams.from_config(config, splits.mean, splits.std)
    specs = view_specs(method, config)
    return Run(config=config, method=method, splits=splits, mesh=mesh, steps_per_epoch=steps_per_epoch,
               graphdef=graphdef, classifier_graphdef=classifier_graphdef, tx=tx, classifier_tx=classifier_tx,
               aug=aug, recipe=pipeline.Recipe.from_config(config), specs=specs, schedule=schedule,
               train_step=make_train_step(config, method, graphdef, classifier_graphdef, tx, classifier_tx,
                                          aug, specs, mesh),
               encode=features.make_encode(graphdef, aug, mesh, features.FEATURE_VIEWS[config.cluster_feature_view]))


def initial_state(run):
    """The state at step 0 from the config's seed, not yet placed on the mesh."""
    config = run.config
    _, params, batch_stats = network.create(config, run.method, run.splits.num_classes, config.seed)
    classifier_params = (_classifier(config, run.splits.num_classes, streams.network_init(config.seed))[1]
                         if run.method.prototype_classifier else {})
    return dict(params=params, batch_stats=batch_stats, opt_state=run.tx.init(params), step=jnp.int32(0),
                first_nonfinite_step=jnp.int32(-1), classifier_params=classifier_params,
                classifier_opt_state=run.classifier_tx.init(classifier_params))


def abstract_state(run):
    """`initial_state` as shapes, replicated on the run's mesh: the train step's first argument, computed by
    nothing."""
    replicated = sharding.replicated(run.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(lambda: initial_state(run)))


def batch_spec(run, batch_size):
    """The train step's second argument as shapes, sharded by rows: the host batch of `pipeline.batch_spec` and
    the step's labels (and the pairs' similarity)."""
    spec = pipeline.batch_spec(run.method.image_sets, len(run.specs), run.source.canvas_shape, batch_size)
    spec.update({f"labels_{name}": ((batch_size,), np.int32) for name in run.method.image_sets})
    if run.method.pairs:
        spec["similarity"] = ((batch_size,), np.float32)
    rows = sharding.batch_sharding(run.mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in spec.items()}


def build(config, method, splits, mesh):
    """The `Run` and its initial state on the mesh (nothing here touches the workdir)."""
    run = make_run(config, method, splits, mesh)
    return run, jax.device_put(initial_state(run), sharding.replicated(mesh))


def new_classifier(run, key):
    """A fresh prototype classifier (N(0, 0.01²) kernel, zero bias) and a fresh SGD state (DIFFERENCES.md,
    prototype classifier)."""
    params = _classifier(run.config, run.splits.num_classes, key)[1]
    return params, run.classifier_tx.init(params)


def cluster(run, state, epoch, key, *, projection=False):
    """Feature pass -> PCA-whitening -> k-means; returns pseudo labels in dataset order, statistics and,
    if asked, the first two whitened components of every example (for the `visual_cls` figure)."""
    config = run.config
    num = len(run.splits.pretrain)
    if config.feature_pass_order == "sampler":
        order = streams.sampler_order(config.seed, epoch).integers(0, num, num)
    else:
        order = np.arange(num)
    maker = features.feature_pass(run.splits.pretrain, order, config.batch_size,
                                  features.FEATURE_VIEWS[config.cluster_feature_view], run.recipe,
                                  streams.feature_views(config.seed, epoch))
    encode = lambda batch: run.encode(state["params"], state["batch_stats"], batch)  # noqa: E731
    feats, position = features.extract_features(encode, maker, run.mesh, config.num_workers)
    valid = position < num
    # Each row's example index (-1 on padding): k-means draws by it, so any device count clusters alike.
    ids = np.where(valid, order[np.minimum(position, num - 1)], -1).astype(np.int32)
    valid_device, ids_device = (sharding.to_global(sharding.host_slice(v), sharding.batch_sharding(run.mesh))
                                for v in (valid, ids))
    whitened = kmeans.preprocess_features(feats, config.pca_dim, valid=valid_device, eigen_floor=config.pca_eigen_floor)
    x = whitened.features
    result = kmeans.kmeans(x, config.num_prototypes, config.kmeans_iters, key,
                           init=config.kmeans_init, valid=valid_device, ids=ids_device)
    # Label of visit position p goes to example p: with order = arange (the default) that is the
    # visited example; with the as-written sampler order (B-3) it is a different, random one.
    pseudo = np.empty(num, np.int64)
    pseudo[position[valid]] = sharding.to_host(result.assignments)[valid]
    labels = run.splits.pretrain.labels
    labelled = labels >= 0
    stats = prototypes.clustering_stats(pseudo, config.num_prototypes, float(result.inertia))
    stats["pca_floored"] = int(whitened.floored)
    if labelled.any():
        agreement = prototypes.clustering_stats(pseudo[labelled], config.num_prototypes, 0.0, labels[labelled])
        stats.update(nmi=agreement["nmi"], ari=agreement["ari"])
    points = None
    if projection:
        points = np.empty((num, 2), np.float32)
        points[position[valid]] = sharding.to_host(x[:, :2])[valid]
    return pseudo, stats, points


def epoch_plan(run, epoch, pseudo):
    """Global index batches of one epoch: {images_a, [images_b, similarity]} index arrays (steps, B)."""
    config, source = run.config, run.source
    steps, batch = run.steps_per_epoch, config.batch_size
    if run.method.pairs:
        # As written (B-2) the pairs come from the ground-truth class buckets while the cluster is drawn
        # from [0, K): only classes below K are used (the original fails on the others when K > classes).
        buckets = pseudo if config.rebuild_member_table else np.where(source.labels < config.num_prototypes,
                                                                      source.labels, -1)
        try:
            idx_a, idx_b, similarity = prototypes.pair_plan(
                buckets, config.num_prototypes, num_steps=steps, batch_size=batch, seed=config.seed, epoch=epoch,
                mode=config.pair_sampling)
        except prototypes.NoPairsError as e:
            raise DivergedError(f"epoch {epoch + 1} has no pairs to train on ({e}): the features collapsed into too "
                                "few prototypes; lower learning_rate or set grad_clip_norm, then resume from an "
                                f"earlier checkpoint with {SAME_COMMAND} and that change") from e
        return {"a": idx_a, "b": idx_b, "similarity": similarity}
    order = data.epoch_order(source.labels, streams.epoch_order(config.seed, epoch), config.pretrain_sampling)
    order = order[:steps * batch]
    return {"a": order.reshape(steps, batch)}


def epoch_pass(run, epoch, plan):
    """This host's `BatchMaker` of an epoch's training steps (its columns of the global plan)."""
    sets = {name: plan[name] for name in ("a", "b") if name in plan}
    return pipeline.make_pass(run.source, sets, run.specs, run.recipe,
                              streams.train_views(run.config.seed, epoch), jax.process_index(), jax.process_count())


def make_batch(run, plan, maker, step_in_epoch, host_batch, pseudo):
    """Global arrays sharded by rows from this host's loaded batch and the labels of one step."""
    labels = pseudo if run.method.clustering else run.source.labels
    batch = dict(host_batch)
    for name, indices in maker.sets.items():
        batch[f"labels_{name}"] = labels[indices[step_in_epoch]].astype(np.int32)
    if "similarity" in plan:
        similarity = sharding.host_slice(plan["similarity"], axis=1)
        batch["similarity"] = similarity[step_in_epoch].astype(np.float32)
    return sharding.to_global(batch, sharding.batch_sharding(run.mesh))


def load_batch(run, epoch, plan, step_in_epoch, pseudo):
    """One step's batch, loaded synchronously (tests and tools; the trainer loads ahead)."""
    maker = epoch_pass(run, epoch, plan)
    return make_batch(run, plan, maker, step_in_epoch, maker(step_in_epoch), pseudo)


class Patience:
    """The original's patience counter: epochs since the train loss last improved (logged, never stops)."""

    def __init__(self):
        self.best, self.count = float("inf"), 0

    def update(self, loss):
        self.best, self.count = (loss, 0) if loss < self.best else (self.best, self.count + 1)


def check_step_fits(config, method, mesh):
    """Raises ConfigError (`fit.check_memory`: the bytes needed and available, the remedies) when the training step
    of `config` on `mesh`, compiled from shapes alone before the data is loaded, cannot fit a device's memory.
    CPUs skip it. The compiled step lands in the compilation cache: the run does not compile it twice."""
    device = mesh.devices.flat[0]
    available = fit.device_memory(device)
    if available is None:
        return
    run = make_run(config, method, Sizes.for_step(config).splits(config.dataset), mesh)
    compiled = run.train_step.lower(abstract_state(run), batch_spec(run, config.batch_size)).compile()
    fit.check_memory(compiled.memory_analysis(), available, config, device, mesh.devices.size)


def train_and_evaluate(config, workdir):
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
    start_step = int(state["step"])
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
    monitor = evaluate.Evaluator(config, splits, run.graphdef, run.mesh) if config.knn_every_epochs else None
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
            summary.update(monitor.knn_monitor(state["params"], state["batch_stats"]))
        loop.writer.write(int(state["step"]), epoch, summary)
        logging.info("epoch %d/%d: loss %.4f (%s), lr %.4g, %.1f s, %d epochs without improvement (patience %d)%s, "
                     "ETA %s",
                     epoch + 1, config.n_epochs, epoch_means["train/loss"],
                     ", ".join(f"{k.removeprefix('train/loss_')} {v:.4f}" for k, v in epoch_means.items()
                               if k.startswith("train/loss_")),
                     epoch_means["train/lr"], time.time() - began, patience.count, config.patience,
                     "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("knn_monitor/")),
                     loop.pace.eta(int(state["step"])))
    step = int(state["step"])
    if loop.manager.stop_requested():  # a signal after the last step: pretraining is saved, say so and stop
        loop.manager.close()
        raise checkpoint.Preempted(loop.manager.stop_signal, step, evaluating=config.evaluate_after_pretrain)
    loop.manager.close()  # last save complete; Ctrl-C and SIGTERM act at once again during evaluation
    results = {}
    if config.evaluate_after_pretrain:
        with checkpoint.stop_at_once_on_sigterm(step):
            results = evaluate.after_pretraining(run, state, loop.writer)
    loop.writer.close()
    if is_main:
        write_summary(run, step, results, workdir)
    return state, results


def log_start(run, workdir):
    """What runs where: processes and devices, the method and data (how many images pretraining uses and why),
    the batch split, the input, the lr."""
    config = run.config
    logging.info("process %d of %d with %d of %d devices; workdir %s (the same options with --workdir=%s resume "
                 "this run)", jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 workdir, workdir)
    logging.info("method=%s dataset=%s pretrain=%d examples; global batch %d = %d per host x %d hosts "
                 "= %d per device x %d devices; %d steps per epoch (incomplete last batch dropped)",
                 run.method.name, config.dataset, len(run.splits.pretrain), config.batch_size,
                 config.batch_size // jax.process_count(), jax.process_count(),
                 config.batch_size // jax.device_count(), jax.device_count(), run.steps_per_epoch)
    logging.info("%s", run.splits.pretrain_summary)
    logging.info("input: %s", pipeline.describe_workers(config.num_workers, run.source))
    peak_epoch = config.warmup_epochs - 1 if config.warmup_epochs else 0
    logging.info("learning rate: peak %.4g (epoch %d of %d; %d warmup epochs, cosine after), prototype classifier "
                 "SGD %.4g", float(run.schedule(jnp.int32(peak_epoch * run.steps_per_epoch))), peak_epoch + 1,
                 config.n_epochs, config.warmup_epochs, config.learning_rate * config.batch_size / 256)


def write_summary(run, step, results, workdir):
    """`figs/losses.png` from metrics.jsonl and, after an evaluation, `results.json` and `results.md`."""
    os.makedirs(os.path.join(workdir, "figs"), exist_ok=True)
    visual.save_png(visual.losses_figure(read_metrics(workdir)), os.path.join(workdir, "figs", "losses.png"))
    if results:
        evaluate.write_results(workdir, results, run.config, run.method.name, step)


def start_epoch(loop, state, pseudo, epoch):
    """Re-clustering (every `reassign` epochs) and classifier re-initialisation (every `classifier_init_freq`)."""
    run, writer = loop.run, loop.writer
    config = run.config
    step = int(state["step"])
    if run.method.clustering and (epoch % config.reassign == 0 or pseudo is None):
        clustering = progress.Announcement(f"epoch {epoch + 1}: clustering {len(run.splits.pretrain):,} examples")
        draw = config.visual_cls and epoch % config.visual_freq == 0
        pseudo, stats, points = cluster(run, state, epoch, streams.kmeans_key(config.seed, epoch), projection=draw)
        stats = {f"kmeans/{k}": v for k, v in stats.items()}
        stats["kmeans/seconds"] = clustering.seconds
        loop.pace.clustered(stats["kmeans/seconds"])
        writer.write(step, epoch, stats)
        clustering.done(f"epoch {epoch + 1}: clustered", ": " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if draw and jax.process_index() == 0:
            shown = streams.figure_subset(config.seed).permutation(len(pseudo))[:VISUAL_POINTS]
            image = visual.cluster_figure(points[shown], pseudo[shown], run.splits.pretrain.labels[shown], epoch + 1)
            os.makedirs(os.path.join(loop.workdir, "figs"), exist_ok=True)
            visual.save_png(image, os.path.join(loop.workdir, "figs", f"prototypes_epoch_{epoch + 1}.png"))
            writer.write_image(step, "prototypes/pca_by_pseudo_label", image)
    if run.method.prototype_classifier and epoch % config.classifier_init_freq == 0:
        params, opt_state = new_classifier(run, streams.classifier_init(config.seed, epoch))
        state = dict(state, **jax.device_put(dict(classifier_params=params, classifier_opt_state=opt_state),
                                            sharding.replicated(run.mesh)))
        writer.write(step, epoch, {"prototypes/classifier_reinitialised": 1})
    return state, pseudo


def train_step(loop, state, batch):
    """`run.train_step`. This process's first call compiles it: announced and timed, waiting for its result."""
    if loop.pace.started:
        return loop.run.train_step(state, batch)
    compiling = progress.Announcement("compiling the training step")
    state, metrics = loop.run.train_step(state, batch)
    state["step"].block_until_ready()
    compiling.done("compiled", " (its first step included)")
    loop.pace.start(int(state["step"]))
    return state, metrics


def run_epoch(loop, state, pseudo, epoch, first_step):
    """The steps of `epoch` from `first_step` on; (state, the epoch's mean metrics)."""
    run, manager = loop.run, loop.manager
    config = run.config
    plan = epoch_plan(run, epoch, pseudo)
    maker = epoch_pass(run, epoch, plan)
    totals, count, last_time, last_step, last_wait = {}, 0, time.time(), int(state["step"]), 0.0
    epoch_sums, epoch_count = {}, 0
    bar = progress.Bar(epoch, config.n_epochs, run.steps_per_epoch, first_step, loop.pace,
                       enabled=jax.process_index() == 0)
    with bar, pipeline.Loader(maker, num_workers=config.num_workers, start=first_step) as loader:
        for i, host_batch in zip(range(first_step, run.steps_per_epoch), loader):
            step = epoch * run.steps_per_epoch + i
            state, metrics = train_step(loop, state, make_batch(run, plan, maker, i, host_batch, pseudo))
            bar.dispatched(metrics["train/loss"])  # not state["step"]: the next step donates the state
            if step == 0:
                loop.guard.first_step(metrics)
            totals = jax.tree.map(jnp.add, totals, metrics) if totals else metrics
            count += 1
            last = i == run.steps_per_epoch - 1
            save_due = config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0 and not last
            logged = (step + 1) % config.log_every_steps == 0 or last or save_due  # every save is checked first
            stop = manager.stop_requested(agree=logged)  # multi-process runs stop at the next logged step
            if logged or stop:
                sums = {k: float(v) for k, v in totals.items()}
                epoch_sums = {k: epoch_sums.get(k, 0.0) + v for k, v in sums.items()}
                epoch_count += count
                means = {k: v / count for k, v in sums.items()}
                now = time.time()
                means["train/lr"] = float(run.schedule(jnp.int32(step)))
                means["train/images_per_sec"] = ((step + 1 - last_step) * config.batch_size * len(run.specs)
                                                 / max(now - last_time, 1e-9))
                means["data/wait_fraction"] = min((loader.wait_seconds - last_wait) / max(now - last_time, 1e-9), 1.0)
                loop.guard.check(state, means, step, last_step, manager)
                write_or_save(loop, state, pseudo, step + 1, epoch, means)
                warn_if_waiting(loop, means["data/wait_fraction"])
                bar.logged(means["train/loss"], means["train/lr"], means["train/images_per_sec"])
                totals, count, last_time, last_step, last_wait = {}, 0, now, step + 1, loader.wait_seconds
            if save_due:
                manager.save(state, pseudo, epoch_end=False)
            if stop:
                manager.save(state, pseudo, epoch_end=False)
                manager.close()
                raise checkpoint.Preempted(manager.stop_signal, step + 1)
    epoch_means = {k: v / max(epoch_count, 1) for k, v in epoch_sums.items()}
    epoch_means["train/lr"] = float(run.schedule(jnp.int32(epoch * run.steps_per_epoch)))
    return state, epoch_means


def write_or_save(loop, state, pseudo, step, epoch, scalars):
    """`writer.write`; when that fails (disk full), the state is saved if it can be and the run stops."""
    try:
        loop.writer.write(step, epoch, scalars)
    except OSError as e:
        try:
            loop.manager.save(state, pseudo, epoch_end=False)
            loop.manager.close()
            kept = f"the checkpoint of step {int(state['step'])} was saved"
        except UserError:
            kept = "no checkpoint could be saved either (the newest left is intact)"
        raise WorkdirError(f"writing {loop.writer.path} failed ({e.strerror or e}); {kept}: free disk space, then "
                           f"to resume, run {SAME_COMMAND}") from e


def warn_if_waiting(loop, wait_fraction):
    """Once per run, when the steps spend more than WAIT_WARNING of their time waiting for data."""
    if wait_fraction <= WAIT_WARNING or loop.warned_waiting:
        return
    loop.warned_waiting = True
    source = loop.run.source
    if source.in_memory:
        advice = "the data is in memory and gathered in the main process: is the CPU shared with other jobs?"
    else:
        advice = (f"raise --config.num_workers (now {pipeline.worker_count(loop.run.config.num_workers, source)}), "
                  "or train from records written by `python -m spcl_jax.data.prepare ... --out` (5x cheaper to decode)")
    logging.warning("the training steps waited for input data %.0f%% of the time: %s", 100 * wait_fraction, advice)


def run_mode(config, workdir):
    """What `launch.py` calls: pretraining or, for `mode=linear_eval|knn_eval`, evaluation of a checkpoint."""
    if methods.pretrains(config):
        return train_and_evaluate(config, workdir)
    return evaluate.evaluate_checkpoint(config, workdir)
