"""The start-up sequence of every command that runs on data (training, evaluating a checkpoint, the dry run): the
method resolved once, the data loaded, the config fitted to it and the sizes checked against it; then the config
resolved into the typed `Parts` that everything below train.py and evaluate.py takes instead of the ConfigDict.
"""
import dataclasses
from collections.abc import Callable, Sequence

import ml_collections
from absl import logging

from spcl_jax import augment, config_validation, data, models, optim, probes
from spcl_jax.clustering import Clustering
from spcl_jax.data import crops, datasets, pipeline
from spcl_jax.data.sizes import Sizes
from spcl_jax.errors import DataError
from spcl_jax.method import Method
from spcl_jax.network import prototype_classifier_width
from spcl_jax.objective import Objective


def prepare(config: ml_collections.ConfigDict, device_count: int, pretrain: bool = True,
            check_step: Callable | None = None) -> tuple[ml_collections.ConfigDict, Method, "data.Splits"]:
    """(config fitted to the data, method, splits).

    pretrain: also check the pretrain split's size against the config (training and the dry run do).
    check_step(config, method): a check of the training step to run before the data is loaded, or, when
    `infer_from_data` lets the data still change the config, once the config was fitted to it.
    """
    method = config_validation.method_of(config)
    if check_step and not config.infer_from_data:
        check_step(config, method)
    splits = data.load_splits(data_spec(config))
    config = _fit(config, splits, device_count, pretrain)
    if check_step and config.infer_from_data:
        check_step(config, method)
    return config, method, splits


def prepare_plan(config: ml_collections.ConfigDict, device_count: int,
                 num_examples: int | None = None) -> tuple[ml_collections.ConfigDict, Method, Sizes]:
    """(config fitted to the data, method, `Sizes`) for planning a run: from the data when it is here (and
    `num_examples` is not given), else from the dataset's nominal sizes (`num_examples` pretraining images)."""
    spec, splits, nominal = data_spec(config), None, True
    if num_examples is None:
        try:
            splits, nominal = data.load_splits(spec), False
        except DataError as e:
            logging.info("the data is not here (%s): planning with the dataset's nominal sizes", e)
    if splits is None:
        splits = data.load_splits(spec, data.nominal_pool(spec, num_examples))
    fitted = _fit(config, splits, device_count, pretrain=True)
    return fitted, config_validation.method_of(config), Sizes.of(splits, nominal)


def _fit(config, splits, device_count, pretrain):
    """The config fitted to `splits`, their sizes checked against it."""
    config = config_validation.fit_to_data(config, splits, device_count)
    if pretrain:
        config_validation.check_pretrain_size(config, len(splits.pretrain))
    config_validation.check_eval_size(config, len(splits.train), device_count)
    return config


@dataclasses.dataclass(frozen=True)
class Training:
    """The pretraining loop: epochs, global batch, the steps' limit per epoch, logging and checkpoint cadence,
    the divergence and patience watch, the kNN monitor, evaluation after pretraining and the epoch order's
    sampling (config keys of the same names)."""

    n_epochs: int
    batch_size: int
    max_steps_per_epoch: int
    log_every_steps: int
    checkpoint_every_steps: int
    divergence_factor: float
    patience: int
    knn_every_epochs: int
    evaluate_after_pretrain: bool
    pretrain_sampling: str


@dataclasses.dataclass(frozen=True)
class Parts:
    """A run's config resolved once, after it was fitted to the data: what each part of the code needs, typed."""

    method: Method
    dataset: str
    seed: int
    num_workers: int
    training: Training
    architecture: models.Architecture
    objective: Objective
    clustering: Clustering
    optimisation: optim.Optimisation
    evaluation: probes.Evaluation
    augment: augment.AugmentParams
    recipe: pipeline.Recipe

    def with_step(self, batch_size: int | None = None, remat: str | None = None) -> "Parts":
        """These parts with another global batch or remat setting (the planner's search), where given."""
        training = self.training if batch_size is None else dataclasses.replace(self.training, batch_size=batch_size)
        architecture = self.architecture if remat is None else dataclasses.replace(self.architecture, remat=remat)
        return dataclasses.replace(self, training=training, architecture=architecture)


def _fields(cls, config, renamed=None, **values):
    """An instance of the dataclass `cls`: `values` given, the other fields from the config keys of their names, or
    of `renamed[field]`."""
    renamed = renamed or {}
    return cls(**{f.name: values[f.name] if f.name in values else config[renamed.get(f.name, f.name)]
                  for f in dataclasses.fields(cls)})


def data_spec(config: ml_collections.ConfigDict) -> datasets.DataSpec:
    return _fields(datasets.DataSpec, config)


def architecture(config: ml_collections.ConfigDict) -> models.Architecture:
    return _fields(models.Architecture, config)


def evaluation(config: ml_collections.ConfigDict) -> probes.Evaluation:
    return _fields(probes.Evaluation, config, {
        "protocol": "linear_eval_protocol", "epochs": "finetune_epochs", "batch_size": "finetune_batch_size",
        "learning_rate": "finetune_learning_rate", "weight_decay": "finetune_weight_decay",
        "optimiser": "finetune_optimiser", "metric_weighting": "eval_metric_weighting",
        "random_init_baseline": "eval_random_init_baseline"})


def augment_params(config: ml_collections.ConfigDict, mean: Sequence[float],
                   std: Sequence[float]) -> augment.AugmentParams:
    """The dataset's augmentation (DIFFERENCES.md, augmentation recipes): jitter strengths (0.8d, 0.8d, 0.8d, 0.2d)."""
    d = float(config.jitter_d)
    return augment.AugmentParams(
        image_size=int(config.image_size), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        jitter=(0.8 * d, 0.8 * d, 0.8 * d, 0.2 * d), jitter_p=float(config.jitter_p), grey_p=float(config.grey_p),
        blur=bool(config.blur), blur_p=float(config.blur_p), blur_sigma=tuple(float(s) for s in config.blur_sigma),
        aug_order=str(config.aug_order), hflip_p=float(config.hflip_p))


def recipe(config: ml_collections.ConfigDict) -> pipeline.Recipe:
    """The host's crop recipe: random-resized-crop scale and the eval crop of `image_size`."""
    return pipeline.Recipe(crop_scale=tuple(float(s) for s in config.crop_scale),
                           eval_crop=crops.eval_crop(config.image_size))


def parts(config: ml_collections.ConfigDict, method: Method, splits: "data.Splits") -> Parts:
    """The `Parts` of `config` (already fitted to the data) for `method` on `splits` (their classes and
    normalisation; `Sizes.splits` stands in for data that is not loaded)."""
    width = prototype_classifier_width(config.prototype_classifier_width, config.num_prototypes, splits.num_classes)
    return Parts(
        method=method, dataset=config.dataset, seed=config.seed, num_workers=config.num_workers,
        training=_fields(Training, config),
        architecture=architecture(config),
        objective=_fields(Objective, config, {"metric_loss_kind": "metric_loss"}),
        clustering=_fields(Clustering, config, {"feature_view": "cluster_feature_view"}, classifier_width=width),
        optimisation=_fields(optim.Optimisation, config, {"name": "optimiser"}),
        evaluation=evaluation(config),
        augment=augment_params(config, splits.mean, splits.std),
        recipe=recipe(config))
