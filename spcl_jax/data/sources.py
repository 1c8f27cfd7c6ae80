"""Random-access image sources: `len(src)`, `src.labels`, `src.canvas_shape`, `src.load(indices)`.

A source is a view of a pool of images through an index array; `subset` narrows the view and
always carries the labels along (DIFFERENCES.md, B-18), so images and labels can never drift apart. `load` returns
`Images`: every image whole, top-left in a fixed-size canvas (`spcl_jax.data.decode`), with its size,
so that the device can cut crops from the full field of view as the original's torchvision pipeline
does. In-memory datasets (digits, CIFAR, STL-10) are their own canvas; sources that decode (image
files, tfds ImageNet records, prepared records) are picklable and cheap to send to loader workers.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from spcl_jax.data import decode
from spcl_jax.errors import DataError

if TYPE_CHECKING:
    import numpy.typing as npt
    from typing_extensions import Self

UNLABELED = -1  # label of an image without ground truth (STL-10 'unlabelled')


class Images(NamedTuple):
    """A batch of images in canvases (host numpy arrays)."""

    pixels: np.ndarray  # uint8 (n, Hc, Wc, 3): each image top-left, transposed where `transposed`
    size: np.ndarray  # int32 (n, 2): (h, w) of each stored image, upright
    raw_size: np.ndarray  # int32 (n, 2): (h, w) of each original image, upright (eval crops are in its pixels)
    transposed: np.ndarray  # bool (n,)

    def upright(self, i: int) -> np.ndarray:
        """Image i as stored, upright: uint8 (h, w, 3)."""
        h, w = self.size[i]
        if self.transposed[i]:
            return self.pixels[i, :w, :h].transpose(1, 0, 2)
        return self.pixels[i, :h, :w]


def empty_images(count: int, canvas: tuple[int, ...], pixels: np.ndarray | None = None) -> Images:
    """`Images` to fill, with `pixels` (count, Hc, Wc, 3) given (e.g. in shared memory) or allocated."""
    if pixels is None:
        pixels = np.empty((count, *canvas, 3), np.uint8)
    return Images(pixels, np.empty((count, 2), np.int32), np.empty((count, 2), np.int32), np.empty(count, bool))


class _View:
    """Index bookkeeping shared by all sources; subclasses implement `_load_into(pool_indices, out)`.

    `labels` is always an int64 array aligned with the positions, UNLABELED (-1) where an image has none.
    """

    canvas_shape = None  # (Hc, Wc)

    def __init__(self, labels: npt.ArrayLike, index: npt.ArrayLike):
        self._index = np.asarray(index, np.int64)
        self.labels = np.asarray(labels, np.int64)
        if len(self.labels) != len(self._index):
            raise ValueError(f"{len(self.labels)} labels for {len(self._index)} images")

    def __len__(self) -> int:
        return len(self._index)

    @property
    def index(self) -> np.ndarray:
        """Positions of this source's images in its pool (the training set for pretrain/train/valid)."""
        return self._index

    def load(self, indices: npt.ArrayLike, pixels: np.ndarray | None = None) -> Images:
        """`Images` at positions `indices` of this source (into `pixels` when given)."""
        indices = np.asarray(indices, np.int64)
        out = empty_images(len(indices), self.canvas_shape, pixels)
        self._load_into(self._index[indices], out)
        return out

    def subset(self, indices: npt.ArrayLike) -> Self:
        """A source over positions `indices` of this one (images and labels together)."""
        indices = np.asarray(indices, np.int64)
        view = copy.copy(self)
        view._index = self._index[indices]
        view.labels = self.labels[indices]
        return view


class ArraySource(_View):
    """A split held in memory as one uint8 (N, H, W, 3) array (digits, CIFAR, STL-10): its own canvas."""

    in_memory = True

    def __init__(self, images: np.ndarray, labels: npt.ArrayLike):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        super().__init__(labels, np.arange(len(images)))
        self._images = images
        self.canvas_shape = images.shape[1:3]

    def _load_into(self, pool_indices, out):
        np.take(self._images, pool_indices, axis=0, out=out.pixels)
        out.size[:] = self.canvas_shape
        out.raw_size[:] = self.canvas_shape
        out.transposed[:] = False


class ShapeSource(_View):
    """A split known only by its labels and the canvas its images would arrive in: what planning a run for
    hardware elsewhere needs when the data is not on this machine (`spcl_jax.plan`). It holds no images."""

    def __init__(self, labels: npt.ArrayLike, canvas_shape: Iterable[int], in_memory: bool):
        super().__init__(labels, np.arange(len(labels)))
        self.canvas_shape, self.in_memory = tuple(canvas_shape), in_memory

    def _load_into(self, pool_indices, out):
        raise DataError("a planned split holds no images")


class Strings:
    """Many strings (file paths) as one UTF-8 buffer plus offsets: pickles in one copy, unlike a list."""

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode() for s in strings]
        self._data = np.frombuffer(b"".join(encoded), np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self._data[start:self._ends[i]].tobytes().decode()


class DecodingSource(_View):
    """Decodes on the host, one image at a time, into canvases of shape `decode.canvas_shape(load_size)`.

    Subclasses implement `_read(i) -> (bytes, raw_size or None, transposed)` and `_describe(i)` for
    pool position i.
    """

    in_memory = False

    def __init__(self, labels: npt.ArrayLike, count: int, load_size: int, skip_bad: bool):
        super().__init__(labels, np.arange(count))
        self.canvas_shape = decode.canvas_shape(load_size)
        self.skip_bad = skip_bad

    def _load_into(self, pool_indices, out):
        for k, i in enumerate(pool_indices):
            try:
                data, raw_size, transposed = self._read(i)
                decoded = decode.decode_into(out.pixels[k], data, raw_size, transposed)
            except (OSError, decode.DecodeError) as e:
                what = f"{self._describe(i)} cannot be decoded ({e})"
                if not self.skip_bad:
                    raise DataError(f"{what}: delete or replace it, or pass --config.skip_bad_images=True to "
                                    "skip bad files") from e
                logging.warning("%s; using a black image in its place (skip_bad_images)", what)
                side = self.canvas_shape[0]
                decoded = decode.place(out.pixels[k], np.zeros((side, side, 3), np.uint8))
            out.size[k], out.raw_size[k], out.transposed[k] = decoded


class FileSource(DecodingSource):
    """Images as files (image folders, ImageNet)."""

    def __init__(self, paths: Sequence[str], labels: npt.ArrayLike, load_size: int, *, skip_bad: bool = False):
        super().__init__(labels, len(paths), load_size, skip_bad)
        self.paths = Strings(paths)

    def _describe(self, i):
        return f"image file {self.paths[i]}"

    def _read(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read(), None, False


class TfdsSource(DecodingSource):
    """Encoded images of a tfds array_record data source (imagenet2012) opened with image decoding skipped."""

    def __init__(self, data_source: Sequence[Any], record_ids: np.ndarray, labels: npt.ArrayLike, load_size: int, *,
                 name: str = ""):
        super().__init__(labels, len(record_ids), load_size, skip_bad=False)
        self._data_source = data_source
        self._record_ids = np.asarray(record_ids, np.int64)
        self._name = name

    def _describe(self, i):
        return f"record {self._record_ids[i]} of {self._name}"

    def _read(self, i):
        return self._data_source[int(self._record_ids[i])]["image"], None, False
