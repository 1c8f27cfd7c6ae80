"""Datasets, splits and host-side image sources (spec §4).

`load_splits(config) -> Splits` is the entry point. Each split is a source with `len(src)`,
`src.labels` (int64 ground truth aligned with positions; UNLABELED = -1 for images without one,
never None), `src.image_shape` ((H, H, 3), fixed per source), `src.index` (positions in the pool)
and `src.get(indices) -> uint8 (n, H, H, 3)`. Augmentation runs on the device (`spcl_jax.augment`);
`loader.HostLoader` prefetches batches on the host; `epoch_order` gives each epoch's order.
"""
from spcl_jax.data.datasets import DATASETS, Splits, load_splits
from spcl_jax.data.sources import UNLABELED, ArraySource, FileSource, TfdsSource
from spcl_jax.data.splits import epoch_order

__all__ = ["DATASETS", "Splits", "load_splits", "UNLABELED", "ArraySource", "FileSource", "TfdsSource", "epoch_order"]
