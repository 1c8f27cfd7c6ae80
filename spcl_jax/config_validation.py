"""Fail-fast checks of a resolved config, before any file is written or device is touched.

Every problem becomes a `ConfigError` whose single line names the key, the bad value and what
would be valid (big_vision's explicit contracts). Once the data is listed, `fit_to_data` fits an
`infer_from_data` config to it and checks it again, with the checks that need the data.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import TYPE_CHECKING

from absl import logging

from spcl_jax import augment, features, kmeans, losses, models, network, optim, probes, prototypes, storage
from spcl_jax import method as methods
from spcl_jax.data import datasets, imagefolder, splits
from spcl_jax.errors import ConfigError

if TYPE_CHECKING:
    import ml_collections


def method_of(config: ml_collections.ConfigDict) -> methods.Method:
    """The config's `Method`: the original's flags (clustering_use, metric_learn, supervised) choose it when any is
    set, else `method` (`method.resolve`)."""
    return methods.resolve(config.method, config.clustering_use, config.metric_learn, config.supervised)


def pretrains(config: ml_collections.ConfigDict) -> bool:
    """Whether the config pretrains (`method.pretrains`), else it evaluates a saved encoder."""
    return methods.pretrains(config.mode, config.finetune, config.eval_disent)


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """{config key: its valid values}, each tuple owned by the module that acts on the key."""
    return {
        "mode": methods.MODES, "method": methods.NAMES, "dataset": datasets.DATASETS,
        "imagenet100_classes": imagefolder.IMAGENET100_CHOICES, "pretrain_sampling": splits.SAMPLING_MODES,
        "aug_order": augment.AUG_ORDERS, "model": models.MODELS, "stem": models.STEM_CHOICES,
        "dtype": tuple(models.DTYPES), "remat": models.REMAT, "encoder_bn_mode": network.ENCODER_BN_MODES,
        "cluster_loss": losses.CLUSTER_LOSSES, "metric_loss": losses.METRIC_LOSSES,
        "prototype_classifier_width": network.PROTOTYPE_CLASSIFIER_WIDTHS, "clustering": kmeans.ALGORITHMS,
        "kmeans_init": kmeans.INITS, "cluster_feature_view": tuple(features.FEATURE_VIEWS),
        "feature_pass_order": features.FEATURE_PASS_ORDERS, "pair_sampling": prototypes.PAIR_MODES,
        "optimiser": optim.OPTIMISERS, "lars_mode": optim.LARS_MODES, "lr_stepping": optim.LR_STEPPINGS,
        "no_warmup_peak": optim.NO_WARMUP_PEAKS, "linear_eval_protocol": probes.PROTOCOLS,
        "finetune_optimiser": probes.FINETUNE_OPTIMISERS, "eval_metric_weighting": probes.METRIC_WEIGHTINGS,
    }


POSITIVE = ("learning_rate", "n_epochs", "batch_size", "kmeans_iters", "reassign", "classifier_init_freq",
            "proj_dim", "width_multiplier", "finetune_learning_rate", "finetune_batch_size", "knn_k",
            "log_every_steps", "visual_freq", "lars_eta")
NON_NEGATIVE = ("warmup_epochs", "finetune_epochs",
                "contras_weight", "cluster_weight", "metric_weight", "val_sample", "pca_dim",
                "checkpoint_every_steps", "grad_clip_norm", "divergence_factor", "patience", "dip_weight",
                "knn_every_epochs")
PROBABILITIES = ("jitter_p", "grey_p", "blur_p", "hflip_p")


def _interval(low, high, closed=True, what="a number"):
    """(low, high, whether high is allowed, the range in words)."""
    return low, high, closed, f"{what} in [{low}, {high}{']' if closed else ')'}"


# Values outside these are accepted by the code but nonsense or numerically broken; configs/default.py says why.
RANGES = {
    "seed": _interval(0, 2**32 - 1, what="an integer"),
    "temperature": _interval(0.01, 10),
    "knn_temperature": _interval(0.02, 10),
    "jitter_d": _interval(0, 2.5),
    "momentum": _interval(0, 1, closed=False),
    "weight_decay": _interval(0, 1, closed=False),
    "finetune_weight_decay": _interval(0, 1, closed=False),
    "pca_eigen_floor": _interval(0, 1, closed=False),
    "keep_checkpoints": _interval(2, 1000, what="an integer"),
}


def _fail(key, value, valid):
    raise ConfigError(f"invalid config: {key}={value!r}; valid: {valid}")


def check_schema(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """Same keys and value types as `configs/default.py` (ints are accepted where floats are)."""
    for key in config.keys():
        if key not in reference:
            close = sorted(k for k in reference.keys() if k[:3] == key[:3])
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"invalid config: unknown key {key!r}{hint}; valid keys are those of "
                              "configs/default.py")
    for key in reference.keys():
        if key not in config:
            raise ConfigError(f"invalid config: missing key {key!r}; start config files from "
                              "configs/default.py")
        want, got = reference[key], config[key]
        if got is not None and want is not None and not _same_type(want, got):
            _fail(key, got, f"a value of type {type(want).__name__} like {want!r}")


def _same_type(want, got):
    """`got` has the type of `want` (an int where a float is wanted; tuples element by element)."""
    if isinstance(want, bool):
        return isinstance(got, bool)
    if isinstance(want, int):
        return isinstance(got, int) and not isinstance(got, bool)
    if isinstance(want, float):
        return isinstance(got, (int, float)) and not isinstance(got, bool)
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(_same_type, want, got))
    return isinstance(got, type(want))


def check_values(config: ml_collections.ConfigDict, device_count: int) -> methods.Method:
    for key, value in config.items():
        numbers = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            _fail(key, value, "finite numbers")
    for key, valid in choices().items():
        if config[key] not in valid:
            _fail(key, config[key], " | ".join(valid))
    for key in POSITIVE:
        if not config[key] > 0:
            _fail(key, config[key], "a number > 0")
    for key in NON_NEGATIVE:
        if config[key] < 0:
            _fail(key, config[key], "a number >= 0")
    for key in ("n_classes", "pre_classes"):
        if config[key] < 0 or (config[key] == 0 and not config.infer_from_data):
            _fail(key, config[key], "a number > 0, or 0 (every class of the data) with infer_from_data=True")
    for key in PROBABILITIES:
        if not 0 <= config[key] <= 1:
            _fail(key, config[key], "a probability in [0, 1]")
    for key, (low, high, closed, valid) in RANGES.items():
        if not (low <= config[key] <= high if closed else low <= config[key] < high):
            _fail(key, config[key], valid)
    check_image_size(config)
    for key in ("blur_sigma", "crop_scale"):
        lo, hi = config[key]
        if not 0 < lo <= hi:
            _fail(key, tuple(config[key]), "(low, high) with 0 < low <= high")
    if config.crop_scale[1] > 1:
        _fail("crop_scale", tuple(config.crop_scale), "(low, high) with high <= 1")
    if config.warmup_epochs > config.n_epochs:
        _fail("warmup_epochs", config.warmup_epochs, f"at most n_epochs={config.n_epochs}")
    if config.train_sample == 0 or config.train_sample < -1:
        _fail("train_sample", config.train_sample, "-1 (all) or a number >= 1")
    if config.num_prototypes < 2:
        _fail("num_prototypes", config.num_prototypes, "an integer >= 2")
    if config.no_twocrop:
        _fail("no_twocrop", True, "False (every pretraining method needs two views)")
    if config.dip_proj:
        _fail("dip_proj", True, "False (the original's DIP head is dead code, DIFFERENCES.md B-24; not ported)")
    if config.num_workers < -1:
        _fail("num_workers", config.num_workers, "-1 (usable cores - 1), 0 (the main process) or a count")
    if config.max_steps_per_epoch == 0 or config.max_steps_per_epoch < -1:
        _fail("max_steps_per_epoch", config.max_steps_per_epoch, "-1 (full epochs) or >= 1")
    if config.checkpoint_step < -1:
        _fail("checkpoint_step", config.checkpoint_step, "-1 (newest) or a saved step >= 0")
    method = method_of(config)
    if method.pairs and not config.rebuild_member_table and config.pre_classes == 1:  # 0: fit_to_data checks
        _fail("pre_classes", config.pre_classes,
              f"an integer >= 2 with rebuild_member_table=False ({method.name}'s pairs then come from the ground-truth "
              "classes, B-2, and a pair of different prototypes needs two)")
    if config.prototype_classifier_width == "n_classes" and 0 < config.n_classes < config.num_prototypes:
        _fail("prototype_classifier_width", "n_classes",
              f"num_prototypes (the as-written width needs num_prototypes <= n_classes="
              f"{config.n_classes}, DIFFERENCES.md B-1)")
    if config.batch_size % device_count:
        _fail("batch_size", config.batch_size,
              f"a multiple of the global device count {device_count}")
    if method.pairs and config.pair_sampling == "exact_half" and config.batch_size % 2:
        _fail("batch_size", config.batch_size,
              "an even number (pair_sampling=exact_half puts exactly B/2 positive pairs per batch)")
    if config.finetune_batch_size % device_count:
        _fail("finetune_batch_size", config.finetune_batch_size,
              f"a multiple of the global device count {device_count}")
    if not pretrains(config):
        if not config.load_checkpoint_dir:
            _fail("load_checkpoint_dir", config.load_checkpoint_dir,
                  f"a checkpoint directory (mode={config.mode} evaluates a saved encoder)")
    if config.dataset == "imagefolder" and not config.dataset_path:
        _fail("dataset_path", config.dataset_path, "the root of a <split>/<class>/<image> tree")
    for key in ("load_checkpoint_dir", "dataset_path", "compilation_cache_dir"):
        if storage.unsupported_scheme(config[key]):
            _fail(key, config[key], "a local path or gs://bucket/path")
    for key in ("data_dir", "records_cache_dir", "listing_cache_dir"):  # read by local-file readers, or host caches
        if storage.unsupported_scheme(config[key]) or storage.is_url(config[key]):
            _fail(key, config[key], "a local directory")
    if config.gpu_id and not all(p.strip().isdigit() for p in config.gpu_id.split(",")):
        _fail("gpu_id", config.gpu_id, "comma-separated GPU indices like '0,1'")
    return method


def check_image_size(config: ml_collections.ConfigDict) -> None:
    """Crops at least as big as the network's downsampling, so the last stage sees image, not padding."""
    stride = models.total_stride(config.stem, config.image_size)
    if config.image_size < stride:
        _fail("image_size", config.image_size,
              f"an integer >= {stride} (the network with stem={config.stem} downsamples by {stride})")


def check_pretrain_size(config: ml_collections.ConfigDict, num_pretrain: int) -> None:
    """K prototypes need at least K examples, and K < N when training on pairs from the prototypes: with one
    image per prototype there is no same-prototype pair (checked once the dataset size is known)."""
    method = method_of(config)
    if not method.clustering:
        return
    if config.num_prototypes > num_pretrain:
        _fail("num_prototypes", config.num_prototypes,
              f"at most the pretrain set size {num_pretrain}")
    if method.pairs and config.rebuild_member_table and config.num_prototypes == num_pretrain:
        _fail("num_prototypes", config.num_prototypes,
              f"at most {num_pretrain - 1}, one less than the pretrain set size {num_pretrain} ({method.name} pairs "
              "two images of one prototype)")


def check_eval_size(config: ml_collections.ConfigDict, num_train: int, device_count: int) -> None:
    """The original linear protocol shards its batches over the devices, so it needs a train split of at least
    one image per device (checked once the data is known, before pretraining spends its time)."""
    linear = config.finetune_epochs > 0 and config.mode != "knn_eval" and not config.eval_disent and (
        config.evaluate_after_pretrain or not pretrains(config))
    if linear and config.linear_eval_protocol == "original" and num_train < device_count:
        _fail("linear_eval_protocol", config.linear_eval_protocol,
              f"fast, or a train split of at least {device_count} images (it has {num_train})")


MIN_IMAGES_PER_PROTOTYPE = 39  # faiss's min_points_per_centroid: below it k-means warns of poorly fitted centroids


def fit_to_data(config: ml_collections.ConfigDict, splits: datasets.Splits,
                device_count: int) -> ml_collections.ConfigDict:
    """The config to run on `splits`: with `infer_from_data`, a copy fitted to the data (a config file cannot see
    it), logged in one line and validated again; otherwise `config` itself. The same data gives the same values,
    so a resume with the same command finds the checkpoint's config."""
    if not config.infer_from_data:
        return config
    check_labels(config, splits)
    fitted = _fitted_values(config, splits, device_count)
    changes = [f"{key} {config[key]!r} -> {value!r} ({why})" for key, (value, why) in fitted.items()
               if value != config[key]]
    logging.info("infer_from_data: %s", "; ".join(changes) if changes else "the config fits the data unchanged")
    config = copy.deepcopy(config)
    config.update({key: value for key, (value, _) in fitted.items()})
    check_values(config, device_count)
    return config


def _fitted_values(config, splits, device_count):
    """{key: (value fitted to the data, why)}: every class for the 0s, a batch and K the data can fill, a warmup
    that leaves most of the epochs to the cosine, and no evaluation without labels."""
    method = method_of(config)
    images = len(getattr(splits, method.source_split))
    halves = method.pairs and config.pair_sampling == "exact_half"
    multiple = math.lcm(device_count, 2 if halves else 1)
    fitted = {
        "n_classes": (splits.num_classes, "every class of the data"),
        "pre_classes": (splits.pre_classes, "every class of the data"),
        "batch_size": (min(config.batch_size, max(multiple, images // multiple * multiple)),
                       (f"at most the {images} {method.source_split} images, in multiples of {device_count} devices"
                        + (" and of 2 for the pairs' halves" if halves else ""))),
        "warmup_epochs": (min(config.warmup_epochs, config.n_epochs // 10),
                          f"at most a tenth of n_epochs={config.n_epochs}"),
        "evaluate_after_pretrain": (config.evaluate_after_pretrain and splits.num_classes > 0,
                                    (f"linear/kNN evaluation needs labelled images: {config.dataset_path}/train has "
                                     "no class folders")),
    }
    if method.clustering:
        pretrain = len(splits.pretrain)
        fitted["num_prototypes"] = (min(config.num_prototypes, max(2, pretrain // MIN_IMAGES_PER_PROTOTYPE)),
                                    (f"{pretrain} pretraining images, {MIN_IMAGES_PER_PROTOTYPE} or more per "
                                     "prototype as faiss asks of a k-means centroid, and 2 prototypes at least"))
    return fitted


def check_labels(config: ml_collections.ConfigDict, splits: datasets.Splits) -> None:
    """Unlabeled data (an image folder without class folders) is for pretraining only: the first option that needs
    ground-truth labels is refused in one line."""
    if splits.num_classes:
        return
    method = method_of(config)
    needs = (  # (whether the config needs labels, what does, the fix)
        (not pretrains(config), f"evaluating a checkpoint (mode={config.mode})",
         "evaluate on a folder with train/<class>/ folders"),
        (method.supervised, f"method={method.name}", "pass a self-supervised method, e.g. --config.method=spcl"),
        (method.pairs and not config.rebuild_member_table,
         "rebuild_member_table=False (pairs drawn from the ground-truth classes, B-2)",
         "pass --config.rebuild_member_table=True"),
        (method.prototype_classifier and config.prototype_classifier_width == "n_classes",
         "prototype_classifier_width='n_classes'", "pass --config.prototype_classifier_width=num_prototypes"),
        (config.knn_every_epochs > 0, f"knn_every_epochs={config.knn_every_epochs}", "pass --config.knn_every_epochs=0"),
    )
    for needed, what, fix in needs:
        if needed:
            raise ConfigError(f"invalid config: {what} needs labelled images, and {config.dataset_path}/train has no "
                              f"class folders; {fix}")


def validate(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
             device_count: int) -> methods.Method:
    """Schema and value checks; returns the resolved `Method`."""
    check_schema(config, reference)
    return check_values(config, device_count)
