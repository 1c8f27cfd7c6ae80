"""What building a run's programs needs of its data, without the data: split sizes, classes, normalisation and
the canvas images arrive in (the planner, and the accelerator check before a run loads its data)."""
import dataclasses

import numpy as np

from spcl_jax.data import datasets
from spcl_jax.data.sources import ShapeSource


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What planning needs of the data: split sizes, classes, normalisation and the canvas images arrive in."""

    pretrain: int
    train: int
    valid: int
    test: int
    num_classes: int
    mean: tuple
    std: tuple
    canvas: tuple
    in_memory: bool
    nominal: bool  # from NOMINAL_SIZES or --num_examples, not from the data

    @classmethod
    def of(cls, splits: datasets.Splits, nominal: bool) -> "Sizes":
        return cls(len(splits.pretrain), len(splits.train), len(splits.valid), len(splits.test), splits.num_classes,
                   tuple(splits.mean), tuple(splits.std), tuple(splits.pretrain.canvas_shape),
                   bool(splits.pretrain.in_memory), nominal)

    @classmethod
    def for_step(cls, dataset: str, image_size: int, batch_size: int, n_classes: int) -> "Sizes":
        """Sizes that build the training step before the data is loaded: the dataset's nominal canvas, one batch of
        examples (the normalisation constants do not change the program's shape)."""
        half, quarter = (0.5,) * 3, (0.25,) * 3
        return cls(batch_size, batch_size, 0, 1, max(int(n_classes), 1), half, quarter,
                   datasets.nominal_canvas(dataset, image_size), dataset in datasets.IN_MEMORY, True)

    def splits(self, name: str) -> datasets.Splits:
        """Splits of `ShapeSource`s of these sizes (no images), for building the programs."""
        source = lambda n: ShapeSource(np.zeros(n, np.int64), self.canvas, self.in_memory)  # noqa: E731
        return datasets.Splits(source(self.pretrain), source(self.train), source(self.valid), source(self.test),
                               self.num_classes, self.mean, self.std, name, self.num_classes, "")
