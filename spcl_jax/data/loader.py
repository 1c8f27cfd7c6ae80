"""Host prefetching of uint8 batches, so decoding overlaps the device step.

Threads rather than processes: PIL decodes and resizes with the GIL released, the in-memory sources
are plain numpy gathers, and threads avoid grain's worker start-up and absl-flag requirements.
"""
import collections
import concurrent.futures

import numpy as np


class HostLoader:
    """Iterates `src.get(index_batches[i])` for i = start, start + 1, ... in order.

    `index_batches` is an int array (steps, batch) of source positions (the trainer's plan).
    `num_workers` threads assemble batches concurrently, at most `prefetch` ahead of the consumer;
    num_workers=0 loads each batch in the caller's thread when it is asked for. `position` counts the
    batches handed out so far: save it in a checkpoint and resume with `start=position`.
    """

    def __init__(self, src, index_batches, *, num_workers=1, prefetch=2, start=0):
        self.src = src
        self.index_batches = np.asarray(index_batches, np.int64)
        if self.index_batches.ndim != 2:
            raise ValueError(f"index_batches must be (steps, batch), got shape {self.index_batches.shape}")
        self.position = int(start)
        self._next_submit = self.position
        self._prefetch = max(1, int(prefetch))
        self._pending = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="loader") if num_workers > 0 else None

    def __len__(self):
        return len(self.index_batches) - self.position

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.index_batches):
            self.close()
            raise StopIteration
        if self._pool is None:
            batch = self.src.get(self.index_batches[self.position])
        else:
            while self._next_submit < len(self.index_batches) and len(self._pending) < self._prefetch:
                self._pending.append(self._pool.submit(self.src.get, self.index_batches[self._next_submit]))
                self._next_submit += 1
            batch = self._pending.popleft().result()
        self.position += 1
        return batch

    def close(self):
        """Stops the worker threads; batches not yet handed out are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
