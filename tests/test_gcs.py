"""gs:// workdirs against a real GCS API (the `gcs` fixture: the registry's emulator, in memory): the storage
functions, the workdir lease, and runs, checkpoints, evaluation and export whose paths are gs:// URLs.

The emulator ignores generation preconditions (`ifGenerationMatch`), so what they add on GCS (exactly one of
two runs that take a free lease at the same instant wins) is not tested here; the lease reads before it
writes, so every sequential case is.
"""
import datetime
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

import spcl_jax
from conftest import ROOT, TINY, GcsFolder, launch, launch_cli
from spcl_jax import checkpoint, evaluate, export, lease, storage, train
from spcl_jax import workdir as workdir_module
from spcl_jax.errors import WorkdirError
from spcl_jax.metrics import read_metrics
from test_multiprocess import RUN as MP_RUN
from test_multiprocess import SIMCLR, _finish, _free_port, _tails, _wait_until
from test_reliability import ON_SIGNAL_ONLY, RUN, STATE_KEYS, assert_same_run, config_of, own_signals  # noqa: F401 (a fixture)


def test_whole_files_listings_and_moves(gcs):
    storage.write_atomic(storage.join(gcs, "a", "config.json"), lambda f: f.write(b'{"x": 1}'))
    storage.write_atomic(storage.join(gcs, "a", "sub", "b.txt"), lambda f: f.write(b"b"))
    assert storage.read_text(storage.join(gcs, "a", "config.json")) == '{"x": 1}'
    assert storage.listdir(storage.join(gcs, "a")) == ["config.json", "sub"]
    assert storage.isdir(storage.join(gcs, "a", "sub")) and not storage.isfile(storage.join(gcs, "a", "sub"))
    assert storage.isfile(storage.join(gcs, "a", "config.json")) and not storage.isdir(storage.join(gcs, "a", "c"))
    assert not storage.exists(storage.join(gcs, "a", "missing"))

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        storage.write_atomic(storage.join(gcs, "a", "config.json"), fail)
    assert storage.read_text(storage.join(gcs, "a", "config.json")) == '{"x": 1}'  # the old file, whole
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(gcs, "a", "missing"))

    storage.move(storage.join(gcs, "a", "sub"), storage.join(gcs, "moved", "sub"))
    storage.move(storage.join(gcs, "a", "config.json"), storage.join(gcs, "moved", "config.json"))
    assert storage.listdir(storage.join(gcs, "moved")) == ["config.json", "sub"]
    assert storage.read_text(storage.join(gcs, "moved", "sub", "b.txt")) == "b"
    assert not storage.exists(storage.join(gcs, "a"))


def test_an_append_log_grows_by_whole_uploads_and_a_resumed_writer_continues_it(gcs):
    path = storage.join(gcs, "metrics.jsonl")
    now = [0.0]
    log = storage.AppendLog(path, interval=30, clock=lambda: now[0])
    log.write('{"step": 1}\n')
    log.flush()  # not due: nothing uploaded yet
    assert not storage.exists(path)
    now[0] = 31.0
    log.write('{"step": 2}\n')
    log.flush()
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'
    log.write('{"step": 3}\n')
    log.close()
    assert storage.read_text(path).splitlines()[-1] == '{"step": 3}'
    # A run killed between uploading a part and composing it leaves the part; the next writer removes it.
    storage.write_atomic(path + ".part-1-ab", lambda f: f.write(b'{"step": 4}\n'))
    resumed = storage.AppendLog(path)
    resumed.write('{"step": 4}\n')
    resumed.close()
    assert storage.read_text(path).splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}', '{"step": 4}']
    assert storage.listdir(gcs) == ["metrics.jsonl"]


def test_a_leased_workdir_is_refused_naming_the_holder_and_released_at_the_end(gcs):
    holder = lease.Lease.take(storage.join(gcs, lease.LEASE_OBJECT), seconds=30, what=f"workdir {gcs}")
    try:
        with pytest.raises(WorkdirError, match=rf"^workdir {gcs} is in use by another run \(pid \d+ on .+, started "
                                               r"20\d\d-.*; wait for it to finish or stop it, or pass another"):
            workdir_module.claim_workdir(gcs)
    finally:
        holder.release()
    assert not storage.exists(storage.join(gcs, lease.LEASE_OBJECT))
    workdir_module.claim_workdir(gcs)  # free again
    try:
        record = json.loads(storage.read_text(storage.join(gcs, lease.LEASE_OBJECT)))
        assert record["seconds"] == lease.LEASE_SECONDS and record["started"] <= record["renewed"]
    finally:
        workdir_module._held.pop(storage.absolute(gcs)).release()


def test_a_live_holder_keeps_its_lease_and_a_lapsed_one_is_taken_over_after_watching(gcs):
    url = storage.join(gcs, lease.LEASE_OBJECT)
    live = lease.Lease.take(url, seconds=1.0)
    live.now = lambda: datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)  # its clock says it lapsed
    time.sleep(0.5)  # renewed (every 0.2 s) with that clock since
    try:  # the watching sees the renewals: refused
        with pytest.raises(WorkdirError, match="is in use by another run .*renewed 2000-01-01"):
            lease.Lease.take(url, seconds=1.0)
    finally:
        live.release()
    # A run that died: its lease is never renewed again.
    dead = {"host": "elsewhere", "pid": 1, "started": "2000-01-01T00:00:00+00:00",
            "renewed": "2000-01-01T00:00:00+00:00", "seconds": 1.0, "token": "0"}
    storage.write_atomic(url, lambda f: f.write(json.dumps(dead).encode()))
    began = time.monotonic()
    taken = lease.Lease.take(url, seconds=1.0)
    try:
        assert time.monotonic() - began >= 1.0  # watched for `seconds` first
        assert json.loads(storage.read_text(url))["token"] == taken.record["token"]
    finally:
        taken.release()


def test_a_run_whose_lease_is_taken_stops_at_once(gcs):
    url = storage.join(gcs, lease.LEASE_OBJECT)
    exits = []
    taken = lease.Lease.take(url, seconds=0.5)
    stopped = threading.Event()
    taken._lost = lambda why: (exits.append(why), stopped.set(), taken._stop.set())
    other = {"host": "elsewhere", "pid": 2, "started": "x", "renewed": "x", "seconds": 0.5, "token": "1"}
    storage.write_atomic(url, lambda f: f.write(json.dumps(other).encode()))
    assert stopped.wait(5)
    assert exits == ["it now belongs to pid 2 on elsewhere"]


# ---------------------------------------------------------------- runs with a gs:// workdir

def _devices_flag(devices):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def listing(url):
    """Every object under `url`, as paths relative to it."""
    bucket, _, key = url[len("gs://"):].partition("/")
    return sorted(b.name[len(key) + 1:] for b in storage._client().list_blobs(bucket, prefix=key + "/"))


def download(url, folder):
    """A local copy of every object under `url`."""
    for name in listing(url):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(f"{url}/{name}"))
    return folder


def event_scalars(data):
    """{tag: [steps]} of the scalar summaries in one TensorBoard events file (TFRecord frames of Event protos)."""
    from tensorboardX.proto import event_pb2

    tags, position = {}, 0
    while position < len(data):
        length = struct.unpack("<Q", data[position:position + 8])[0]
        event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
        position += 12 + length + 4
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.fixture(scope="module")
def demo(gcs_emulator):
    """The tiny digits run with its evaluation through launch.py, its workdir on gs://, the emulator named by
    STORAGE_EMULATOR_HOST alone."""
    workdir = GcsFolder(gcs_emulator, "demo")
    done = launch(workdir, "--config.method=spcl", env=workdir.env)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_a_run_writes_every_output_to_the_bucket_and_releases_its_lease(demo):
    workdir, done = demo
    names = listing(workdir)
    assert {"config.json", "metrics.jsonl", "results.json", "results.md", "train.log"} <= set(names)
    assert not [n for n in names if n == lease.LEASE_OBJECT or ".part-" in n or ".tmp" in n], names
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["method"] == "spcl"
    results = json.loads(storage.read_text(f"{workdir}/results.json"))
    assert results["step"] == 4 and 0 <= results["metrics"]["knn/test_top1"] <= 1
    records = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert "knn/test_top1" in records[-1]
    log = storage.read_text(f"{workdir}/train.log")
    assert "epoch 2/2" in log and "knn/test_top1" in log  # the last lines too: stored at exit
    assert checkpoint._finished_steps(f"{workdir}/checkpoints") == [2, 4]
    events = [n for n in names if n.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 1
    scalars = event_scalars(storage.read_bytes(f"{workdir}/{events[0]}"))
    assert scalars["train/loss"] == [1, 2, 3, 4] and "knn/test_top1" in scalars


def test_a_second_run_on_a_leased_workdir_is_refused_in_one_line(demo):
    workdir, _ = demo
    holder = lease.Lease.take(f"{workdir}/{lease.LEASE_OBJECT}", what=f"workdir {workdir}")
    try:
        refused = launch(workdir, "--config.method=spcl", "--config.n_epochs=3", env=workdir.env)
    finally:
        holder.release()
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"launch.py: error: workdir {workdir} is in use by another run (pid {os.getpid()} on "
                           f"{socket.gethostname()}, started {holder.record['started']};"), last
    assert checkpoint._finished_steps(f"{workdir}/checkpoints") == [2, 4]  # untouched


def test_evaluation_export_and_load_encoder_read_a_gs_checkpoint(demo, tmp_path):
    workdir, _ = demo
    checkpoints = f"{workdir}/checkpoints"
    done = launch_cli("--config", "configs/digits.py", "--config.mode=linear_eval",
                      f"--config.load_checkpoint_dir={checkpoints}", *TINY, env=workdir.env)
    assert done.returncode == 0, done.stderr[-3000:]
    linear = json.loads(storage.read_text(f"{workdir}/eval/linear_eval/results.json"))  # beside the run
    assert linear["step"] == 4 and {"linear_eval/test_top1", "knn/test_top1"} <= set(linear["metrics"])

    config = config_of(TINY + ["--config.mode=knn_eval", f"--config.load_checkpoint_dir={checkpoints}"])
    knn = evaluate.evaluate_checkpoint(config, evaluate.default_workdir(config))
    assert knn["knn/test_top1"] == pytest.approx(linear["metrics"]["knn/test_top1"])
    assert "knn/test_top1" in json.loads(storage.read_text(f"{workdir}/eval/knn_eval/results.json"))["metrics"]

    out = f"{workdir}/exported/encoder.npz"
    done = subprocess.run([sys.executable, "-m", "spcl_jax.export", "--checkpoint", checkpoints, "--out", out],
                          cwd=ROOT, env=workdir.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    local = download(checkpoints, tmp_path / "checkpoints")
    _, arrays = export.export(str(local), str(tmp_path / "encoder.npz"))
    npz, description = export._exported_files(f"{workdir}/exported")  # the folder holding it
    with np.load(io.BytesIO(storage.read_bytes(npz))) as exported:
        assert sorted(exported) == sorted(arrays)
        for name in arrays:
            np.testing.assert_array_equal(exported[name], arrays[name], err_msg=name)
    assert json.loads(storage.read_text(description))["checkpoint"] == checkpoints

    images = np.asarray(load_digits().images[:8, :, :, None].repeat(3, -1) * 16, np.uint8)
    np.testing.assert_array_equal(spcl_jax.load_encoder(checkpoints)(images), spcl_jax.load_encoder(str(local))(images))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The SIGTERM test's run in one go, on a local disk."""
    state, _ = train.train_and_evaluate(config_of(TINY + RUN), str(tmp_path_factory.mktemp("uninterrupted")))
    return jax.device_get({k: state[k] for k in STATE_KEYS})


@pytest.mark.usefixtures("own_signals")
def test_sigterm_then_the_same_command_resumes_bit_identically(gcs, monkeypatch, uninterrupted):
    """SIGTERM after step 3 (mid-epoch, saved by the signal) and the resumed run end with the parameters of the
    uninterrupted run on a local disk, bit for bit; metrics.jsonl holds every step once."""
    stops = [3]
    make_train_step = train.make_train_step

    def signalling_step(*args, **kwargs):
        jitted = make_train_step(*args, **kwargs)

        def step(state, batch):
            state, metrics = jitted(state, batch)
            if stops and int(state["step"]) == stops[0]:
                stops.pop()
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics
        return step

    monkeypatch.setattr(train, "make_train_step", signalling_step)
    config = config_of(TINY + RUN + [ON_SIGNAL_ONLY])
    with pytest.raises(checkpoint.Preempted, match="^stopped by SIGTERM at step 3; checkpoint saved"):
        train.train_and_evaluate(config, gcs)
    assert checkpoint._finished_steps(f"{gcs}/checkpoints") == [3]
    state, _ = train.train_and_evaluate(config, gcs)
    assert_same_run(state, uninterrupted)
    assert checkpoint._finished_steps(f"{gcs}/checkpoints") == [3, 4, 8]
    assert [r["step"] for r in read_metrics(gcs) if "train/loss" in r] == list(range(1, 9))


@pytest.mark.usefixtures("own_signals")
def test_a_run_killed_during_a_save_resumes_from_the_last_complete_step(gcs, uninterrupted):
    """SIGKILL while a step's objects are being written (orbax on gs:// writes a step in place and its
    commit_success.txt last): the step is not counted, and the resumed run ends as the uninterrupted one."""
    for attempt in range(4):
        workdir = GcsFolder(gcs.env["STORAGE_EMULATOR_HOST"], f"killed{attempt}")
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/digits.py",
                                    f"--workdir={workdir}", *TINY, *RUN], cwd=ROOT, env=workdir.env,
                                   stderr=subprocess.DEVNULL)
        unfinished = []
        while process.poll() is None:
            names = listing(f"{workdir}/checkpoints") if storage.isdir(f"{workdir}/checkpoints") else []
            steps = {n.split("/")[0] for n in names if n.split("/")[0].isdigit()}
            committed = {n.split("/")[0] for n in names if n.endswith("/" + checkpoint.COMMIT_MARKER)}
            if committed and steps - committed:
                process.kill()
                unfinished = sorted(steps - committed)
                break
        process.wait()
        if process.returncode == -signal.SIGKILL and unfinished:
            break
    else:
        pytest.fail("the kill never landed during a save in 4 runs")
    steps = checkpoint._finished_steps(f"{workdir}/checkpoints")
    assert steps and steps[-1] < 8 and int(unfinished[-1]) not in steps
    assert checkpoint.restore_network(f"{workdir}/checkpoints", -1)[1] == steps[-1]
    with pytest.raises(WorkdirError, match="is in use by another run"):  # the killed run's lease has not lapsed
        workdir_module.claim_workdir(workdir)
    storage.gcs_object(f"{workdir}/{lease.LEASE_OBJECT}").delete()  # as if it had (the lease tests wait for that)
    state, _ = train.train_and_evaluate(config_of(TINY + RUN), workdir)
    assert_same_run(state, uninterrupted)
    assert checkpoint._finished_steps(f"{workdir}/checkpoints") == list(range(1, 9))


def test_two_processes_share_a_gs_workdir_stop_together_and_one_process_resumes(gcs, tmp_path):
    """2 processes x 2 devices on one gs:// workdir (process 0 holds the lease and writes the files, both write
    their share of each checkpoint); SIGTERM to process 1 stops both at the same step with one committed
    checkpoint, and the same command in one process on 4 devices finishes the run."""
    command = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/digits.py", f"--workdir={gcs}",
               *TINY, *MP_RUN, *SIMCLR]
    port = _free_port()
    pair = []
    for index in range(2):
        with open(tmp_path / f"{index}.log", "w") as log:
            pair.append(subprocess.Popen(command + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                    f"--process_id={index}", "--heartbeat_timeout_seconds=10",
                                                    "--initialization_timeout_seconds=120"],
                                         cwd=ROOT, env=dict(gcs.env, XLA_FLAGS=_devices_flag(2)), stdout=log,
                                         stderr=subprocess.STDOUT))
        pair[-1].log = log.name
    _wait_until(lambda: "process 1 of 2 with" in open(pair[1].log).read(), pair)
    pair[1].send_signal(signal.SIGTERM)
    codes, logs = _finish(pair, timeout=300)
    assert codes == [143, 143], _tails(pair)
    assert all("stopped by SIGTERM at step 1; checkpoint saved" in log for log in logs), _tails(pair)
    assert checkpoint._finished_steps(f"{gcs}/checkpoints") == [1]
    assert not storage.exists(f"{gcs}/{lease.LEASE_OBJECT}")  # released by process 0 as it exited

    done = subprocess.run(command, cwd=ROOT, env=dict(gcs.env, XLA_FLAGS=_devices_flag(4)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint._finished_steps(f"{gcs}/checkpoints") == [1, 2]
    assert [r["step"] for r in read_metrics(gcs) if "train/loss" in r] == [1, 2]
    log = storage.read_text(f"{gcs}/train.log")  # continued by the resumed run
    assert log.index("process 0 of 2 with 2 of 4 devices") < log.index("epoch 2/2")
