"""Plan a run for a target: compile every program of the run for it (in parallel worker processes), and, unless
quick, search the largest global batch whose training step fits, with and without rematerialised blocks.

The search is by compiles: a program's bytes per device grow about linearly with the batch, so a line through the
compiled sizes predicts the largest batch that fits (in multiples of the device count), which is then compiled to
check it; a prediction that does not fit, or that a new line moves, is compiled again, at most `MAX_CHECKS` times
per setting. The answer is the largest batch seen to fit by a compile, and whether the next multiple was seen not
to fit or is only predicted not to. Compiling a large step takes host memory too (15 GB for ResNet-50 at 170 images
per TPU v5e chip): when a compiler process dies with several at work, what it left is compiled again one at a time.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import multiprocessing
import resource
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from absl import logging

from spcl_jax.errors import UserError
from spcl_jax.data.sizes import Sizes
from spcl_jax.plan import analysis, fit, programs, targets

if TYPE_CHECKING:
    from spcl_jax import startup

MAX_CHECKS = 3
REMATS = ("none", "block")


@dataclasses.dataclass(frozen=True)
class Task:
    """Programs to compile in one worker: `names` of the run of `parts` (with `batch_size` and `remat` when given)."""

    parts: object  # startup.Parts
    sizes: Sizes
    target: targets.Target
    names: tuple
    batch_size: int | None = None
    remat: str | None = None


def run_task(task: Task) -> list[analysis.Measured]:
    """[Measured] of a task's programs (in a worker process, or in this one)."""
    import jax

    from spcl_jax import sharding

    # Executables for devices that are not here cannot be loaded back from JAX's persistent cache: keep out of it.
    jax.config.update("jax_enable_compilation_cache", False)
    parts = task.parts.with_step(batch_size=task.batch_size, remat=task.remat)
    devices = targets.devices(task.target)
    built = programs.build(parts, task.sizes, sharding.data_mesh(devices), task.names)
    cpu = None
    if task.target.platform != "tpu":  # no cost analysis there: count the FLOPs on a CPU lowering
        cpu = programs.build(parts, task.sizes, sharding.data_mesh(jax.devices("cpu")[:1]), task.names)
    results = []
    for name, program in built.items():
        counted = analysis.counted_flops(cpu[name], len(devices)) if cpu else None
        results.append(analysis.measure(program, counted))
    return results


@dataclasses.dataclass
class Search:
    """The largest-batch search of one remat setting: {global batch: bytes per device of the step} seen so far."""

    remat: str
    usable: int
    granularity: int
    seen: dict = dataclasses.field(default_factory=dict)
    steps: dict = dataclasses.field(default_factory=dict)  # batch -> Measured
    checks: int = 0

    def add(self, batch: int, measured: analysis.Measured) -> None:
        self.seen[batch], self.steps[batch] = measured.bytes_per_device, measured

    @property
    def largest_fitting(self) -> int | None:
        fitting = [b for b, used in self.seen.items() if used <= self.usable]
        return max(fitting) if fitting else None

    @property
    def smallest_over(self) -> int | None:
        over = [b for b, used in self.seen.items() if used > self.usable]
        return min(over) if over else None

    def line(self) -> tuple[float, float]:
        """(fixed bytes, bytes per unit of batch) through the two compiled batches nearest the limit, or through the
        one compile (`fit.one_point_line`)."""
        points = sorted(self.seen.items(), key=lambda item: abs(item[1] - self.usable))[:2]
        if len(points) == 2 and points[0][0] != points[1][0]:
            (b1, m1), (b2, m2) = points
            slope = (m2 - m1) / (b2 - b1)
            return m1 - slope * b1, slope
        batch = next(iter(self.seen))
        step = self.steps[batch]
        return fit.one_point_line(step.bytes_per_device, step.temporaries, step.arguments, batch)

    def next_batch(self) -> int | None:
        """The batch to compile next, or None when the search is done: the line's prediction, below any batch seen
        not to fit and above any seen to fit."""
        low, high = self.largest_fitting, self.smallest_over
        if self.checks >= MAX_CHECKS or (low is not None and high is not None and high - low <= self.granularity):
            return None
        predicted = fit.largest_on_line(*self.line(), self.usable, self.granularity)
        if predicted is not None and high is not None:
            predicted = min(predicted, high - self.granularity)
        if predicted is None or predicted < self.granularity or (low is not None and predicted <= low):
            return None
        return None if predicted in self.seen else predicted

    def answer(self) -> dict[str, int | str] | None:
        """{'global_batch', 'bytes_per_device', 'next_over': 'compiled' | 'predicted'} or None when none fits."""
        low = self.largest_fitting
        if low is None:
            return None
        high = self.smallest_over
        return {"global_batch": low, "bytes_per_device": self.seen[low],
                "next_over": "compiled" if high is not None and high - low <= self.granularity else "predicted"}


@dataclasses.dataclass
class Plan:
    target: targets.Target
    parts: object  # startup.Parts
    sizes: Sizes
    usable_memory: int
    programs: dict  # name -> Measured (the config's batch and remat)
    steps: dict  # remat -> {global batch: Measured} (the training steps compiled)
    max_batch: dict | None  # remat -> Search.answer(), None when quick


def plan(parts: startup.Parts, sizes: Sizes, target: targets.Target, *, quick: bool = False, jobs: int = 2,
         memory_fraction: float | None = None) -> Plan:
    """The `Plan` of the run of `parts` (a `startup.Parts`) on `target`."""
    usable = target.usable_memory(memory_fraction)
    rest = tuple(n for n in programs.PROGRAMS if n != "train_step")
    batch_size, remat = parts.training.batch_size, parts.architecture.remat
    remats = (remat,) if quick else (remat,) + tuple(r for r in REMATS if r != remat)
    searches = {r: Search(r, usable, target.chips) for r in remats}
    tasks = [Task(parts, sizes, target, ("train_step",), remat=r) for r in remats]
    tasks.append(Task(parts, sizes, target, rest))
    measured = {}
    with Compilers(jobs) as pool:
        for task, results in pool.run(tasks):
            for m in results:
                if m.name == "train_step":
                    searches[task.remat].add(batch_size, m)
                    if task.remat == remat:
                        measured[m.name] = m
                else:
                    measured[m.name] = m
        while not quick:
            round_tasks = []
            for search in searches.values():
                batch = search.next_batch()
                if batch is not None:
                    search.checks += 1
                    round_tasks.append(Task(parts, sizes, target, ("train_step",), batch, search.remat))
            if not round_tasks:
                break
            for task, results in pool.run(round_tasks):
                searches[task.remat].add(task.batch_size, results[0])
                logging.info("remat=%s: a global batch of %d needs %.2f GiB per device (%.2f GiB usable)", task.remat,
                             task.batch_size, results[0].bytes_per_device / 2**30, usable / 2**30)
    ordered = {name: measured[name] for name in programs.PROGRAMS if name in measured}
    return Plan(target, parts, sizes, usable, ordered, {r: s.steps for r, s in searches.items()},
                None if quick else {r: s.answer() for r, s in searches.items()})


class CompilerCrashed(UserError):
    """A compiler process died (libtpu or the CUDA plugin crashed on a program)."""


def completed(pool: concurrent.futures.Executor,
              tasks: Iterable[Task]) -> Iterator[tuple[Task, list[analysis.Measured]]]:
    """(task, its results) as each task finishes, logged."""
    futures = {pool.submit(run_task, task): task for task in tasks}
    for future in concurrent.futures.as_completed(futures):
        task = futures[future]
        try:
            results = future.result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise CompilerCrashed(
                f"the compiler crashed compiling {', '.join(task.names)} for {task.target.name} (its process died: "
                f"{e}); with --jobs=1 the crash ends this process too; another libtpu or CUDA plugin version may "
                "compile it") from e
        for m in results:
            setting = f" (global batch {task.batch_size or task.parts.training.batch_size}, remat={task.remat})" if (
                m.name == "train_step") else ""
            logging.info("compiled %s%s for %s in %.0f s: %.2f GiB per device", m.name, setting, task.target.name,
                         m.compile_seconds, m.bytes_per_device / 2**30)
        yield task, results


class Compilers:
    """The compiler processes (`jobs` at a time). When one dies while several are at work (most often the host's
    memory ran out), the tasks it left are compiled again in one process, and so is everything after."""

    def __init__(self, jobs: int):
        self.jobs, self.pool = jobs, _executor(jobs)

    def __enter__(self) -> Compilers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, list[analysis.Measured]]]:
        """(task, its results) as each task finishes."""
        finished = []
        try:
            for task, results in completed(self.pool, tasks):
                finished.append(task)
                yield task, results
        except CompilerCrashed as crash:
            if self.jobs <= 1:
                raise
            logging.warning("%s: compiling what is left one program at a time", crash)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.jobs, self.pool = 1, _compiler_processes(1)
            yield from completed(self.pool, [t for t in tasks if all(t is not f for f in finished)])


class _InProcess(concurrent.futures.Executor):
    """Runs each task in this process when it is submitted (jobs=1), on a thread with a 1 GiB stack (reserved, not
    used: see `_compiler_processes`)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        previous = threading.stack_size(1 << 30)
        try:  # the executor starts its thread at the first submit, with the stack size set now
            with concurrent.futures.ThreadPoolExecutor(1) as thread:
                future = thread.submit(fn, *args)
        finally:
            threading.stack_size(previous)
        future.result()  # a failed task raises here, at its submission, as when it ran on this thread
        return future


def _executor(jobs):
    if jobs <= 1:
        return _InProcess()
    return _compiler_processes(jobs)


def _compiler_processes(jobs):
    """`jobs` compiler processes with the largest stack the system allows: libtpu's compiler recursed past the
    default 8 MiB compiling configs/imagenet.py's step for a v6e-64 (a segmentation fault; unlimited, it compiled)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != hard:  # kept: the pool starts its processes at the first task, and they inherit it
        resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
