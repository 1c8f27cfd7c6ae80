"""The hardware a run can be planned for: TPU slices by their Cloud names and GPU hosts, with each chip's facts.

A target name is how a user rents the hardware: `v5e-64` (TPU v5e, 64 chips), `v4-32` (TPU v4 counts
TensorCores: 16 chips), `v5p-128` (64 chips), `v6e-256`; `h100x8`, `h200x8`, `a100-80x8` for GPU hosts of
1, 2, 4 or 8 GPUs (`--hosts N` of them; TPU `--slices N` for multislice). `devices(target)` gives the target's
devices for compiling without the hardware: libtpu's topology description for TPUs, the CUDA plugin with a
GPU target description (`gpu_targets/*.txtpb`, shipped with the package) for GPUs. Nothing here needs an
accelerator.

Peak bfloat16 FLOP/s, memory and memory bandwidth per device, from the vendors' pages:
  TPU v4, v5e, v5p, v6e: Google Cloud TPU documentation, "TPU v4 / v5e / v5p / v6e", system architecture
  tables (v4: 275 TFLOP/s, 32 GiB, 1,200 GB/s; v5e: 197, 16 GiB, 819 GB/s; v5p: 459, 95 GB, 2,765 GB/s;
  v6e: 918, 32 GB, 1,638 GB/s), one JAX device per chip (v4 and v5p as megacore).
  H100 SXM, H200 SXM, A100 SXM 80 GB: NVIDIA datasheets, dense bfloat16 tensor-core rate (half the
  "with sparsity" figure: 989 / 989 / 312 TFLOP/s); memory and bandwidth as in the target descriptions.
JAX preallocates 75% of a GPU's memory for its arrays unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise, so
a GPU's usable memory is planned at that fraction (`memory_fraction`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax

GIB = 1 << 30
GPU_MEMORY_FRACTION = 0.75  # JAX's default preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device's facts (per JAX device: a TPU chip, a GPU)."""

    family: str  # the name prefix: v4, v5e, v5p, v6e, h100, h200, a100-80
    device_kind: str  # what jax reports as device_kind
    platform: str  # "tpu" | "cuda"
    memory_bytes: int
    peak_bf16_flops: float  # per second
    memory_bandwidth: float  # bytes per second
    source: str


CHIPS = {chip.family: chip for chip in (
    Chip("v4", "TPU v4", "tpu", 32 * GIB, 275e12, 1200e9, "Google Cloud TPU docs, TPU v4"),
    Chip("v5e", "TPU v5 lite", "tpu", 16 * GIB, 197e12, 819e9, "Google Cloud TPU docs, TPU v5e"),
    Chip("v5p", "TPU v5", "tpu", 95 * 10**9, 459e12, 2765e9, "Google Cloud TPU docs, TPU v5p"),
    Chip("v6e", "TPU v6 lite", "tpu", 32 * GIB, 918e12, 1638e9, "Google Cloud TPU docs, TPU v6e"),
    Chip("h100", "NVIDIA H100 80GB HBM3", "cuda", 84942979072, 989e12, 3.35232e12, "NVIDIA H100 datasheet (SXM)"),
    Chip("h200", "NVIDIA H200", "cuda", 150754820096, 989e12, 4.8e12, "NVIDIA H200 datasheet (SXM)"),
    Chip("a100-80", "NVIDIA A100-SXM4-80GB", "cuda", 85100068864, 312e12, 2.03904e12,
         "NVIDIA A100 datasheet (SXM 80 GB)"),
)}
GPU_TARGET_FILES = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100-80": "a100_80.txtpb"}

# TPU slice shapes by chip count. v5e/v6e: 2-D, hosts of 8 chips (slices of 1 or 4 chips: part of a host);
# v4/v5p: 3-D, hosts of 4 chips. Larger slices close their long dimensions into a torus (wraparound links).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_TENSORCORES_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # v4-8 and v5p-8 name TensorCores: 4 chips
GPUS_PER_HOST = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or a set of GPU hosts: `chips` devices in `hosts` hosts (and TPU `slices`)."""

    name: str
    chip: Chip
    chips: int
    hosts: int
    slices: int = 1
    topology: tuple = ()  # get_topology_desc's (name, options) for TPUs, the topology string for GPUs

    @property
    def platform(self) -> str:
        return self.chip.platform

    def usable_memory(self, memory_fraction: float | None = None) -> int:
        """Bytes per device a program may use: the chip's memory, times JAX's preallocated fraction on GPUs."""
        if memory_fraction is None:
            memory_fraction = GPU_MEMORY_FRACTION if self.platform == "cuda" else 1.0
        return int(self.chip.memory_bytes * memory_fraction)

    def describe(self) -> str:
        slices = f" in {self.slices} slices" if self.slices > 1 else ""
        return (f"{self.name}: {self.chips} x {self.chip.device_kind}{slices}, {self.hosts} host"
                f"{'s' if self.hosts > 1 else ''}")


def names() -> list[str]:
    """Every target name `parse` accepts (GPU names take --hosts)."""
    tpus = [f"{family}-{chips * _TENSORCORES_IN_NAME[family]}" for family in ("v4", "v5p") for chips in _SHAPES_3D]
    tpus += [f"{family}-{chips}" for family in ("v5e", "v6e") for chips in _SHAPES_2D]
    return tpus + [f"{family}x{n}" for family in GPU_TARGET_FILES for n in GPUS_PER_HOST]


def parse(name: str, hosts: int = 1, slices: int = 1) -> Target:
    """The Target of a name like v5e-64, v4-32, h100x8 (`hosts` GPU hosts, `slices` TPU slices); ValueError
    naming the valid choices otherwise."""
    valid = (f"valid: TPU slices v5e-1 ... v5e-256, v6e-1 ... v6e-256, v4-8 ... v4-8192, v5p-8 ... v5p-8192 "
             f"(chip counts {sorted(_SHAPES_2D)} for v5e/v6e, {sorted(_SHAPES_3D)} x 2 for v4/v5p), GPU hosts "
             f"{', '.join(f'{f}x8' for f in GPU_TARGET_FILES)} (x1, x2, x4 or x8 GPUs per host)")
    if hosts < 1 or slices < 1:
        raise ValueError(f"--hosts={hosts} --slices={slices}; valid: positive counts")
    gpu = re.fullmatch(r"(h100|h200|a100-80)x(\d+)", name)
    if gpu:
        family, per_host = gpu[1], int(gpu[2])
        if per_host not in GPUS_PER_HOST or slices != 1:
            raise ValueError(f"target {name!r} with --slices={slices}: {valid}; several hosts with --hosts")
        return Target(f"{name}" + (f" x {hosts} hosts" if hosts > 1 else ""), CHIPS[family], per_host * hosts,
                      hosts, topology=f"1x{hosts}x{per_host}")
    tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    if not tpu:
        raise ValueError(f"unknown target {name!r}; {valid}")
    family = tpu[1]
    cores = _TENSORCORES_IN_NAME[family]
    chips, remainder = divmod(int(tpu[2]), cores)
    shapes = _SHAPES_3D if cores == 2 else _SHAPES_2D
    if remainder or chips not in shapes or hosts != 1:
        raise ValueError(f"target {name!r}{f' with --hosts={hosts}' if hosts != 1 else ''}: {valid}; TPU slices "
                         "take --slices for multislice, not --hosts")
    shape = shapes[chips]
    options = {"num_slices": slices} if slices > 1 else {}
    if cores == 2:
        options.update(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1),
                       wrap=(chips >= 64,) * 3)
        per_host = 4
    else:
        per_host = min(chips, 8)
        options.update(chips_per_host_bounds=(2, 4, 1) if chips >= 8 else (*shape, 1),
                       wrap=(chips >= 256, chips >= 128, False))
    prefix = "v5" if family == "v5p" else family
    topology = (f"{prefix}:{'x'.join(map(str, shape))}", tuple(sorted(options.items())))
    return Target(name + (f" x {slices} slices" if slices > 1 else ""), CHIPS[family], chips * slices,
                  max(chips // per_host, 1) * slices, slices, topology)


def gpu_target_description(family: str) -> str:
    """The GpuTargetConfig text of a GPU family, shipped in spcl_jax/plan/gpu_targets."""
    return importlib.resources.files("spcl_jax.plan").joinpath("gpu_targets", GPU_TARGET_FILES[family]).read_text()


# What a process compiling for hardware that is not here needs before JAX starts: JAX itself on the CPU, the CUDA
# plugin not looking for a driver, several processes loading libtpu at once, and libtpu not asking for a metadata
# server or a TPU host it would only warn about (the topology it compiles for is given, not discovered).
COMPILE_ONLY_ENVIRONMENT = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                            "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                            "TPU_ACCELERATOR_TYPE": "v5litepod-1"}


def prepare_environment() -> None:
    """Sets COMPILE_ONLY_ENVIRONMENT (where not set) and JAX_PLATFORMS=cpu; call before JAX starts."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    for key, value in COMPILE_ONLY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@functools.lru_cache(maxsize=None)
def devices(target: Target) -> tuple[jax.Device, ...]:
    """The target's devices, for compiling only. TPUs need libtpu (`pip install -e ".[plan-tpu]"`), GPUs the
    CUDA plugin (`.[plan-gpu]`), and both `prepare_environment()` before JAX starts."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        name, options = target.topology
        return tuple(topologies.get_topology_desc(name, platform="tpu", **dict(options)).devices)
    family = target.chip.family
    return tuple(topologies.get_topology_desc(family, "cuda", target_config=gpu_target_description(family),
                                              topology=target.topology).devices)
