"""Compile a lowered program for its target and read what it needs per device: XLA's memory analysis, its FLOPs and
bytes (XLA's cost analysis where the backend has one: TPUs; counted otherwise), its collectives, and the least
time the chip's peak rates allow (a roofline bound, not a prediction).

Counting where XLA gives no cost analysis (the CUDA plugin gives none): FLOPs are XLA's HloCostAnalysis of the
same program lowered for one CPU device at the global sizes (the same math, before any optimisation), divided by
the device count; bytes are the operands and results of every kernel of the compiled program (`hlo.traffic`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from spcl_jax.plan import hlo

if TYPE_CHECKING:
    from spcl_jax.plan.programs import Program
    from spcl_jax.plan.targets import Chip


@dataclasses.dataclass
class Measured:
    """One program compiled for the target: bytes per device and what a call costs each device."""

    name: str
    what: str
    calls: int
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    code: int
    resident: int
    flops: float | None  # per call and device
    bytes_accessed: float | None  # per call and device
    cost_source: str  # "xla" | "counted"
    collectives: dict  # {kind: (count, result bytes)} per call
    compile_seconds: float

    @property
    def program_bytes(self) -> int:
        """What the program itself holds at its peak: arguments + outputs + temporaries + code - aliased (donated
        arguments that become outputs count once)."""
        return self.arguments + self.outputs + self.temporaries + self.code - self.aliased

    @property
    def bytes_per_device(self) -> int:
        """The program's peak plus what other buffers keep on the device meanwhile (`resident`)."""
        return self.program_bytes + self.resident

    def least_seconds(self, chip: Chip) -> float | None:
        """The least time one call can take on `chip`: its FLOPs at the peak bfloat16 rate or its bytes at the full
        memory bandwidth, whichever is longer (None when neither is known)."""
        bounds = [v for v in (self.flops and self.flops / chip.peak_bf16_flops,
                              self.bytes_accessed and self.bytes_accessed / chip.memory_bandwidth) if v]
        return max(bounds) if bounds else None

    def bound_by(self, chip: Chip) -> str:
        if not self.flops or not self.bytes_accessed:
            return "compute" if self.flops else "memory"
        return ("compute" if self.flops / chip.peak_bf16_flops >= self.bytes_accessed / chip.memory_bandwidth
                else "memory")


def measure(program: Program, counted_flops: float | None = None) -> Measured:
    """Compile `program` (a `programs.Program`) and read it. `counted_flops`: FLOPs per call and device counted
    elsewhere (the CPU lowering), used where the backend gives no cost analysis."""
    start = time.perf_counter()
    compiled = program.lowered.compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    traffic = hlo.traffic(compiled.as_text())
    if cost.get("flops"):
        flops, accessed, source = float(cost["flops"]), float(cost.get("bytes accessed", 0.0)) or None, "xla"
    else:
        flops, accessed, source = counted_flops, float(traffic.kernel_bytes), "counted"
    if program.counted_flops is not None:  # a loop XLA cannot count (k-means)
        flops, accessed, source = program.counted_flops, program.counted_bytes, "counted"
    return Measured(
        name=program.name, what=program.what, calls=program.calls, arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes, temporaries=memory.temp_size_in_bytes,
        aliased=memory.alias_size_in_bytes, code=memory.generated_code_size_in_bytes, resident=program.resident,
        flops=flops, bytes_accessed=accessed, cost_source=source, collectives=traffic.collectives,
        compile_seconds=seconds)


def counted_flops(cpu_program: Program, devices: int) -> float | None:
    """FLOPs per device of a program lowered for one CPU device at the global sizes: XLA's HloCostAnalysis of the
    unoptimised program over the device count (data parallelism splits the work evenly)."""
    cost = cpu_program.lowered.cost_analysis() or {}
    flops = cost.get("flops")
    return float(flops) / devices if flops else None
