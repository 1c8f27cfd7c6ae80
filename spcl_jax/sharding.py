"""The 1-D `data` mesh over every device of every host, and global batches built from host slices.

Each process loads only its contiguous slice of a global batch (the devices of process p hold rows
[p*B/P, (p+1)*B/P) of a `P('data')` array on a mesh made by `jax.make_mesh`).
"""
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from spcl_jax.data.pipeline import host_share


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The 1-D `data` mesh over `devices` (default: every device of every process) in the order JAX chooses for
    their physical layout; over several TPU slices (multislice), each slice's devices together."""
    devices = jax.devices() if devices is None else list(devices)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        ordered = mesh_utils.create_hybrid_device_mesh((len(devices) // slices,), (slices,), devices)
        return jax.sharding.Mesh(ordered, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_slice(global_rows: np.ndarray, axis: int = 0) -> np.ndarray:
    """This process's contiguous share of a global batch along `axis` (`pipeline.host_share`)."""
    return host_share(global_rows, jax.process_index(), jax.process_count(), axis)


def to_global(local_arrays: Any, sharding: NamedSharding) -> Any:
    """Host-local batch slices (a pytree of numpy arrays) -> global arrays sharded by rows."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_arrays)


def from_whole(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a numpy array every process holds whole (each device takes its part of it)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def connect_processes() -> None:
    """Right after the processes connect, one collective over every device and one across processes, while
    they are still in step: on CPU, gloo sets up each group of devices at its first collective and waits 30 s
    at most for the peers to join it, and processes drift apart later (RELIABILITY.md, design notes)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("spcl_jax: processes connected")
    ones = to_global(np.ones(jax.local_device_count(), np.float32), batch_sharding(data_mesh()))
    jax.block_until_ready(jax.jit(lambda x: x.sum())(ones))


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
