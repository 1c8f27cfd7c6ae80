"""Random-access image sources: `len(src)`, `src.labels`, `src.image_shape`, `src.get(indices)`.

A source is a view of a pool of images through an index array; `subset` narrows the view and
always carries the labels along (B-18), so images and labels can never drift apart.
`get` returns uint8 (n, H, W, 3) with the same H = W for every image of the source.
"""
import concurrent.futures
import copy
import logging
import threading

import numpy as np
from PIL import Image

from spcl_jax.errors import DataError

UNLABELED = -1  # label of an image without ground truth (STL-10 'unlabelled')


class _View:
    """Index bookkeeping shared by all sources; subclasses implement `_load(pool_indices)`.

    `labels` is always an int64 array aligned with the positions, UNLABELED (-1) where an image has none.
    """

    def __init__(self, labels, index):
        self._index = np.asarray(index, np.int64)
        self.labels = np.asarray(labels, np.int64)
        if len(self.labels) != len(self._index):
            raise ValueError(f"{len(self.labels)} labels for {len(self._index)} images")

    def __len__(self):
        return len(self._index)

    @property
    def index(self):
        """Positions of this source's images in its pool (the training set for pretrain/train/valid)."""
        return self._index

    def get(self, indices):
        """uint8 (len(indices), H, W, 3) images at positions `indices` of this source."""
        return self._load(self._index[np.asarray(indices, np.int64)])

    def subset(self, indices):
        """A source over positions `indices` of this one (images and labels together)."""
        indices = np.asarray(indices, np.int64)
        view = copy.copy(self)
        view._index = self._index[indices]
        view.labels = self.labels[indices]
        return view


class ArraySource(_View):
    """A split held in memory as one uint8 (N, H, W, 3) array (digits, CIFAR, STL-10)."""

    def __init__(self, images, labels):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        super().__init__(labels, np.arange(len(images)))
        self._images = images
        self.image_shape = images.shape[1:]

    def _load(self, pool_indices):
        return self._images[pool_indices]


def fit_square(image, size):
    """PIL image -> uint8 (size, size, 3): shorter side to `size` (bilinear), centre crop.

    ImageNet-size images are stored at this load size (S / 0.875) so the device can take random
    crops from a fixed shape; JPEG draft mode decodes at a reduced scale when that is still large enough.
    """
    if image.format == "JPEG":
        image.draft("RGB", (size, size))
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


class _DecodingSource(_View):
    """Decodes on the host at `get` time with `threads` worker threads (PIL releases the GIL).

    Subclasses implement `_open(i) -> PIL image` and `_describe(i) -> str` for pool position i.
    """

    def __init__(self, labels, count, load_size, threads, skip_bad):
        super().__init__(labels, np.arange(count))
        self.image_shape = (load_size, load_size, 3)
        self.threads = threads
        self.skip_bad = skip_bad
        self._pool_lock = threading.Lock()
        self._pool = None

    def _one(self, i):
        try:
            with self._open(i) as image:
                return fit_square(image, self.image_shape[0])
        except (OSError, ValueError, SyntaxError) as e:
            what = f"{self._describe(i)} cannot be decoded ({e})"
            if not self.skip_bad:
                raise DataError(f"{what}: delete or replace it, or pass --config.skip_bad_images=True to skip bad files") from e
            logging.warning("%s; using a black image in its place (skip_bad_images)", what)
            return np.zeros(self.image_shape, np.uint8)

    def _load(self, pool_indices):
        if self.threads <= 1 or len(pool_indices) <= 1:
            images = [self._one(i) for i in pool_indices]
        else:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
            images = list(self._pool.map(self._one, pool_indices))
        return np.stack(images) if images else np.zeros((0, *self.image_shape), np.uint8)


class FileSource(_DecodingSource):
    """Images as files (image folders, ImageNet); decoded with PIL and fitted to the load size."""

    def __init__(self, paths, labels, load_size, *, threads=0, skip_bad=False):
        super().__init__(labels, len(paths), load_size, threads, skip_bad)
        self.paths = np.asarray(paths, dtype=object)

    def _describe(self, i):
        return f"image file {self.paths[i]}"

    def _open(self, i):
        return Image.open(self.paths[i])


class TfdsSource(_DecodingSource):
    """Records of a tfds array_record data source (imagenet2012), decoded and fitted to the load size."""

    def __init__(self, data_source, record_ids, labels, load_size, *, threads=0, name=""):
        super().__init__(labels, len(record_ids), load_size, threads, skip_bad=False)
        self._data_source = data_source
        self._record_ids = np.asarray(record_ids, np.int64)
        self._name = name

    def _describe(self, i):
        return f"record {self._record_ids[i]} of {self._name}"

    def _open(self, i):
        image = self._data_source[int(self._record_ids[i])]["image"]
        return Image.fromarray(np.asarray(image, np.uint8))

