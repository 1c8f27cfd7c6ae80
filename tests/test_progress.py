"""The progress shown while training: the bar counts completed steps only, plain lines without a terminal,
the run's ETA, the compile/cluster announcements and train.log (end to end: test_train's spcl run)."""
import io
import logging as std_logging
import warnings

import pytest
from absl import logging

from spcl_jax import progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Output:
    """A dispatched step's output: `ready` once waited for."""

    def __init__(self):
        self.ready = False

    def block_until_ready(self):
        self.ready = True


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_counts_a_step_once_its_result_is_ready_one_step_behind():
    outputs = [Output() for _ in range(4)]
    with progress.Bar(0, 1, 4, 0, progress.Pace(4, []), stream=Terminal()) as bar:
        for output in outputs:
            bar.dispatched(output)
            shown = bar._bar.n if bar._bar else 0
            assert bar.done == shown == sum(o.ready for o in outputs) == outputs.index(output)
        bar.logged(1.0, 0.1, 100.0)  # the logged step's metrics were read: it is complete
        assert bar.done == bar._bar.n == 4 and all(o.ready for o in outputs)


def test_without_a_terminal_plain_lines_at_most_every_interval_and_no_carriage_returns(monkeypatch):
    clock, stream = Clock(), io.StringIO()
    pace = progress.Pace(20, [], clock=clock)
    pace.start(0)
    with progress.Bar(0, 2, 10, 0, pace, stream=stream, clock=clock) as bar:
        for _ in range(10):
            clock.now += 10
            bar.dispatched(Output())
            bar.logged(1.23, 0.1, 1234.4)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" (")[0] for line in lines] == [f"epoch 1/2 step {n}/10" for n in (3, 6, 9)]
    assert lines[0] == "epoch 1/2 step 3/10 (30%) loss 1.2300 1,234 img/s ETA 0:02:50"  # 17 steps left at 10 s


def test_processes_other_than_0_show_nothing():
    stream, clock = io.StringIO(), Clock()
    with progress.Bar(0, 1, 4, 0, progress.Pace(4, []), enabled=False, stream=stream, clock=clock) as bar:
        clock.now += 60
        bar.dispatched(Output())
        bar.logged(1.0, 0.1, 10.0)
    assert stream.getvalue() == ""


def test_eta_counts_the_steps_and_the_clusterings_left():
    clock = Clock()
    pace = progress.Pace(100, [0, 50], clock=clock)
    pace.clustered(20.0)  # epoch 1's clustering, before the compiling step
    pace.start(1)
    assert pace.eta(1) == "?"
    clock.now += 10
    assert pace.seconds_left(11) == pytest.approx(89 * 1.0 + 20.0)  # 1 s per step, one clustering to come
    clock.now += 39
    assert pace.seconds_left(50) == pytest.approx(50 * 1.0 + 20.0)  # the clustering at step 50 still to come
    clock.now += 30 + 10
    pace.clustered(30.0)  # at step 50: not steps' time
    assert pace.seconds_left(60) == pytest.approx(40 * 1.0)
    assert pace.seconds_left(100) == 0 and pace.eta(100) == "0:00:00"


@pytest.mark.parametrize("seconds,shown", [(312, "0:05:12"), (90061.4, "25:01:01"), (-3, "0:00:00")])
def test_duration(seconds, shown):
    assert progress.duration(seconds) == shown


def test_announcement_logs_what_and_how_long(monkeypatch):
    infos, clock = [], Clock()
    monkeypatch.setattr(progress.logging, "info", lambda fmt, *args, **_: infos.append(fmt % args))
    compiling = progress.Announcement("compiling the training step", clock=clock)
    clock.now += 12.34
    compiling.done("compiled", " (its first step included)")
    assert infos == ["compiling the training step ...", "compiled in 12.3 s (its first step included)"]


def test_train_log_keeps_log_lines_warnings_shown_text_and_plain_progress_lines(tmp_path, capsys):
    clock = Clock()
    try:
        progress.log_to_file(tmp_path)
        logging.warning("the first run")
        with warnings.catch_warnings():  # whatever filters earlier tests left: this one is shown
            warnings.simplefilter("always")
            warnings.warn("a library warning")
        progress.show("metric  value")
        with progress.Bar(0, 1, 2, 0, progress.Pace(2, []), stream=Terminal(), clock=clock) as bar:
            clock.now += 60
            bar.dispatched(Output())
            bar.logged(1.0, 0.1, 10.0)
        progress.stop_logging_to_file()
        progress.log_to_file(tmp_path)
        logging.warning("the resumed run")
    finally:
        progress.stop_logging_to_file()
        std_logging.captureWarnings(False)
    text = (tmp_path / progress.LOG_FILE).read_text()
    assert capsys.readouterr().out == "metric  value\n"
    shown = ["] the first run\n", "UserWarning: a library warning\n", "\nmetric  value\n",
             "\nepoch 1/1 step 1/2 (50%) loss 1.0000 10 img/s ETA ?\n", "] the resumed run\n"]
    assert [text.find(part) for part in shown] == sorted(text.find(part) for part in shown)
    assert -1 not in [text.find(part) for part in shown]
    assert "\r" not in text
