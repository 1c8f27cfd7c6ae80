"""The pretraining state: what the train step updates and the checkpoints save, one pytree with named parts."""
import dataclasses
from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """params / batch_stats: the Network's parameters and BatchNorm statistics (nnx.State); opt_state: its
    optimiser's state; classifier_params / classifier_opt_state: the per-epoch prototype classifier's and its SGD's
    ({} and an empty state for methods that keep none); step: the steps taken; first_nonfinite_step: the first step
    whose loss or gradient was not finite, -1 while none was (the divergence guard reads it)."""

    params: Any
    batch_stats: Any
    opt_state: Any
    classifier_params: Any
    classifier_opt_state: Any
    step: jax.Array
    first_nonfinite_step: jax.Array

    def parts(self) -> dict[str, Any]:
        """{field name: value}, not copied: what a checkpoint stores under those names."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
