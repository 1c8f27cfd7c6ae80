"""Does a training step fit a device's memory? The device's limit, and the line through one compile that predicts
the largest batch that fits (the planner's search starts from it; the check before a run loads its data names it).

`train.check_step_fits` compiles the run's step from shapes alone and asks `check_memory`: a step that cannot fit
stops the run in one line with the bytes and the remedies, instead of an out-of-memory error after the data was
loaded. CPUs have no such limit and skip the check.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spcl_jax.errors import ConfigError

if TYPE_CHECKING:
    import jax

GIB = 1 << 30


def device_memory(device: jax.Device) -> int | None:
    """Bytes the device's allocator may use (on GPUs JAX's preallocated share), or None where there is no limit
    (CPUs)."""
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def one_point_line(total: int, temporaries: int, arguments: int, batch: int) -> tuple[int, float]:
    """(fixed bytes, bytes per unit of batch) from one compile: its temporaries taken as proportional to the batch,
    less the gradients' share, about half its arguments (the state: parameters and as much optimiser momentum)."""
    fixed = total - temporaries + min(temporaries, arguments // 2)
    return fixed, (total - fixed) / batch


def largest_on_line(fixed: float, slope: float, usable: int, granularity: int) -> int | None:
    """The largest multiple of `granularity` whose bytes on the line (fixed, slope) stay within `usable`."""
    if slope <= 0:
        return None
    return max(int((usable - fixed) / slope) // granularity * granularity, granularity)


def predict_largest_batch(total: int, temporaries: int, arguments: int, batch: int, usable: int,
                          granularity: int) -> int | None:
    """The largest multiple of `granularity` that one compile's line (`one_point_line`) says fits in `usable`."""
    return largest_on_line(*one_point_line(total, temporaries, arguments, batch), usable, granularity)


def needed_bytes(memory: Any) -> int:  # memory: XLA's CompiledMemoryStats (no public type)
    """Bytes per device of a compiled program, from XLA's memory analysis."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes - memory.alias_size_in_bytes)


def check_memory(memory: Any, available: int, batch_size: int, remat: str, device: jax.Device,
                 devices: int) -> None:
    """Raises ConfigError, naming the bytes needed and available and the remedies, when the training step whose
    memory analysis is `memory` needs more than `available` bytes of `device`."""
    needed = needed_bytes(memory)
    if needed <= available:
        return
    largest = predict_largest_batch(needed, memory.temp_size_in_bytes, memory.argument_size_in_bytes,
                                    batch_size, available, devices)
    advice = f"a global batch of about {largest}" if largest else "a smaller batch_size"
    remat = "set --config.remat=block (recomputes each block, less memory), " if remat == "none" else ""
    raise ConfigError(
        f"the training step needs {needed / GIB:.2f} GiB per device and a {device.device_kind} has "
        f"{available / GIB:.2f} GiB: {remat}use {advice} (--config.batch_size; `python -m spcl_jax.plan` finds the "
        f"largest that fits by compiling), or more devices")
