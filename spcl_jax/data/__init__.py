"""Datasets, splits and the host input pipeline (DIFFERENCES.md, datasets and splits, D-7 and D-12).

`load_splits(config) -> Splits` is the entry point. Each split is a source (`spcl_jax.data.sources`)
with `len(src)`, `src.labels` (int64 ground truth aligned with positions; UNLABELED = -1 for images
without one, never None), `src.canvas_shape` and `src.load(indices) -> Images`, every image whole in a
fixed-size canvas. `pipeline` turns index plans into host batches, loaded ahead by grain workers;
augmentation runs on the device (`spcl_jax.augment`); `epoch_order` gives each epoch's order.

The names below are imported on first use, so that the input pipeline's worker processes, which
unpickle `pipeline` and `sources`, import neither JAX nor the dataset readers.
"""
import importlib
from typing import Any

_EXPORTS = {
    "DATASETS": "datasets", "Splits": "datasets", "load_splits": "datasets", "nominal_pool": "datasets",
    "UNLABELED": "sources",
    "ArraySource": "sources", "FileSource": "sources", "TfdsSource": "sources", "epoch_order": "splits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
