"""Linear and kNN evaluation of a frozen encoder (BatchNorm in eval mode), after pretraining or from a
checkpoint. Accuracies are weighted by sample (DIFFERENCES.md, B-17); top-k uses k = min(ceil(C/2), 5) as the original.

Protocols: `fast` trains the linear head on features computed once (seconds); `original` (DIFFERENCES.md, linear evaluation and D-3)
passes random-resized-crop + flip views through the frozen encoder every epoch. With a valid split
the head is also scored on it after every epoch and the best-valid epoch's head is reported beside the
last one. `Evaluator.knn_monitor` is the cheap kNN-only check run during pretraining (`knn_every_epochs`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from spcl_jax import augment, checkpoint, features, models, network, optim, probes, progress, sharding, startup
from spcl_jax import storage, streams, visual
from spcl_jax import method as methods
from spcl_jax.data import pipeline
from spcl_jax.metrics import MetricWriter, read_metrics
from spcl_jax.storage import write_atomic
from spcl_jax.workdir import claim_workdir

if TYPE_CHECKING:
    from spcl_jax.data.datasets import Splits
    from spcl_jax.train_state import TrainState


def _head_optimiser(evaluation, steps_per_epoch, params):
    schedule = optim.finetune_lr_schedule(base_lr=evaluation.learning_rate, batch_size=evaluation.batch_size,
                                          epochs=evaluation.epochs, steps_per_epoch=steps_per_epoch)
    return optim.build_optimiser(evaluation.optimiser, schedule, weight_decay=evaluation.weight_decay,
                                 params=params, lars_mode=evaluation.lars_mode, lars_eta=evaluation.lars_eta,
                                 momentum=evaluation.momentum)


def epoch_orders(evaluation: probes.Evaluation, seed: int, num_examples: int,
                 granularity: int = 1) -> tuple[int, Iterator[np.ndarray]]:
    """The linear head's global batch size and, per epoch, its (steps, batch) plan of a fresh permutation.

    The batch is `finetune_batch_size`, or the largest multiple of `granularity` that fits a smaller set.
    """
    batch = min(evaluation.batch_size, num_examples // granularity * granularity)
    steps = num_examples // batch
    rng = streams.linear_head_orders(seed)
    return batch, (rng.permutation(num_examples)[:steps * batch].reshape(steps, batch)
                   for _ in range(evaluation.epochs))


def make_head_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   embed: Callable[[Any, Any], jax.Array]) -> jax.stages.Wrapped:
    """jit((params, opt_state, encoder, inputs, labels) -> (params, opt_state)): one step of the linear head on
    `embed(encoder, inputs)` (cached features, or image batches through the frozen encoder `encoder`)."""

    @jax.jit
    def step(params: Any, opt_state: Any, encoder: Any, inputs: Any, y: jax.Array) -> tuple[Any, Any]:
        feats = embed(encoder, inputs)

        def loss_fn(p: Any) -> jax.Array:
            logits = nnx.merge(graphdef, p)(feats)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def linear_head(evaluation: probes.Evaluation, steps_per_epoch: int, dim: int, num_classes: int,
                key: jax.Array) -> tuple[nnx.GraphDef, nnx.State, optax.GradientTransformation]:
    """(graphdef, params, optimiser) of a fresh Linear D->C head and its SGD/LARS with the cosine schedule."""
    graphdef, params = nnx.split(models.LinearHead(dim, num_classes, rngs=nnx.Rngs(key)))
    return graphdef, params, _head_optimiser(evaluation, steps_per_epoch, params)


def linear_head_epochs(evaluation: probes.Evaluation, embed: Callable[[Any, Any], jax.Array],
                       epoch_batches: Iterable[Iterable[tuple[Any, Any]]], steps_per_epoch: int, dim: int,
                       num_classes: int, key: jax.Array,
                       encoder: tuple[Any, Any] | None = None) -> Iterator[models.LinearHead]:
    """SGD/LARS on a Linear D->C head, `finetune_epochs` epochs, cosine per epoch; yields the head
    after every epoch (nothing when finetune_epochs=0).

    `epoch_batches` yields, per epoch, that epoch's (inputs, labels) batches; `embed(encoder, inputs)` maps
    inputs (cached features, or image batches for the original protocol) to features.
    """
    graphdef, params, tx = linear_head(evaluation, steps_per_epoch, dim, num_classes, key)
    step = make_head_step(graphdef, tx, embed)
    opt_state = tx.init(params)
    for batches in epoch_batches:
        for inputs, labels in batches:
            params, opt_state = step(params, opt_state, encoder, inputs, labels)
        yield nnx.merge(graphdef, params)


def cached_features(encoder: Any, features: jax.Array) -> jax.Array:
    """The fast protocol's embedding: the features were computed once, before the head's epochs."""
    return features


class HeadChoice(NamedTuple):
    """The last head, the head of the best-scoring epoch (0-based `best_epoch`) and every epoch's score."""
    last: object
    best: object
    best_epoch: int
    scores: list


def choose_heads(heads: Iterable[Any], score: Callable[[Any], float] | None = None) -> HeadChoice:
    """The last of `heads` and, given `score(head) -> float`, the first one of the highest score."""
    last, best, best_epoch, scores = None, None, -1, []
    for epoch, head in enumerate(heads):
        last = head
        if score is not None:
            scores.append(score(head))
            if scores[-1] > max(scores[:-1], default=-np.inf):
                best, best_epoch = head, epoch
    return HeadChoice(last, best, best_epoch, scores)


@nnx.jit
def _logits(head, x):
    return head(x)


def top1_scorer(x: np.ndarray, labels: np.ndarray, batch_size: int | None = None) -> Callable[[nnx.Module], float]:
    """score(head) -> top-1 of `head` on fixed features `x` (put on the device once), weighted as
    `accuracies` and from the same jitted logits, so that the best-scoring head reports that score."""
    x, labels = jnp.asarray(x), np.asarray(labels)
    return lambda head: probes.weighted_mean(np.argmax(np.asarray(_logits(head, x)), axis=1) == labels, batch_size)


def eval_sets(splits: Splits) -> list[tuple[str, Any]]:
    """(name, source) of the non-empty evaluation splits: valid (if any), then test."""
    return [(name, source) for name, source in (("valid", splits.valid), ("test", splits.test))
            if source is not None and len(source)]


class Evaluator:
    """Frozen-encoder features of every evaluation split, and the linear/kNN classifiers on them."""

    def __init__(self, parts: startup.Parts, splits: Splits, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh):
        """`parts`: the run's `startup.Parts` (its evaluation settings, augmentation, crops, seed and workers)."""
        self.parts, self.evaluation, self.splits, self.mesh = parts, parts.evaluation, splits, mesh
        self.encode = features.make_encode(graphdef, parts.augment, mesh, "eval")
        self.graphdef = graphdef
        # As written (B-17) accuracies are means of per-batch means, over loaders of `batch_size` each.
        self.per_batch = parts.training.batch_size if self.evaluation.metric_weighting == "batch" else None

    def features(self, params: Any, batch_stats: Any, source: Any) -> np.ndarray:
        fn = lambda batch: self.encode(params, batch_stats, batch)  # noqa: E731
        return features.features_in_order(fn, source, self.evaluation.batch_size, self.mesh, self.parts.recipe,
                                          self.parts.num_workers)

    def _knn(self, train_x, x, labels, k):
        scores = probes.knn_predict(train_x, self.splits.train.labels, x, self.splits.num_classes,
                                    self.evaluation.knn_k, self.evaluation.knn_temperature, mesh=self.mesh)
        return probes.accuracies(scores, labels, k, self.per_batch)

    def on_mesh(self, params: Any, batch_stats: Any) -> tuple[Any, Any]:
        """The encoder's parameters and statistics replicated on the evaluation's mesh."""
        return jax.device_put((params, batch_stats), sharding.replicated(self.mesh))

    def run(self, params: Any, batch_stats: Any, prefix: str = "", linear: bool = True) -> dict[str, float]:
        """{'linear_eval/<split>_top1', ..._top<k>, 'knn/<split>_top1', ...} for valid and test.

        With a valid split the head is scored on valid after every finetune epoch and the head of the
        best valid top-1 is reported too: 'linear_eval/best_epoch_<split>_top1' (the head of the best epoch), ..._top<k> and
        'linear_eval/best_epoch' (1..finetune_epochs); the plain keys are the last epoch's.
        """
        k = probes.top_k(self.splits.num_classes)
        params, batch_stats = self.on_mesh(params, batch_stats)
        train_x = self.features(params, batch_stats, self.splits.train)
        sets = [(name, self.features(params, batch_stats, source), source.labels)
                for name, source in eval_sets(self.splits)]
        results = {}
        choice = self._linear_heads(params, batch_stats, train_x, sets) if linear else HeadChoice(None, None, -1, [])
        for tag, head in (("", choice.last), ("best_epoch_", choice.best)):
            for name, x, labels in sets:
                if head is not None:
                    top1, topk = probes.accuracies(np.asarray(_logits(head, jnp.asarray(x))), labels, k,
                                                   self.per_batch)
                    results[f"linear_eval/{prefix}{tag}{name}_top1"] = top1
                    results[f"linear_eval/{prefix}{tag}{name}_top{k}"] = topk
        if choice.best is not None:
            results[f"linear_eval/{prefix}best_epoch"] = choice.best_epoch + 1
        for name, x, labels in sets:
            results[f"knn/{prefix}{name}_top1"], results[f"knn/{prefix}{name}_top{k}"] = self._knn(
                train_x, x, labels, k)
        return results

    def _linear_heads(self, params, batch_stats, train_x, sets):
        """The linear heads of the configured protocol, scored on the cached valid features if any."""
        evaluation, splits, seed = self.evaluation, self.splits, self.parts.seed
        key = streams.linear_head_init(seed)
        labels = splits.train.labels
        if evaluation.protocol == "fast":
            batch, orders = epoch_orders(evaluation, seed, len(labels))
            epochs = (((train_x[idx], labels[idx]) for idx in order) for order in orders)
            heads = linear_head_epochs(evaluation, cached_features, epochs, len(labels) // batch, train_x.shape[1],
                                       splits.num_classes, key)
        else:
            batch, orders = epoch_orders(evaluation, seed, len(labels), jax.device_count())
            heads = linear_head_epochs(evaluation, self.augmented_embed, self._augmented_epochs(orders),
                                       len(labels) // batch, train_x.shape[1], splits.num_classes, key,
                                       encoder=(params, batch_stats))
        valid = [top1_scorer(x, labels, self.per_batch) for name, x, labels in sets if name == "valid"]
        return choose_heads(heads, valid[0] if valid else None)

    def knn_monitor(self, params: Any, batch_stats: Any) -> dict[str, float]:
        """{'knn_monitor/<split>_top1'}: kNN top-1 of the current encoder on valid (test without one)."""
        params, batch_stats = self.on_mesh(params, batch_stats)
        name, source = eval_sets(self.splits)[0]
        top1, _ = self._knn(self.features(params, batch_stats, self.splits.train),
                            self.features(params, batch_stats, source), source.labels, 1)
        return {f"knn_monitor/{name}_top1": top1}

    def augmented_embed(self, encoder: tuple[Any, Any], batch: dict[str, jax.Array]) -> jax.Array:
        """Features of the frozen encoder (params, batch_stats) on a batch's train views (original protocol)."""
        net = nnx.merge(self.graphdef, *encoder, copy=True)
        net.encoder.eval()
        return jax.lax.stop_gradient(net.encoder(augment.views(batch, (("a", "train"),), self.parts.augment)[0]))

    def _augmented_epochs(self, orders):
        """Per epoch, its (global batch of train views, labels) through the input pipeline."""
        train, batch_sh = self.splits.train, sharding.batch_sharding(self.mesh)
        for epoch, order in enumerate(orders):
            maker = pipeline.make_pass(train, {"a": order}, (("a", "train"),), self.parts.recipe,
                                       streams.linear_eval_views(self.parts.seed, epoch), jax.process_index(),
                                       jax.process_count())
            with pipeline.Loader(maker, num_workers=self.parts.num_workers) as loader:
                yield (sharding.to_global((host_batch, train.labels[indices].astype(np.int32)), batch_sh)
                       for host_batch, indices in zip(loader, maker.sets["a"]))


def report(results: dict[str, float], writer: MetricWriter, step: int, epoch: int,
           evaluation: probes.Evaluation) -> None:
    writer.write(step, epoch, results)
    if jax.process_index() == 0 and results:
        width = max(len(k) for k in results)
        used = {key.split("/")[0] for key in results}
        lines = [f"{family}: {how}" for family, how in protocols(evaluation).items() if family in used] + [
            f"{'metric':<{width}}  value"] + [
            f"{k:<{width}}  {v:6d}" if isinstance(v, int) else f"{k:<{width}}  {100 * v:6.2f}%"
            for k, v in results.items()]
        progress.show("\n".join(lines))


def protocols(evaluation: probes.Evaluation) -> dict[str, str]:
    """{metric family: how its numbers were measured}, so that every reported accuracy names its protocol."""
    weighting = "per batch" if evaluation.metric_weighting == "batch" else "per sample"
    epochs = f"{evaluation.epochs} epoch{'' if evaluation.epochs == 1 else 's'}"
    return {"linear_eval": f"linear probe on the frozen encoder (BatchNorm in eval mode), linear_eval_protocol="
                           f"{evaluation.protocol}, {epochs}, accuracy {weighting}",
            "knn": f"weighted kNN on L2-normalised frozen features, k={evaluation.knn_k}, "
                   f"T={evaluation.knn_temperature}, "
                   f"accuracy {weighting}",
            "disent": "the original's eval_disent: StandardScaler + RBF SVC on a random contiguous half of the "
                      "frozen features, mean accuracy of 10 runs"}


def results_summary(results: dict[str, float], config: ml_collections.ConfigDict, method: str,
                    step: int) -> dict[str, Any]:
    """The final results as saved in results.json: the run (dataset, method, model, step), the protocols,
    {metric: value} as `report` prints them (fractions, epochs as ints) and the resolved config."""
    return {"dataset": config.dataset, "method": method, "model": config.model, "step": int(step),
            "epochs": config.n_epochs, "linear_eval_protocol": config.linear_eval_protocol,
            "protocols": protocols(startup.evaluation(config)),
            "metrics": {k: v if isinstance(v, int) else float(v) for k, v in results.items()},
            "config": checkpoint.resolved_config(config, methods.METHODS[method])}


def finished_results(workdir: str, config: ml_collections.ConfigDict, method: methods.Method,
                     step: int) -> dict[str, Any] | None:
    """The summary in `<workdir>/results.json` if it is of this step and this config (a finished command run
    again), else None."""
    try:
        summary = json.loads(storage.read_text(storage.join(workdir, "results.json")))
    except (OSError, ValueError):
        return None
    same = summary.get("step") == step and summary.get("config") == checkpoint.resolved_config(config, method)
    return summary if same else None


def show_results(summary: dict[str, Any], workdir: str) -> None:
    """The results table of a finished evaluation (as results.md holds it) and where it is."""
    progress.show(results_markdown(summary).rstrip("\n") + f"\n(in {storage.join(workdir, 'results.md')}; delete "
                  "results.json there to evaluate again)")


def default_workdir(config: ml_collections.ConfigDict) -> str:
    """Where an evaluation of a saved encoder writes by default: next to the run it evaluates,
    `<run workdir>/eval/<linear_eval|knn_eval|finetune|eval_disent>`."""
    kind = "eval_disent" if config.eval_disent else "finetune" if config.finetune else config.mode
    return storage.join(storage.parent(config.load_checkpoint_dir.rstrip(os.sep)), "eval", kind)


def results_markdown(summary: dict[str, Any]) -> str:
    """results.md: one table row per metric with its value (accuracies in %), encoder and protocol."""
    lines = [f"# {summary['method']} on {summary['dataset']} ({summary['model']}): results at step {summary['step']} "
             f"(epoch {summary['epochs']})", "", "| metric | value | encoder | protocol |", "|---|---:|---|---|"]
    for key, value in summary["metrics"].items():
        shown = f"{value}" if isinstance(value, int) else f"{100 * value:.2f}%"
        encoder = "random initialisation" if "/random_init_" in key else "trained"
        lines.append(f"| `{key}` | {shown} | {encoder} | {summary['protocols'][key.split('/')[0]]} |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict[str, float], config: ml_collections.ConfigDict, method: str,
                  step: int) -> None:
    """`<workdir>/results.json` and `results.md` of the final evaluation, each written atomically."""
    summary = results_summary(results, config, method, step)
    write_atomic(storage.join(workdir, "results.json"),
                 lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))
    write_atomic(storage.join(workdir, "results.md"), lambda f: f.write(results_markdown(summary).encode()))


def write_summary(workdir: str, results: dict[str, float], config: ml_collections.ConfigDict, method: str,
                  step: int) -> None:
    """`figs/losses.png` from metrics.jsonl and, after an evaluation, `results.json` and `results.md`."""
    storage.makedirs(storage.join(workdir, "figs"))
    visual.save_png(visual.losses_figure(read_metrics(workdir)), storage.join(workdir, "figs", "losses.png"))
    if results:
        write_results(workdir, results, config, method, step)


def after_pretraining(run: Any, state: TrainState, writer: MetricWriter) -> dict[str, float]:  # train.Run
    """Linear + kNN evaluation of the trained encoder (and, if configured, of its random init)."""
    parts = run.parts
    evaluator = Evaluator(parts, run.splits, run.graphdef, run.mesh)
    results = evaluator.run(state.params, state.batch_stats)
    if parts.evaluation.random_init_baseline:
        _, params, batch_stats = network.create(parts.architecture, run.method, run.splits.num_classes, parts.seed)
        results.update(evaluator.run(params, batch_stats, prefix="random_init_"))
    report(results, writer, int(state.step), parts.training.n_epochs - 1, parts.evaluation)  # after the last epoch
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """`mode=linear_eval|knn_eval` (or the original's `finetune`): evaluate a saved encoder."""
    config, method, splits = startup.prepare(config, jax.device_count(), pretrain=False)
    parts = startup.parts(config, method, splits)
    mesh = sharding.data_mesh()
    graphdef, params, batch_stats, step = network.restore(parts.architecture, method, splits.num_classes, parts.seed,
                                                          config.load_checkpoint_dir, config.checkpoint_step)
    finished = finished_results(workdir, config, method, step)
    if finished:
        logging.info("%s already holds this evaluation of step %d of %s:", workdir, step, config.load_checkpoint_dir)
        show_results(finished, workdir)
        return finished["metrics"]
    if jax.process_index() == 0:
        claim_workdir(workdir)
        progress.log_to_file(workdir)
        checkpoint.write_config_json(workdir, config, method)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    logging.info("evaluating the encoder of step %d from %s; output in %s", step, config.load_checkpoint_dir, workdir)
    evaluator = Evaluator(parts, splits, graphdef, mesh)
    if config.eval_disent:
        params, batch_stats = evaluator.on_mesh(params, batch_stats)
        sets = {name: (evaluator.features(params, batch_stats, source), source.labels)
                for name, source in eval_sets(splits)}
        results = probes.disentanglement_probe(evaluator.features(params, batch_stats, splits.train),
                                               splits.train.labels, sets, streams.disentanglement_probe(config.seed),
                                               limit=32 if config.debug else None)
    else:
        results = evaluator.run(params, batch_stats, linear=config.mode != "knn_eval")
    report(results, writer, step, 0, parts.evaluation)
    writer.close()
    if jax.process_index() == 0:
        write_results(workdir, results, config, method.name, step)
    return results
