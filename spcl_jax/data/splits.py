"""Index-level splits (DIFFERENCES.md, datasets and splits) and per-epoch sampling orders, deterministic for a seed.

As the original: per class, `val_sample` images are drawn without replacement for 'valid', and
'train' is the first `train_sample` of the remaining (sorted) indices; classes < n_classes go to
train/valid, classes < pre_classes to pretrain. Corrected: train_sample=-1 keeps them all (B-11),
pre_classes may exceed n_classes, and unlabeled images (label -1, STL-10) all join pretrain (B-14).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from spcl_jax.errors import DataError
from spcl_jax.data.sources import UNLABELED

if TYPE_CHECKING:
    import numpy.typing as npt

SAMPLING_MODES = ("permutation", "weighted_replacement")


@dataclasses.dataclass(frozen=True)
class SplitIndices:
    """Sorted indices into the training pool."""

    pretrain: np.ndarray
    train: np.ndarray
    valid: np.ndarray


def split_indices(labels: npt.ArrayLike, *, n_classes: int, pre_classes: int, train_sample: int, val_sample: int,
                  seed: int, dataset: str) -> SplitIndices:
    """Per-class pretrain/train/valid indices of the training pool with ground-truth `labels`."""
    labels = np.asarray(labels, np.int64)
    if train_sample == 0 or train_sample < -1:
        raise DataError(f"train_sample={train_sample} leaves no training images: pass --config.train_sample=-1 (all) or a positive count")
    if val_sample < 0:
        raise DataError(f"val_sample={val_sample} is negative: pass --config.val_sample=0 or more")
    rng = np.random.default_rng(seed)
    pretrain, train, valid = [], [], []
    for c in range(max(n_classes, pre_classes)):
        members = np.flatnonzero(labels == c)
        if not len(members):
            raise DataError(f"class {c} of {dataset} has no training images: pass a smaller --config.n_classes / --config.pre_classes")
        if len(members) <= val_sample:
            raise DataError(
                f"class {c} of {dataset} has {len(members)} training images, too few to hold out val_sample={val_sample}: "
                f"pass a smaller --config.val_sample"
            )
        held = np.sort(rng.choice(members, val_sample, replace=False))
        rest = np.setdiff1d(members, held)
        if train_sample > 0:
            rest = rest[:train_sample]
        if c < n_classes:
            train.append(rest)
            valid.append(held)
        if c < pre_classes:
            pretrain.append(rest)
    pretrain.append(np.flatnonzero(labels == UNLABELED))
    none = np.zeros(0, np.int64)  # unlabeled data has no class: train and valid stay empty
    return SplitIndices(*(np.sort(np.concatenate([none, *parts])) for parts in (pretrain, train, valid)))


def pretrain_summary(labels: npt.ArrayLike, num_pretrain: int, *, pre_classes: int, train_sample: int,
                     val_sample: int) -> str:
    """How many of the pool's images pretraining uses and where the others went (held out for validation, beyond
    train_sample, of classes >= pre_classes), in one line for the start-up log: the split rules leave images out
    without any error, so a small pretrain set would otherwise go unexplained."""
    labels = np.asarray(labels, np.int64)
    held, excluded = val_sample * pre_classes, int((labels >= pre_classes).sum())
    capped = len(labels) - num_pretrain - held - excluded
    unlabeled = int((labels == UNLABELED).sum())
    reasons = []
    if held:
        reasons.append(f"{held:,} held out for validation ({val_sample} per class, val_sample={val_sample})")
    if capped:
        reasons.append(f"{capped:,} beyond train_sample={train_sample} per class left out")
    if excluded:
        reasons.append(f"{excluded:,} of the classes >= pre_classes={pre_classes} left out")
    counted = (f"pretraining on {num_pretrain:,} of the {len(labels):,} training images" if reasons else
               f"pretraining on all {num_pretrain:,} training images")
    if unlabeled:
        counted += f" ({unlabeled:,} unlabeled)"
    return counted + (": " + "; ".join(reasons) if reasons else "")


def test_indices(labels: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """Indices of the test images whose class is < n_classes (subset with their labels, B-18)."""
    labels = np.asarray(labels, np.int64)
    return np.flatnonzero((labels >= 0) & (labels < n_classes))


def epoch_order(labels: npt.ArrayLike, rng: np.random.Generator, mode: str = "permutation") -> np.ndarray:
    """Dataset positions for one epoch.

    permutation: every image once, in random order (the fix of B-15).
    weighted_replacement: as written (B-15): len(labels) draws with replacement, weight 1/count of
    the image's ground-truth class (unlabeled images count as one class).
    """
    labels = np.asarray(labels, np.int64)
    if mode == "permutation":
        return rng.permutation(len(labels))
    if mode == "weighted_replacement":
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        return rng.choice(len(labels), len(labels), replace=True, p=weights / weights.sum())
    raise ValueError(f"epoch order mode {mode!r} is not one of {SAMPLING_MODES}")
