"""Metrics for people (TensorBoard) and machines (`<workdir>/metrics.jsonl`), from process 0 only."""
import json
import math
import os

import numpy as np
from absl import logging


def _plain(value):
    value = float(np.asarray(value))
    return value if math.isfinite(value) else str(value)


class MetricWriter:
    """Appends one JSON object per `write` call and mirrors every scalar to TensorBoard. Callers pass the
    0-based epoch the record belongs to; metrics.jsonl shows it 1-based, as the logs do.

    On processes other than 0 every method is a no-op, so callers never branch on the process index.
    """

    def __init__(self, workdir, *, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            drop_partial_last_line(self.path)
            self._jsonl = open(self.path, "a", buffering=1)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step, epoch, scalars):
        if not self.enabled:
            return
        record = {"step": int(step), "epoch": int(epoch) + 1}  # 1-based, as the logs count
        record.update({k: _plain(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(np.asarray(value)), int(step))

    def write_image(self, step, tag, image_hwc_uint8):
        if self.enabled:
            self._tb.add_image(tag, image_hwc_uint8, int(step), dataformats="HWC")

    def flush(self):
        if self.enabled:
            self._tb.flush()

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


def drop_partial_last_line(path, chunk=1 << 16):
    """Cuts the end of `path` back to its last newline: a run killed while writing a record leaves half a line,
    which the resumed run's next record would otherwise continue (one line no JSON parser reads)."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(position - chunk, 0)
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline >= 0:
                position = start + newline + 1
                break
            position = start
        if position < end:
            logging.warning("%s ended in a half-written record (the previous run was stopped while writing it): "
                            "dropped its %d bytes", path, end - position)
            f.truncate(position)


def read_metrics(workdir):
    """All records of `<workdir>/metrics.jsonl` (for tests and tools)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
