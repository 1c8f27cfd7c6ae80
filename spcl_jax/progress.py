"""What a run shows while it works, and `<workdir>/train.log`, which keeps it.

Training steps are dispatched asynchronously: a step handed to the device is not a step done. `Bar` counts
a step only once its result is ready, waiting for step i-1 right after dispatching step i, so the host still
prepares step i+1 while the device runs step i. On a terminal it is a tqdm bar; elsewhere (CI, nohup,
SLURM logs) a plain line at a logged step at most every LINE_SECONDS. Compiling and clustering, which can
take minutes with nothing else on the screen, are announced with their durations (`Announcement`).
"""
from __future__ import annotations

import logging as std_logging
import sys
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, TextIO

from absl import logging
from tqdm import tqdm

from spcl_jax import storage

if TYPE_CHECKING:
    import jax

LOG_FILE = "train.log"
LINE_SECONDS = 30.0  # plain progress lines (stderr without a terminal, and train.log) at most this often

_log_file = None  # the FileHandler of train.log, once `log_to_file` ran


def log_to_file(workdir: str) -> None:
    """From now on absl log lines, Python warnings, `show`n text and the plain progress lines also go to
    `<workdir>/train.log`, appended so that a resumed run continues it. Called by process 0 once it holds
    the workdir and its checkpoints passed their checks, so that a refused run writes nothing. On gs:// the
    lines are stored every `storage.AppendLog` interval and when the process exits."""
    global _log_file
    path = storage.absolute(storage.join(workdir, LOG_FILE))
    if _log_file is not None and _log_file.baseFilename == path:
        return
    stop_logging_to_file()
    if storage.is_url(path):
        handler = std_logging.StreamHandler(storage.AppendLog(path))
        handler.baseFilename = path
    else:
        handler = std_logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.PythonFormatter())
    for console_filter in logging.get_absl_handler().filters:  # the library chatter the console leaves out
        handler.addFilter(console_filter)
    std_logging.getLogger().addHandler(handler)
    # Warnings become log lines, on the console and in the file alike. Off, then on: a `warnings.catch_warnings`
    # that ended since an earlier call put the original `showwarning` back while logging still thinks it captures.
    std_logging.captureWarnings(False)
    std_logging.captureWarnings(True)
    _log_file = handler


def stop_logging_to_file() -> None:
    global _log_file
    if _log_file is not None:
        std_logging.getLogger().removeHandler(_log_file)
        _log_file.close()
        if isinstance(_log_file.stream, storage.AppendLog):
            _log_file.stream.close()
        _log_file = None


def show(text: str, stream: TextIO | None = None) -> None:
    """Prints `text` (to stdout unless `stream`) and appends it to train.log."""
    print(text, file=stream or sys.stdout, flush=True)
    _append(text)


def _append(text):
    if _log_file is not None:
        with _log_file.lock:
            _log_file.stream.write(text + "\n")
            _log_file.flush()


def duration(seconds: float) -> str:
    """H:MM:SS, hours unbounded, so that the ETA of a week-long run stays one token."""
    seconds = max(round(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Announcement:
    """Logs `doing ...` now and, on `done`, how long it took since: for waits long enough to look like a hang."""

    def __init__(self, doing: str, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        logging.info("%s ...", doing, stacklevel=2)  # the log line names the caller's file and line
        self._began = clock()

    @property
    def seconds(self) -> float:
        return self._clock() - self._began

    def done(self, what: str, details: str = "") -> None:
        logging.info("%s in %.1f s%s", what, self.seconds, details, stacklevel=2)


class Pace:
    """The time left in pretraining: seconds per step measured since this process's first step completed
    (so compiling is left out, while checkpoints and monitors between epochs count) times the steps left,
    plus the mean measured clustering for each clustering still to come."""

    def __init__(self, total_steps: int, clustering_steps: Collection[int],
                 clock: Callable[[], float] = time.monotonic):
        """`clustering_steps`: the step counts at which a clustering runs (before the next step)."""
        self.total_steps, self._clustering_steps, self._clock = total_steps, clustering_steps, clock
        self._since = None  # (step, time) when this process's first step completed
        self._clusterings = []  # seconds of each clustering of this process
        self._clustering_since = 0.0  # of those, the seconds spent after `_since`

    @property
    def started(self) -> bool:
        """Whether this process completed a step (its first one compiles the step)."""
        return self._since is not None

    def start(self, step: int) -> None:
        self._since = (step, self._clock())

    def clustered(self, seconds: float) -> None:
        self._clusterings.append(seconds)
        if self.started:
            self._clustering_since += seconds

    def seconds_left(self, step: int) -> float | None:
        """After `step` steps completed; None until a step after the first one completed."""
        if not self.started or step <= self._since[0]:
            return None
        first, began = self._since
        per_step = (self._clock() - began - self._clustering_since) / (step - first)
        clusterings = sum(1 for at in self._clustering_steps if step <= at < self.total_steps)
        per_clustering = sum(self._clusterings) / len(self._clusterings) if self._clusterings else 0.0
        return per_step * (self.total_steps - step) + per_clustering * clusterings

    def eta(self, step: int) -> str:
        left = self.seconds_left(step)
        return "?" if left is None else duration(left)


class _ClearBar(std_logging.Filter):
    """Clears the bar's line before a log line is printed; the bar redraws below it at its next update."""

    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar = bar

    def filter(self, record: std_logging.LogRecord) -> bool:
        self.bar.clear()
        return True


class Bar:
    """One epoch's progress, counting completed steps only; process 0 shows it, the others stay silent.

    After dispatching a step, `dispatched(output)` waits for the previous step's output and counts that
    step. `logged` counts a logged step (its metrics were read, so it is complete) and shows its metrics.
    """

    def __init__(self, epoch: int, n_epochs: int, steps_per_epoch: int, done: int, pace: Pace, *, enabled: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.epoch, self.n_epochs, self.total, self.done = epoch, n_epochs, steps_per_epoch, done
        self.pace, self.enabled, self._clock = pace, enabled, clock
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self._pending = None
        self._bar = None  # tqdm, made at the first completed step so that nothing sits at 0% while compiling
        self._last_line = clock()

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self._complete()
        if self._bar is not None:
            self._bar.close()
            logging.get_absl_handler().removeFilter(self._clear)

    @property
    def step(self) -> int:
        """Completed steps of the run."""
        return self.epoch * self.total + self.done

    def dispatched(self, output: jax.Array) -> None:
        """`output`: a result of the step just dispatched (anything with `block_until_ready`)."""
        self._complete()
        self._pending = output

    def logged(self, loss: float, lr: float, images_per_sec: float) -> None:
        self._complete()
        eta = self.pace.eta(self.step)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.3g}, {images_per_sec:,.0f} img/s, ETA {eta}")
        if self._clock() - self._last_line >= LINE_SECONDS:
            self._line(f"loss {loss:.4f} {images_per_sec:,.0f} img/s ETA {eta}")

    def _complete(self):
        if self._pending is None:
            return
        self._pending.block_until_ready()
        self._pending = None
        self.done += 1
        if self.enabled and self.terminal:
            if self._bar is None:
                self._open_bar()
            self._bar.update(1)

    def _open_bar(self):
        self._bar = tqdm(total=self.total, initial=self.done - 1, desc=f"epoch {self.epoch + 1}/{self.n_epochs}",
                         unit="step", file=self.stream, dynamic_ncols=True)
        self._clear = _ClearBar(self._bar)
        logging.get_absl_handler().addFilter(self._clear)

    def _line(self, metrics):
        """epoch 3/10 step 120/400 (30%) loss 1.2345 1,234 img/s ETA 0:05:12"""
        self._last_line = self._clock()
        if not self.enabled:
            return
        line = (f"epoch {self.epoch + 1}/{self.n_epochs} step {self.done}/{self.total} "
                f"({100 * self.done // self.total}%) {metrics}")
        if not self.terminal:
            print(line, file=self.stream, flush=True)
        _append(line)
