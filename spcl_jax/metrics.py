"""Metrics for people (TensorBoard) and machines (`<workdir>/metrics.jsonl`), from process 0 only."""
import json
import math
import os
from collections.abc import Mapping

import numpy as np

from spcl_jax import storage


def _plain(value):
    value = float(np.asarray(value))
    return value if math.isfinite(value) else str(value)


class _EventsOnGcs:
    """tensorboardX's writer of events files on gs://: appends through `storage.AppendLog` (one compose per
    flush) instead of tensorboardX's own, which uploads the whole file at every flush and once more when it is
    garbage-collected, retrying for minutes at exit when the bucket cannot be reached."""

    def open(self, path: str) -> storage.AppendLog:
        return storage.AppendLog(path)

    def directory_check(self, path: str) -> None:
        pass  # objects need no folder


def _tensorboard_writer(logdir):
    from tensorboardX import SummaryWriter, record_writer

    record_writer.register_writer_factory("gs", _EventsOnGcs())
    return SummaryWriter(logdir)


class MetricWriter:
    """Appends one JSON object per `write` call and mirrors every scalar to TensorBoard. Callers pass the
    0-based epoch the record belongs to; metrics.jsonl shows it 1-based, as the logs do.

    On processes other than 0 every method is a no-op, so callers never branch on the process index. On gs://
    metrics.jsonl is stored every `storage.AppendLog` interval and at `flush`; TensorBoard's events at its own.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.path = storage.join(workdir, "metrics.jsonl")
        self._tb = None
        self._jsonl = None
        if enabled:
            storage.makedirs(workdir)
            self._jsonl = storage.AppendLog(self.path)
            self._tb = _tensorboard_writer(storage.join(workdir, "tensorboard"))

    def write(self, step: int, epoch: int, scalars: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "epoch": int(epoch) + 1}  # 1-based, as the logs count
        record.update({k: _plain(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(np.asarray(value)), int(step))

    def write_image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image_hwc_uint8, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.sync()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` (for tests and tools)."""
    text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
