"""The host input pipeline: one pass over a plan of index batches, loaded ahead of the device by grain.

A pass is a `BatchMaker` (what one step's host batch is) and a number of steps. Step s of a pass
loads this host's columns of the plan's index batches (image sets "a", and "b" for pairs), places
every image whole in a canvas (`sources`), and draws every view's crop box and uniforms with
`crops.counter_uniforms` from the pass's seed words and the image's id: its position in the global
plan (training steps: two occurrences of an image are two examples) or its dataset index (the feature
pass: an image's view does not depend on the batch it falls in). A view does not depend on the host
or device count, the worker count, or where a run was resumed. The device then cuts the views
(`spcl_jax.augment.views`).

`Loader` iterates a pass from any step with grain: with `num_workers` > 0 the batches are made in
that many worker processes (each decodes whole batches; outputs stay in order), with 0 in a
background thread of this process. In-memory datasets are only gathered, which workers would not
speed up, so they always load in-process. `Loader.wait_seconds` is the time the consumer spent
waiting for a batch.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from spcl_jax.data import crops

if TYPE_CHECKING:  # for the hints only: the workers import no more at run time
    import numpy.typing as npt

    from spcl_jax.data.sources import ArraySource, DecodingSource, Images, ShapeSource

VIEW_COLUMNS = crops.CROP_DRAWS + crops.VIEW_DRAWS  # uniforms drawn per view: its box, then its flip and colours


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the host needs to draw views: the random-resized-crop parameters and the eval crop side."""

    crop_scale: tuple
    crop_ratio: tuple = crops.CROP_RATIO
    eval_crop: int = 28  # int(0.875 S) pixels of the original image


@dataclasses.dataclass(frozen=True)
class BatchMaker:
    """step -> this host's batch of one pass, as a dict of numpy arrays with the batch axis first.

    `sets` maps an image-set name ("a", "b") to this host's (steps, b) source positions; `specs` lists
    the views, (set name, kind) each, kind in spcl_jax.augment.VIEW_KINDS. The global batch is
    `global_batch` images per set, of which this host holds columns [column, column + b). `key_by`:
    "position" (an image's views from its place in the global plan) or "index" (from its source position).
    The batch holds `pixels_<set>` uint8 (b, Hc, Wc, 3), `frame_<set>` float32 (b, 4) (see
    spcl_jax.augment), `boxes` float32 (b, V, 4) in canvas pixels and `draws` float32 (b, V, VIEW_DRAWS).
    """

    source: object
    sets: dict
    specs: tuple
    recipe: Recipe
    seed: tuple  # the Generator's seed words, the step is appended
    global_batch: int
    column: int
    key_by: str = "position"
    shared_memory: bool = False

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch, images = {}, {}
        for name, plan in self.sets.items():
            images[name] = self.source.load(plan[step], self._pixels())
            batch[f"pixels_{name}"] = images[name].pixels
            batch[f"frame_{name}"] = frame(images[name])
        boxes = np.empty((self.batch_size, len(self.specs), 4), np.float32)
        draws = np.empty((self.batch_size, len(self.specs), crops.VIEW_DRAWS), np.float32)
        for v, (name, kind) in enumerate(self.specs):
            uniforms = crops.counter_uniforms(self.seed, self._ids(name, step) * len(self.specs) + v, VIEW_COLUMNS)
            boxes[:, v] = view_boxes(images[name], kind, uniforms[:, :crops.CROP_DRAWS], self.recipe)
            draws[:, v] = uniforms[:, crops.CROP_DRAWS:]
        batch["boxes"], batch["draws"] = boxes, draws
        return batch

    def _ids(self, name, step):
        """The ids this host's images of set `name` draw their views by (see `key_by`)."""
        if self.key_by == "index":
            return self.sets[name][step]
        return step * self.global_batch + self.column + np.arange(self.batch_size)

    @property
    def batch_size(self) -> int:
        return next(iter(self.sets.values())).shape[1]

    @property
    def num_steps(self) -> int:
        return next(iter(self.sets.values())).shape[0]

    def _pixels(self):
        """Worker processes write images straight into shared memory, which grain hands over without a copy."""
        if not self.shared_memory:
            return None
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

        return SharedMemoryArray((self.batch_size, *self.source.canvas_shape, 3), np.uint8)


def batch_spec(set_names: Iterable[str], num_views: int, canvas_shape: Sequence[int],
               batch_size: int) -> dict[str, tuple[tuple[int, ...], type[np.generic]]]:
    """{key: (shape, dtype)} of the global batches a `BatchMaker` makes (its docstring), for compiling the programs
    that take them without loading any."""
    spec = {}
    for name in set_names:
        spec[f"pixels_{name}"] = ((batch_size, *canvas_shape, 3), np.uint8)
        spec[f"frame_{name}"] = ((batch_size, 4), np.float32)
    spec["boxes"] = ((batch_size, num_views, 4), np.float32)
    spec["draws"] = ((batch_size, num_views, crops.VIEW_DRAWS), np.float32)
    return spec


def frame(images: Images) -> np.ndarray:
    """float32 (n, 4) frames (valid h, valid w in the canvas, transposed, stored / original size)."""
    size = np.where(images.transposed[:, None], images.size[:, ::-1], images.size)
    scale = images.size.min(axis=1) / np.maximum(images.raw_size.min(axis=1), 1)
    return np.column_stack([size, images.transposed, scale]).astype(np.float32)


def view_boxes(images: Images, kind: str, uniforms: np.ndarray, recipe: Recipe) -> np.ndarray:
    """(n, 4) boxes in canvas pixels: random resized crops ("pretrain", "train") or centre crops ("eval")."""
    if kind == "eval":
        boxes = crops.center_crop_boxes(images.size[:, 0], images.size[:, 1], images.raw_size[:, 0],
                                        images.raw_size[:, 1], recipe.eval_crop)
    else:
        boxes = crops.random_resized_crop_boxes(uniforms, images.size[:, 0], images.size[:, 1], recipe.crop_scale,
                                                recipe.crop_ratio)
    return np.where(images.transposed[:, None], boxes[:, [1, 0, 3, 2]], boxes)


def default_workers() -> int:
    """The host's usable cores minus one for the main process (at least 0)."""
    return max(len(os.sched_getaffinity(0)) - 1, 0)


def worker_count(num_workers: int, source: ArraySource | DecodingSource | ShapeSource) -> int:
    """Worker processes a pass over `source` gets: none for in-memory data, else `num_workers` (-1: one per
    usable core but the main process's)."""
    if source.in_memory:
        return 0
    return default_workers() if num_workers < 0 else int(num_workers)


def describe_workers(num_workers: int, source: ArraySource | DecodingSource | ShapeSource) -> str:
    """The start-up log's words for how `source` is loaded."""
    if source.in_memory:
        return "in-memory data, loaded in the main process"
    count = worker_count(num_workers, source)
    how = f"num_workers={count}" + (" (usable cores - 1)" if num_workers < 0 else "")
    return f"decoded by {count} worker process(es), {how}" if count else f"decoded in the main process, {how}"


class Loader:
    """Iterates `maker(step)` for step = start, start + 1, ..., maker.num_steps - 1, loaded ahead by grain."""

    def __init__(self, maker: BatchMaker, *, num_workers: int = 0, start: int = 0, prefetch: int = 2):
        import grain

        workers = worker_count(num_workers, maker.source)
        if workers:
            _allow_grain_workers()
            maker = dataclasses.replace(maker, shared_memory=True)
        dataset = grain.MapDataset.range(start, maker.num_steps).map(maker)
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1 if workers else prefetch)
        dataset = dataset.to_iter_dataset(read)
        if workers:
            dataset = dataset.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=prefetch))
        self._iterator = iter(dataset)
        self.position = start
        self.steps = maker.num_steps
        self.wait_seconds = 0.0

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.steps:
            raise StopIteration
        began = time.perf_counter()
        batch = next(self._iterator)
        self.wait_seconds += time.perf_counter() - began
        self.position += 1
        return batch

    def close(self) -> None:
        """Stops the workers; batches not handed out are dropped."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _allow_grain_workers():
    """grain reads absl flags when it starts worker processes; outside launch.py (tests, tools, notebooks)
    nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def host_share(array: npt.ArrayLike, process_index: int, process_count: int, axis: int = 0) -> np.ndarray:
    """This host's contiguous share [p·B/P, (p+1)·B/P) of `array` along its global batch axis `axis`:
    rows of a global batch (axis 0), or the columns of every step of a (steps, B) plan (axis 1). The
    devices of process p hold exactly these rows of a P('data') array of a `jax.make_mesh` mesh."""
    array = np.asarray(array)
    batch = array.shape[axis]
    if batch % process_count:
        raise ValueError(f"global batch {batch} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    width = batch // process_count
    return np.take(array, np.arange(process_index * width, (process_index + 1) * width), axis=axis)


def make_pass(source: ArraySource | DecodingSource | ShapeSource, global_sets: Mapping[str, np.ndarray],
              specs: Iterable[tuple[str, str]], recipe: Recipe, seed: Iterable[int], process_index: int = 0,
              process_count: int = 1, key_by: str = "position") -> BatchMaker:
    """The `BatchMaker` of this host for global (steps, B) plans `global_sets` ({"a": ..., ["b": ...]})."""
    sets = {name: host_share(plan, process_index, process_count, axis=1) for name, plan in global_sets.items()}
    width = next(iter(sets.values())).shape[1]
    global_batch = next(iter(global_sets.values())).shape[1]
    return BatchMaker(source, sets, tuple(specs), recipe, tuple(int(s) for s in seed), global_batch,
                      process_index * width, key_by)
