"""Before a run on accelerators loads its data: does its training step fit a device's memory?

The step is compiled for the run's mesh from shapes alone (the planner's builders, the dataset's nominal canvas)
and XLA's memory analysis is compared with what the device's allocator may use. A step that cannot fit stops the
run in one line with the bytes and the remedies, instead of an out-of-memory error after the data was loaded.
The compiled program lands in the persistent compilation cache, so the run's own compile of it is a cache hit.
CPUs have no such limit and skip the check.
"""
import numpy as np

from spcl_jax.errors import ConfigError

GIB = 1 << 30


def device_memory(device):
    """Bytes the device's allocator may use (on GPUs JAX's preallocated share), or None where there is no limit
    (CPUs)."""
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def check_step_fits(config, method, mesh):
    """Raises ConfigError, naming the bytes needed and available and the remedies, when the training step of
    `config` on `mesh` needs more memory than one of its devices has."""
    available = device_memory(mesh.devices.flat[0])
    if available is None:
        return
    from spcl_jax import train
    from spcl_jax.data import datasets
    from spcl_jax.plan import planner, programs

    canvas = datasets.nominal_canvas(config)
    classes = max(int(config.n_classes), 1)
    mean, std = (0.5,) * 3, (0.25,) * 3  # the normalisation constants do not change the program's shape
    sizes = programs.Sizes(config.batch_size, config.batch_size, 0, 1, classes, mean, std, canvas,
                           config.dataset in datasets.IN_MEMORY, True)
    run = train.make_run(config, method, sizes.splits(config.dataset), mesh)
    compiled = run.train_step.lower(train.abstract_state(run), train.batch_spec(run, config.batch_size)).compile()
    memory = compiled.memory_analysis()
    needed = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
              + memory.generated_code_size_in_bytes - memory.alias_size_in_bytes)
    if needed <= available:
        return
    largest = planner.predict_largest_batch(needed, memory.temp_size_in_bytes, memory.argument_size_in_bytes,
                                            config.batch_size, available, int(np.prod(mesh.devices.shape)))
    device = mesh.devices.flat[0]
    advice = f"a global batch of about {largest}" if largest else "a smaller batch_size"
    remat = "set --config.remat=block (recomputes each block, less memory), " if config.remat == "none" else ""
    raise ConfigError(
        f"the training step needs {needed / GIB:.2f} GiB per device and a {device.device_kind} has "
        f"{available / GIB:.2f} GiB: {remat}use {advice} (--config.batch_size; `python -m spcl_jax.plan` finds the "
        f"largest that fits by compiling), or more devices")
