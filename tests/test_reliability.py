"""Reliability (RELIABILITY.md): a busy or unwritable workdir, a save that fails or is killed, damaged
checkpoints, Ctrl-C and interrupt/resume cycles that end bit-identical.

Cheap cases run in-process on a small fake state; the cases that need a real run use the tiny digits
run of test_train, in-process where a signal can be sent to this process, else through launch.py.
"""
import dataclasses
import errno
import glob
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from configs import digits
from spcl_jax import checkpoint, epoch_batches, network, startup, train
from spcl_jax import workdir as workdir_module
from spcl_jax.errors import CheckpointError, ConfigError, DivergedError, WorkdirError
from spcl_jax.metrics import MetricWriter, read_metrics
from spcl_jax.storage import drop_partial_last_line
from spcl_jax.workdir import claim_workdir
from spcl_jax.method import METHODS
from conftest import ROOT, TINY, launch

# Two epochs of four steps with a checkpoint after every step (the SIGTERM test's run).
RUN = ["--config.method=spcl", "--config.n_epochs=2", "--config.max_steps_per_epoch=4",
       "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=20", "--config.evaluate_after_pretrain=False"]
ON_SIGNAL_ONLY = "--config.checkpoint_every_steps=0"  # then a mid-epoch checkpoint is the signal's save
STATE_KEYS = ("params", "batch_stats", "opt_state", "classifier_params", "classifier_opt_state", "step")


def stop_handlers():
    return {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS}


@pytest.fixture
def own_signals():
    """The Manager takes SIGTERM and SIGINT; give pytest its own handlers back whatever a test does."""
    previous = stop_handlers()
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def start(workdir, *overrides, stderr=subprocess.DEVNULL):
    """launch.py on the tiny digits run, in the background (stderr to a file: a full pipe would block it)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/digits.py",
                             f"--workdir={workdir}", *TINY, *overrides], cwd=ROOT, stderr=stderr)


def trained_steps(workdir):
    return [r["step"] for r in read_metrics(workdir) if "train/loss" in r]


def config_of(overrides):
    """The config launch.py builds from configs/digits.py and these --config.<key>=<value> overrides."""
    config = digits.get_config()
    for arg in overrides:
        key, value = arg.removeprefix("--config.").split("=", 1)
        config[key] = value == "True" if isinstance(config[key], bool) else type(config[key])(value)
    return config


def finished_steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def snapshot(directory):
    """Every file under `directory` with a hash of its bytes: equal snapshots = nothing written."""
    files = sorted(p for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p))
    return {os.path.relpath(p, directory): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in files}


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


# ---------------------------------------------------------------- workdir lock

def hold_workdir(workdir):
    """Another process that claims `workdir` and sleeps; returns once it holds the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spcl_jax.workdir import claim_workdir; "
         "claim_workdir(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_busy_workdir_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = hold_workdir(tmp_path)
    try:
        with pytest.raises(WorkdirError) as refused:
            claim_workdir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert str(refused.value) == (f"workdir {tmp_path} is in use by another run (pid {holder.pid} on "
                                  f"{socket.gethostname()}); wait for it to finish or stop it, or pass another --workdir")
    claim_workdir(tmp_path)  # the SIGKILLed holder's lock went with it
    claim_workdir(tmp_path)  # a second claim by the same process is a no-op
    assert open(tmp_path / ".lock").read() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_an_unwritable_workdir_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match=f"cannot write to workdir {tmp_path / 'file' / 'run'} "
                                           r"\(Not a directory\); pass a writable --workdir"):
        claim_workdir(tmp_path / "file" / "run")


def test_a_filesystem_without_locks_runs_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    warnings = []
    monkeypatch.setattr("fcntl.flock", no_locks)
    # absl's handler setup depends on earlier tests, so read the warning at the call, not from caplog
    monkeypatch.setattr(workdir_module.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    claim_workdir(tmp_path)
    assert warnings == [f"cannot lock workdir {tmp_path} (No locks available); make sure no other run uses it"]


@pytest.fixture(scope="module")
def busy_then_interrupted(tmp_path_factory):
    """Run A trains; while it is stopped (SIGSTOP) with the lock held, run B starts on the same workdir;
    then A continues and gets a Ctrl-C (SIGINT) once it has logged a step."""
    workdir = tmp_path_factory.mktemp("busy")
    log = tmp_path_factory.mktemp("busy_log") / "stderr"
    first = start(workdir, *RUN, ON_SIGNAL_ONLY, stderr=log.open("w"))
    deadline = time.time() + 300
    while not (workdir / ".lock").exists() or not (workdir / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    before = snapshot(workdir)
    second = launch(workdir, *RUN)
    after = snapshot(workdir)
    first.send_signal(signal.SIGCONT)
    while not (workdir / "metrics.jsonl").exists() or not trained_steps(workdir):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    first.wait(timeout=300)
    return dict(workdir=workdir, first=first, first_stderr=log.read_text(), second=second, before=before, after=after)


@pytest.mark.slow
def test_a_second_run_on_the_same_workdir_is_refused_and_the_first_is_untouched(busy_then_interrupted):
    run = busy_then_interrupted
    assert run["second"].returncode == 2
    assert error_line(run["second"].stderr) == (
        f"launch.py: error: workdir {run['workdir']} is in use by another run (pid {run['first'].pid} on "
        f"{socket.gethostname()}); wait for it to finish or stop it, or pass another --workdir")
    assert run["after"] == run["before"]
    # The first went on training, step after step, until the Ctrl-C of the next test.
    assert run["first"].returncode == 130
    assert trained_steps(run["workdir"]) == list(range(1, finished_steps(run["workdir"])[-1] + 1))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(busy_then_interrupted):
    run = busy_then_interrupted
    assert run["first"].returncode == 130
    last = error_line(run["first_stderr"])
    step = finished_steps(run["workdir"])[-1]
    command = shlex.join(["python", os.path.join(ROOT, "launch.py"), "--config", "configs/digits.py",
                          f"--workdir={run['workdir']}", *TINY, *RUN, ON_SIGNAL_ONLY])
    assert last == f"launch.py: stopped by SIGINT at step {step}; checkpoint saved; to resume, run {command}"
    assert "SIGINT: saving a checkpoint and stopping after this step (Ctrl-C again stops at once" in run["first_stderr"]
    assert 1 <= step < 8
    assert checkpoint.restore_network(str(run["workdir"] / "checkpoints"), -1)[1] == step
    # The command it prints resumes (python -> this interpreter).
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from the checkpoint of step {step} in {run['workdir'] / 'checkpoints'}" in resumed.stderr


def test_the_resume_command_names_the_workdir_a_default_run_got(monkeypatch):
    import launch as launch_py

    monkeypatch.setattr(sys, "argv", ["launch.py", "--config", "configs/digits.py", "--config.seed=3"])
    assert launch_py._resume_command("runs/digits/20261203T000000Z") == (
        "python launch.py --config configs/digits.py --config.seed=3 --workdir=runs/digits/20261203T000000Z")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/spcl-train", "--config=configs/my data.py", "--workdir", "w"])
    assert launch_py._resume_command("w") == "spcl-train '--config=configs/my data.py' --workdir w"


def test_a_second_ctrl_c_stops_at_once_and_close_gives_the_signals_back(tmp_path, own_signals):
    previous = stop_handlers()
    manager = checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert manager.stop_requested() and manager.stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    manager.close()
    assert stop_handlers() == previous
    assert checkpoint.Preempted(signal.SIGINT, 5).exit_status == 130
    assert checkpoint.Preempted(signal.SIGTERM, 5).exit_status == 143


# ---------------------------------------------------------------- saves that fail, checkpoints that are damaged

def fake_state(step):
    """A small state shaped like the trainer's, its values fixed by `step`."""
    rng = np.random.default_rng(step)
    return dict(params={"encoder": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}},
                batch_stats={"mean": jnp.asarray(rng.normal(size=4), jnp.float32)},
                opt_state=(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),), classifier_params={},
                classifier_opt_state=(), step=jnp.int32(step), first_nonfinite_step=jnp.int32(-1))


def save_steps(workdir, steps, config=None):
    manager = checkpoint.Manager(workdir, config or digits.get_config(), METHODS["spcl"])
    manager.restore_or(fake_state(0), 5)
    for step in steps:
        manager.save(fake_state(step), None, epoch_end=False)
    return manager


def assert_state_equal(got, want):
    for key in ("params", "batch_stats", "opt_state", "step"):
        got_leaves, want_leaves = jax.tree.leaves(jax.device_get(got[key])), jax.tree.leaves(jax.device_get(want[key]))
        assert len(got_leaves) == len(want_leaves) > 0, key
        for a, b in zip(got_leaves, want_leaves):
            np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.mark.parametrize("where", ["background write", "save call"])
def test_a_failed_save_is_one_line_and_the_previous_checkpoint_restores(tmp_path, monkeypatch, own_signals, where):
    """Disk full while orbax writes in the background (the error surfaces at the next wait), or a
    directory that refuses the save outright (read-only filesystem)."""
    pytest_handler = signal.getsignal(signal.SIGINT)
    manager = save_steps(tmp_path, [1, 2])
    manager.wait()
    if where == "background write":
        async def disk_full(self, item, directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))

        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
        manager.save(fake_state(3), None, epoch_end=False)  # returns: the write fails in the background
        with pytest.raises(CheckpointError) as failed:
            manager.close()
        reason = r"\(OSError: \[Errno 28\] No space left on device: '.*/3.orbax-checkpoint-tmp/config.*/metadata'\)"
    else:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "checkpoints"))

        monkeypatch.setattr(manager._manager, "save", read_only)
        with pytest.raises(CheckpointError) as failed:
            manager.save(fake_state(3), None, epoch_end=False)
        reason = r"\(OSError: \[Errno 30\] Read-only file system: '.*/checkpoints'\)"
    message = str(failed.value)
    assert re.fullmatch(f"saving the checkpoint of step 3 to {tmp_path / 'checkpoints'} failed {reason}; the "
                        "checkpoint of step 2 is intact: free disk space \\(or make the workdir writable\\), then to "
                        "resume, run the same command", message), message
    assert signal.getsignal(signal.SIGINT) == pytest_handler  # handed back after the failure
    monkeypatch.undo()
    assert finished_steps(tmp_path) == [1, 2]
    # (The run that resumes also deletes the partial save: see the kill -9 test. Here this process still
    # has orbax's threads writing it, so only read.)
    restored, step = checkpoint.restore_network(str(tmp_path / "checkpoints"), -1)
    assert step == 2
    assert_state_equal(restored, fake_state(2))


def test_a_state_past_a_non_finite_loss_is_never_saved(tmp_path, own_signals):
    """(The run that stops: test_train.test_non_finite_loss_stops_naming_step_and_terms.) The last good
    checkpoint stays the newest, and it restores."""
    manager = save_steps(tmp_path, [1, 2])
    manager.save(dict(fake_state(3), first_nonfinite_step=jnp.int32(2)), None, epoch_end=True)
    manager.close()
    assert finished_steps(tmp_path) == [1, 2]
    restored, _ = checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"]).restore_or(fake_state(0), 5)
    assert_state_equal(restored, fake_state(2))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A workdir whose checkpoints hold steps 1, 2 and 3 of the fake state."""
    previous = stop_handlers()
    workdir = tmp_path_factory.mktemp("three_steps")
    save_steps(workdir, [1, 2, 3]).close()
    assert stop_handlers() == previous
    return workdir


def _truncate(*patterns):
    def damage(step_dir):
        paths = [p for pattern in patterns for p in glob.glob(os.path.join(step_dir, pattern), recursive=True)
                 if os.path.isfile(p)]
        assert paths, patterns
        for path in paths:
            os.truncate(path, os.path.getsize(path) // 2)
    return damage


def _delete(pattern):
    def damage(step_dir):
        paths = glob.glob(os.path.join(step_dir, pattern))
        assert paths, pattern
        for path in paths:
            os.remove(path) if os.path.isfile(path) else shutil.rmtree(path)
    return damage


# damage to the newest step (3) -> does it also break loading for evaluation (which reads the state only)
DAMAGE = {
    "array data truncated": (_truncate("state/d/*"), True),
    "array data deleted": (_delete("state/d/*"), True),
    "array index truncated": (_truncate("state/manifest.ocdbt"), True),
    "tree metadata truncated": (_truncate("state/_METADATA"), True),
    "saved config truncated": (_truncate("config/metadata"), False),
    "every file truncated": (_truncate("**"), True),
    "step emptied": (_delete("*"), True),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_clear_line_and_nothing_is_written(three_steps, tmp_path, own_signals, damage):
    mutate, breaks_load = DAMAGE[damage]
    shutil.copytree(three_steps, tmp_path, dirs_exist_ok=True)
    directory = tmp_path / "checkpoints"
    mutate(str(directory / "3"))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as resume:
        checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"]).restore_or(fake_state(0), 5)
    assert str(resume.value).startswith(f"checkpoint step 3 in {directory} cannot be read (")
    assert str(resume.value).endswith(f"); delete {directory / '3'} to resume from step 2, or pass a new --workdir")
    if breaks_load:
        with pytest.raises(CheckpointError) as load:
            checkpoint.restore_network(str(directory), -1)
        assert str(load.value).startswith(f"checkpoint step 3 in {directory} cannot be read (")
        assert str(load.value).endswith("); other saved steps: [2]")  # keep_checkpoints=2
        assert "\n" not in str(load.value) and "Traceback" not in str(load.value)
    else:
        assert_state_equal(checkpoint.restore_network(str(directory), -1)[0], fake_state(3))
    assert "\n" not in str(resume.value) and "Traceback" not in str(resume.value)
    assert snapshot(tmp_path) == before
    # What the message says to do works: without step 3 the run resumes from step 2.
    shutil.rmtree(directory / "3")
    restored, _ = checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"]).restore_or(fake_state(0), 5)
    assert_state_equal(restored, fake_state(2))


def test_a_missing_or_empty_checkpoint_directory(three_steps, tmp_path, own_signals, monkeypatch):
    with pytest.raises(CheckpointError, match=f"^checkpoint directory {tmp_path / 'none'} does not exist; pass the "
                                              "<workdir>/checkpoints of a pretraining run$"):
        checkpoint.restore_network(str(tmp_path / "none"), -1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"^no checkpoint in {tmp_path / 'empty'}; pass the "
                                              "<workdir>/checkpoints of a pretraining run$"):
        checkpoint.restore_network(str(tmp_path / "empty"), -1)
    with pytest.raises(CheckpointError, match=f"^no checkpoint in {three_steps}; pass {three_steps / 'checkpoints'}$"):
        checkpoint.restore_network(str(three_steps), -1)
    with pytest.raises(CheckpointError, match=r"^step 7 is not saved in .*; saved steps: \[2, 3\]$"):
        checkpoint.restore_network(str(three_steps / "checkpoints"), 7)
    # Resuming a workdir without checkpoints is a fresh start, and says so.
    fresh = fake_state(0)
    infos = []
    monkeypatch.setattr(checkpoint.logging, "info", lambda fmt, *args: infos.append(fmt % args))
    assert checkpoint.Manager(tmp_path / "empty", digits.get_config(), METHODS["spcl"]).restore_or(fresh, 5) == (fresh, None)
    assert f"no checkpoint in {tmp_path / 'empty' / 'checkpoints'}: starting at step 0" in infos


@pytest.fixture(scope="module")
def tiny_model_saved(tmp_path_factory):
    """A workdir with one checkpoint (step 4) of the tiny digits network."""
    previous = stop_handlers()
    workdir = tmp_path_factory.mktemp("tiny_model")
    config = config_of(TINY)
    _, params, batch_stats = network.create(startup.architecture(config), METHODS["spcl"], 10, 0)
    manager = checkpoint.Manager(workdir, config, METHODS["spcl"])
    manager.restore_or(fake_state(0), 5)
    manager.save(dict(fake_state(4), params=params, batch_stats=batch_stats), None, epoch_end=True)
    manager.close()
    assert stop_handlers() == previous
    return workdir


@pytest.mark.parametrize("change,message", [
    ({"width_multiplier": 0.125}, "encoder/layer1/0/bn1/bias/value has shape (4,) in the checkpoint but (8,) in this "
                                  "model; check model, width_multiplier and proj_dim"),
    ({"model": "resnet34"}, "the checkpoint has no encoder/layer1/2/bn1/bias/value; was it written for another "
                            "model or method?"),
])
def test_a_checkpoint_of_another_model_is_refused_for_evaluation(tiny_model_saved, own_signals, change, message):
    """(Resuming with another model: test_train.test_resuming_with_another_model_is_refused.)"""
    before = snapshot(tiny_model_saved)
    config = config_of(TINY)
    config.update(change)
    _, other_params, _ = network.create(startup.architecture(config), METHODS["spcl"], 10, 0)
    saved, step = checkpoint.restore_network(str(tiny_model_saved / "checkpoints"), -1)
    what = f"checkpoint step {step} in {tiny_model_saved / 'checkpoints'}"
    with pytest.raises(CheckpointError) as refused:
        checkpoint.fill(other_params, saved["params"], what=what)
    assert str(refused.value) == f"{what}: {message}"
    assert snapshot(tiny_model_saved) == before


# ---------------------------------------------------------------- kill -9 during a save, interrupt/resume cycles

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final state of the run in one go (in-process, like the resumed runs it is compared with)."""
    previous = stop_handlers()
    state, _ = train.train_and_evaluate(config_of(TINY + RUN), str(tmp_path_factory.mktemp("uninterrupted")))
    assert stop_handlers() == previous
    return jax.device_get({k: getattr(state, k) for k in STATE_KEYS})


def assert_same_run(state, reference):
    got = jax.device_get({k: getattr(state, k) for k in STATE_KEYS})
    assert int(got["step"]) == 8
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(reference)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def kill_during_a_save(workdir):
    """Starts the run and SIGKILLs it while a save's temporary directory exists after a finished one;
    True if the kill left that save unfinished (a few tries: the window is a fraction of a second)."""
    process = start(workdir, *RUN)
    directory = workdir / "checkpoints"
    while process.poll() is None:
        names = os.listdir(directory) if directory.is_dir() else []
        if "1" in names and any("orbax-checkpoint-tmp" in n for n in names):
            process.kill()
            break
        time.sleep(0.002)
    process.wait()
    return process.returncode == -signal.SIGKILL and any("orbax-checkpoint-tmp" in n for n in os.listdir(directory))


@pytest.mark.slow
def test_kill_9_during_a_save_then_the_previous_checkpoint_resumes_to_the_same_end(tmp_path, uninterrupted, own_signals):
    for attempt in range(4):
        workdir = tmp_path / f"try{attempt}"
        if kill_during_a_save(workdir):
            break
    else:
        pytest.fail("the kill never landed during a save in 4 runs")
    steps = finished_steps(workdir)
    assert steps and steps[-1] < 8
    _, restored_step = checkpoint.restore_network(str(workdir / "checkpoints"), -1)
    assert restored_step == steps[-1]
    state, _ = train.train_and_evaluate(config_of(TINY + RUN), str(workdir))
    assert_same_run(state, uninterrupted)
    assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))
    assert finished_steps(workdir) == list(range(1, 9))


@pytest.mark.slow
def test_three_sigterm_resume_cycles_end_with_the_uninterrupted_parameters(tmp_path, monkeypatch, uninterrupted,
                                                                          own_signals):
    """SIGTERM after step 2 (mid-epoch), 4 (an epoch end, before re-clustering) and 7, each saved by the
    signal (no periodic checkpoints) and resumed. The four runs share the first one's jitted step (one
    config, so the same function): tracing it again would double this test's time."""
    stops = [2, 4, 7]
    make_train_step, built = train.make_train_step, []

    def signalling_step(*args, **kwargs):
        built.append(built[0] if built else make_train_step(*args, **kwargs))

        def step(state, batch):
            state, metrics = built[0](state, batch)
            if stops and int(state.step) == stops[0]:
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics
        return step

    monkeypatch.setattr(train, "make_train_step", signalling_step)
    config = config_of(TINY + RUN + [ON_SIGNAL_ONLY])
    previous = stop_handlers()
    for stop in list(stops):
        with pytest.raises(checkpoint.Preempted, match=f"^stopped by SIGTERM at step {stop}; checkpoint saved"):
            train.train_and_evaluate(config, str(tmp_path))
        stops.pop(0)
        assert finished_steps(tmp_path)[-1] == stop and stop_handlers() == previous
    state, _ = train.train_and_evaluate(config, str(tmp_path))
    assert_same_run(state, uninterrupted)
    assert finished_steps(tmp_path) == [2, 4, 7, 8] and len(built) == 4
    assert trained_steps(tmp_path) == list(range(1, 9))


# ---------------------------------------------------------------- a workdir that holds another run

ONE_EPOCH = TINY + ["--config.method=spcl", "--config.n_epochs=1", "--config.evaluate_after_pretrain=False"]


@pytest.fixture
def checkpoint_warnings(monkeypatch):
    """The checkpoint module's warnings, read at the call (absl's handler setup depends on earlier tests)."""
    warnings = []
    monkeypatch.setattr(checkpoint.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    return warnings


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch tiny run (2 steps)."""
    previous = stop_handlers()
    workdir = tmp_path_factory.mktemp("one_epoch")
    train.train_and_evaluate(config_of(ONE_EPOCH), str(workdir))
    assert stop_handlers() == previous
    return workdir


def test_overwriting_another_run_moves_it_aside_whole_and_never_mixes_steps(one_epoch, tmp_path, own_signals,
                                                                            checkpoint_warnings):
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)
    old_checkpoints, old_metrics = snapshot(tmp_path / "checkpoints"), read_metrics(tmp_path)
    command = config_of(ONE_EPOCH + ["--config.width_multiplier=0.125", "--config.overwrite_checkpoints=True"])
    train.train_and_evaluate(command, str(tmp_path))
    [aside] = glob.glob(str(tmp_path / "replaced-*"))
    assert checkpoint_warnings == [
        f"overwrite_checkpoints: the run of step 2 in {tmp_path / 'checkpoints'} (width_multiplier: 0.0625 -> "
        f"0.125) was moved to {aside}; delete it when you no longer need it"]
    assert snapshot(os.path.join(aside, "checkpoints")) == old_checkpoints
    assert read_metrics(aside) == old_metrics and os.path.isfile(os.path.join(aside, "config.json"))
    # The workdir holds the new run only: its checkpoint, its config, its metrics.
    assert finished_steps(tmp_path) == [2]
    assert checkpoint.restore_config(str(tmp_path / "checkpoints"), -1)[0]["width_multiplier"] == 0.125
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2]
    # The same command again resumes the new run: nothing more is moved aside.
    state, _ = train.train_and_evaluate(command, str(tmp_path))
    assert int(state.step) == 2 and len(glob.glob(str(tmp_path / "replaced-*"))) == 1


def test_resuming_on_other_data_is_refused_naming_what_changed(one_epoch, tmp_path, monkeypatch, own_signals):
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)
    load_splits = train.data.load_splits

    def fewer_images(spec):
        splits = load_splits(spec)
        return dataclasses.replace(splits, pretrain=splits.pretrain.subset(np.arange(1000)))

    monkeypatch.setattr(train.data, "load_splits", fewer_images)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as refused:
        train.train_and_evaluate(config_of(ONE_EPOCH + ["--config.n_epochs=2"]), str(tmp_path))
    assert re.fullmatch(
        f"{tmp_path / 'checkpoints'} holds another run \\(step 2; data pretrain_examples: 1347 -> 1000; data labels: "
        "'[0-9a-f]+' -> '[0-9a-f]+'; data pool_positions: '[0-9a-f]+' -> '[0-9a-f]+'\\); use a new --workdir, or "
        "--config.overwrite_checkpoints=True to move that run aside and start fresh here", str(refused.value))
    assert snapshot(tmp_path) == before  # config.json untouched


def test_a_changed_step_count_per_epoch_is_refused_and_other_changes_are_logged(one_epoch, tmp_path, own_signals,
                                                                                checkpoint_warnings):
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds another run \(step 2; steps per epoch \(max_steps_per_epoch, "
                                              r"batch_size, data\): 2 -> 1\)"):
        train.train_and_evaluate(config_of(ONE_EPOCH + ["--config.max_steps_per_epoch=1"]), str(tmp_path))
    assert snapshot(tmp_path) == before
    state, _ = train.train_and_evaluate(config_of(ONE_EPOCH + ["--config.n_epochs=2", "--config.learning_rate=0.5"]),
                                        str(tmp_path))
    assert int(state.step) == 4
    assert checkpoint_warnings == ["resuming with a changed learning_rate: 1.0 -> 0.5",
                                   "resuming with a changed n_epochs: 1 -> 2"]


def test_a_permission_error_is_named_and_no_deletion_is_advised(three_steps, tmp_path, monkeypatch, own_signals):
    """(This suite runs as root, which reads any file: the denial is simulated where orbax reads.)"""
    shutil.copytree(three_steps, tmp_path, dirs_exist_ok=True)
    denied = str(tmp_path / "checkpoints" / "3" / "state" / "manifest.ocdbt")

    def permission_denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", denied)

    manager = checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"])
    monkeypatch.setattr(manager._manager, "restore", permission_denied)
    with pytest.raises(CheckpointError) as refused:
        manager.restore_or(fake_state(0), 5)
    step_dir = tmp_path / "checkpoints" / "3"
    assert str(refused.value) == (
        f"checkpoint step 3 in {tmp_path / 'checkpoints'} cannot be read: permission denied ({denied}); give this "
        f"user read access (chmod -R u+rwX {step_dir}) or run as the user who wrote it")
    manager.close()


def test_an_unexplained_read_error_advises_moving_the_step_aside_not_deleting_it(three_steps, tmp_path, monkeypatch,
                                                                                 own_signals):
    shutil.copytree(three_steps, tmp_path, dirs_exist_ok=True)
    manager = checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"])

    def stale_mount(*args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(manager._manager, "restore", stale_mount)
    with pytest.raises(CheckpointError) as refused:
        manager.restore_or(fake_state(0), 5)
    step_dir = tmp_path / "checkpoints" / "3"
    assert str(refused.value).endswith(f"(OSError: [Errno 116] Stale file handle); if it is damaged, move it aside "
                                       f"(mv {step_dir} {step_dir}.unreadable) to resume from step 2")
    manager.close()
    monkeypatch.undo()
    os.rename(step_dir, f"{step_dir}.unreadable")  # what the message says to do works
    restored, _ = checkpoint.Manager(tmp_path, digits.get_config(), METHODS["spcl"]).restore_or(fake_state(0), 5)
    assert_state_equal(restored, fake_state(2))


@pytest.mark.parametrize("name, kind", [("checkpoints", "directory"), ("metrics.jsonl", "file"),
                                        ("config.json", "file"), ("tensorboard", "directory")])
def test_an_output_path_of_the_wrong_kind_is_refused_before_compiling(tmp_path, monkeypatch, name, kind):
    path = tmp_path / name
    path.mkdir() if kind == "file" else path.write_text("in the way")
    monkeypatch.setattr(train, "build", lambda *args: pytest.fail("compiled before checking the workdir"))
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError, match=f"^{path} is not a {kind}, and the run writes its {name} there; move it "
                                           "away or pass another --workdir$"):
        train.train_and_evaluate(config_of(ONE_EPOCH), str(tmp_path))
    assert snapshot(tmp_path) == before


def test_an_unreadable_checkpoint_directory_is_one_line_for_evaluation(three_steps, monkeypatch):
    def permission_denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(three_steps / "checkpoints"))

    monkeypatch.setattr(checkpoint, "open_manager", permission_denied)
    directory = str(three_steps / "checkpoints")
    with pytest.raises(CheckpointError, match=f"^checkpoint directory {directory} cannot be read \\(Permission denied\\); "
                                              f"give this user read access \\(chmod -R u\\+rwX {directory}\\) or pass a "
                                              "readable one$"):
        checkpoint.restore_network(directory, -1)


def test_a_full_disk_when_writing_config_json_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(WorkdirError, match=f"^writing {tmp_path / 'config.json'} failed \\(No space left on device\\); "
                                           "free disk space or pass another --workdir$"):
        checkpoint.write_config_json(str(tmp_path), digits.get_config(), METHODS["spcl"], facts={})
    assert os.listdir(tmp_path) == []


def test_sigterm_just_after_the_last_step_stops_before_the_evaluation_and_says_so(tmp_path, monkeypatch, own_signals):
    run_epoch = train.run_epoch

    def sigterm_after_the_epoch(*args):
        result = run_epoch(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train, "run_epoch", sigterm_after_the_epoch)
    monkeypatch.setattr(train.evaluate, "after_pretraining", lambda *args: pytest.fail("evaluated after SIGTERM"))
    with pytest.raises(checkpoint.Preempted) as stopped:
        train.train_and_evaluate(config_of(ONE_EPOCH + ["--config.evaluate_after_pretrain=True"]), str(tmp_path))
    assert str(stopped.value) == ("stopped by SIGTERM at the evaluation after pretraining; pretraining is complete "
                                  "(checkpoint of step 2): to run the evaluation, run the same command")
    assert stopped.value.exit_status == 143 and finished_steps(tmp_path) == [2]


def test_sigterm_during_the_final_evaluation_stops_at_once_and_says_what_to_run(one_epoch, tmp_path, monkeypatch,
                                                                              own_signals):
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)
    evaluated = []

    def slow_evaluation(*args):
        evaluated.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        pytest.fail("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(train.evaluate, "after_pretraining", slow_evaluation)
    previous, began = stop_handlers(), time.time()
    with pytest.raises(checkpoint.Preempted, match=r"^stopped by SIGTERM at the evaluation after pretraining; "
                                                   r"pretraining is complete \(checkpoint of step 2\)"):
        train.train_and_evaluate(config_of(ONE_EPOCH + ["--config.evaluate_after_pretrain=True"]), str(tmp_path))
    assert evaluated and time.time() - began < 25 and stop_handlers() == previous


def test_a_finite_explosion_stops_and_the_newest_healthy_checkpoint_is_kept(tmp_path, own_signals):
    """A healthy epoch, then the default LARS at learning_rate=1e6: the loss explodes but stays finite (no NaN
    guard would fire). The step-5 checkpoint, whose state produced the explosion, moves aside; step 4 stays."""
    run = ONE_EPOCH + ["--config.max_steps_per_epoch=4", "--config.checkpoint_every_steps=1",
                       "--config.keep_checkpoints=2", "--config.learning_rate=0.1"]
    train.train_and_evaluate(config_of(run), str(tmp_path))
    with pytest.raises(DivergedError) as stopped:
        train.train_and_evaluate(config_of(run + ["--config.n_epochs=3", "--config.learning_rate=1e6"]), str(tmp_path))
    message = str(stopped.value)
    match = re.fullmatch(r"the loss exploded by step 6: (\S+) is more than divergence_factor=20 times the first "
                         r"step's (\S+): train/grad_norm=.*, train/loss=.*; lower learning_rate or set grad_clip_norm "
                         r"\(divergence_factor=0 turns the explosion check off\), to resume from the checkpoint of step "
                         r"4 \(the newest before it diverged\), run the same command with that change", message)
    assert match, message
    assert np.isfinite(float(match[1])) and float(match[1]) > 20 * float(match[2])
    assert finished_steps(tmp_path) == [4] and os.path.isdir(tmp_path / "checkpoints" / "5.diverged")
    # What the message says works: the same run with a sane learning rate resumes from step 4 and finishes.
    state, _ = train.train_and_evaluate(config_of(run + ["--config.n_epochs=3"]), str(tmp_path))
    assert int(state.step) == 12
    assert all(np.isfinite(r["train/loss"]) for r in read_metrics(tmp_path) if r["step"] > 6 and "train/loss" in r)


def test_a_record_half_written_by_a_killed_run_is_dropped_when_the_run_resumes(tmp_path):
    """kill -9 while a record was being written leaves half a line; the resumed run's writer cuts it off instead of
    continuing it (which made one line no JSON parser reads, and the run's end, reading the file, died)."""
    whole = '{"step": 1, "epoch": 1, "train/loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text(whole + '{"step": 2, "epoch": 1, "train/lo')
    writer = MetricWriter(str(tmp_path))
    writer.write(2, 0, {"train/loss": 1.5})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 1, "epoch": 1, "train/loss": 2.0},
                                      {"step": 2, "epoch": 1, "train/loss": 1.5}]
    for text, kept in ((whole * 3 + "{", whole * 3), (whole, whole), ("{", ""), ("", "")):
        path = tmp_path / "cut.jsonl"
        path.write_text(text)
        drop_partial_last_line(str(path), chunk=5)  # several reads back to the newline
        assert path.read_text() == kept
    drop_partial_last_line(str(tmp_path / "absent.jsonl"))  # nothing to cut
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_full_disk_for_metrics_mid_run_saves_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch,
                                                                                    own_signals):
    write = train.MetricWriter.write

    def disk_full_at_step_3(self, step, epoch, scalars):
        if step == 3 and "train/loss" in scalars:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, step, epoch, scalars)

    run = ONE_EPOCH + ["--config.max_steps_per_epoch=4"]
    monkeypatch.setattr(train.MetricWriter, "write", disk_full_at_step_3)
    with pytest.raises(WorkdirError, match=f"^writing {tmp_path / 'metrics.jsonl'} failed \\(No space left on device\\); "
                                           "the checkpoint of step 3 was saved: free disk space, then to resume, run the "
                                           "same command$"):
        train.train_and_evaluate(config_of(run), str(tmp_path))
    monkeypatch.undo()
    assert finished_steps(tmp_path) == [3]
    state, _ = train.train_and_evaluate(config_of(run), str(tmp_path))
    assert int(state.step) == 4 and trained_steps(tmp_path) == [1, 2, 4]


def test_a_train_split_too_small_for_the_original_linear_protocol_is_refused_before_pretraining(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build", lambda *args: pytest.fail("pretraining started"))
    small = config_of(ONE_EPOCH + ["--config.n_classes=1", "--config.train_sample=5", "--config.val_sample=0",
                                   "--config.linear_eval_protocol=original", "--config.evaluate_after_pretrain=True"])
    with pytest.raises(ConfigError, match=r"^invalid config: linear_eval_protocol='original'; valid: fast, or a train "
                                          r"split of at least 8 images \(it has 5\)$"):
        train.train_and_evaluate(small, str(tmp_path))


def test_collapsed_features_without_pairs_stop_in_one_line():
    config = config_of(ONE_EPOCH)
    source = dataclasses.make_dataclass("Source", ["labels"])(np.zeros(40, np.int64))
    splits = types.SimpleNamespace(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    parts = startup.parts(config, METHODS["spcl"], splits)
    run = types.SimpleNamespace(parts=parts, source=source, steps_per_epoch=2, method=METHODS["spcl"])
    with pytest.raises(DivergedError, match=r"^epoch 3 has no pairs to train on \(cannot build pairs: 1 clusters "
                                            r"have >= 2 members and 1 are non-empty .*\): the features collapsed"):
        epoch_batches.epoch_plan(run, 2, np.zeros(40, np.int64))
