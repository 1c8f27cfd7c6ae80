"""gs:// workdirs against a real GCS API (the `gcs` fixture: the registry's emulator, in memory): the storage
functions, the workdir lease, and runs, checkpoints, evaluation and export whose paths are gs:// URLs (two
processes sharing one: test_multiprocess.py's PCA margins test).

tests/gcs_emulator.py adds to the emulator what GCS does and it lacks: generation headers on downloads (orbax's
OCDBT needs them) and generation preconditions (the lease's "create only if absent" is tested against them).
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
from conftest import GcsFolder, ROOT, TINY, launch, load_splits
from spcl_jax import checkpoint, evaluate, export, lease, storage, train
from spcl_jax import workdir as workdir_module
from spcl_jax.data import prepare, records, staging
from spcl_jax.errors import DataError, WorkdirError
from spcl_jax.metrics import read_metrics
from test_reliability import ON_SIGNAL_ONLY, config_of, own_signals  # noqa: F401 (a fixture)


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


def test_a_run_moved_aside_on_gs_arrives_whole_and_leaves_nothing_behind(gcs):
    names = ["checkpoints/2/commit_success.txt", "checkpoints/2/state/manifest.ocdbt", "config.json", "metrics.jsonl",
             "tensorboard/events.out.tfevents.1.vm"]
    for name in names:
        storage.write_atomic(f"{gcs}/{name}", lambda f, name=name: f.write(name.encode()))
    storage.write_atomic(f"{gcs}/{lease.LEASE_OBJECT}", lambda f: f.write(b"{}"))  # not a run output: stays
    folder = workdir_module.set_aside(gcs)
    assert folder.startswith(f"{gcs}/replaced-20")
    moved = folder[len(gcs) + 1:]
    assert listing(gcs) == sorted([lease.LEASE_OBJECT] + [f"{moved}/{name}" for name in names])
    assert all(storage.read_text(f"{folder}/{name}") == name for name in names)


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
        assert not lease.Lease(holder.url, 30, "a contender")._write(0)  # of two creations at once, one wins
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


# One epoch of four steps with a checkpoint after every step (test_reliability's SIGTERM run, one epoch shorter).
RUN = ["--config.method=spcl", "--config.n_epochs=1", "--config.max_steps_per_epoch=4",
       "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=20"]
NO_EVALUATION = "--config.evaluate_after_pretrain=False"


@pytest.fixture(scope="module")
def demo(gcs_emulator):
    """The tiny digits run with its evaluation through launch.py, its workdir on gs://, the emulator named by
    STORAGE_EMULATOR_HOST alone: also the uninterrupted run the interrupted ones are compared with."""
    workdir = GcsFolder(gcs_emulator, "demo")
    done = launch(workdir, *RUN, "--config.checkpoint_every_steps=0", env=workdir.env)  # saved at the end only
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def assert_same_end(workdir, reference):
    """The last checkpoints of two runs hold the same state, bit for bit (parameters, BatchNorm statistics, both
    optimiser states, the step and the pseudo labels)."""
    (got, got_step), (expected, step) = (checkpoint.restore_network(f"{w}/checkpoints", -1) for w in (workdir, reference))
    assert got_step == step == 4
    leaves = [jax.tree_util.tree_leaves_with_path(tree) for tree in (got, expected)]
    assert [path for path, _ in leaves[0]] == [path for path, _ in leaves[1]]
    for (path, a), (_, b) in zip(*leaves):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_a_run_writes_every_output_to_the_bucket_and_releases_its_lease(demo):
    workdir, done = demo
    names = listing(workdir)
    assert {"config.json", "metrics.jsonl", "results.json", "results.md", "train.log", "figs/losses.png"} <= set(names)
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # no local folder named after the URL
    assert not [n for n in names if n == lease.LEASE_OBJECT or ".part-" in n or ".tmp" in n], names
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["method"] == "spcl"
    results = json.loads(storage.read_text(f"{workdir}/results.json"))
    assert results["step"] == 4 and 0 <= results["metrics"]["knn/test_top1"] <= 1
    records = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert "knn/test_top1" in records[-1]
    log = storage.read_text(f"{workdir}/train.log")
    assert "epoch 1/1" in log and "knn/test_top1" in log  # the last lines too: stored at exit
    assert checkpoint._finished_steps(f"{workdir}/checkpoints") == [4]
    events = [n for n in names if n.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 1
    scalars = event_scalars(storage.read_bytes(f"{workdir}/{events[0]}"))
    assert scalars["train/loss"] == [1, 2, 3, 4] and "knn/test_top1" in scalars


def test_a_second_run_on_a_leased_workdir_is_refused_in_one_line(demo):
    workdir, _ = demo
    holder = lease.Lease.take(f"{workdir}/{lease.LEASE_OBJECT}", what=f"workdir {workdir}")
    try:
        refused = launch(workdir, *RUN, "--config.n_epochs=2", env=workdir.env)
    finally:
        holder.release()
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"launch.py: error: workdir {workdir} is in use by another run (pid {os.getpid()} on "
                           f"{socket.gethostname()}, started {holder.record['started']};"), last
    assert checkpoint._finished_steps(f"{workdir}/checkpoints") == [4]  # untouched


def test_evaluation_export_and_load_encoder_read_a_gs_checkpoint(demo, tmp_path):
    workdir, _ = demo
    checkpoints = f"{workdir}/checkpoints"
    for mode in ("linear_eval", "knn_eval"):  # in this process: the launch.py route is the export's below
        config = config_of(TINY + [f"--config.mode={mode}", f"--config.load_checkpoint_dir={checkpoints}"])
        evaluate.evaluate_checkpoint(config, evaluate.default_workdir(config))
    linear, knn = (json.loads(storage.read_text(f"{workdir}/eval/{mode}/results.json"))  # beside the run
                   for mode in ("linear_eval", "knn_eval"))
    assert linear["step"] == knn["step"] == 4 and {"linear_eval/test_top1", "knn/test_top1"} <= set(linear["metrics"])
    assert knn["metrics"]["knn/test_top1"] == pytest.approx(linear["metrics"]["knn/test_top1"])

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




@pytest.mark.usefixtures("own_signals")
def test_sigterm_then_the_same_command_resumes_bit_identically(gcs, monkeypatch, demo):
    """SIGTERM after step 3 (saved by the signal) and the resumed run end with the state of the uninterrupted run,
    bit for bit; metrics.jsonl holds every step once."""
    stops = [3]
    make_train_step = train.make_train_step

    def signalling_step(*args, **kwargs):
        jitted = make_train_step(*args, **kwargs)

        def step(state, batch):
            state, metrics = jitted(state, batch)
            if stops and int(state.step) == stops[0]:
                stops.pop()
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics
        return step

    monkeypatch.setattr(train, "make_train_step", signalling_step)
    config = config_of(TINY + RUN + [NO_EVALUATION, ON_SIGNAL_ONLY])
    with pytest.raises(checkpoint.Preempted, match="^stopped by SIGTERM at step 3; checkpoint saved"):
        train.train_and_evaluate(config, gcs)
    assert checkpoint._finished_steps(f"{gcs}/checkpoints") == [3]
    train.train_and_evaluate(config, gcs)
    assert_same_end(gcs, demo[0])
    assert checkpoint._finished_steps(f"{gcs}/checkpoints") == [3, 4]
    assert [r["step"] for r in read_metrics(gcs) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.usefixtures("own_signals")
def test_a_run_killed_during_a_save_resumes_from_the_last_complete_step(gcs, demo):
    """SIGKILL while a step's objects are being written (orbax on gs:// writes a step in place and its
    commit_success.txt last): the step is not counted, and the resumed run ends as the uninterrupted one."""
    for attempt in range(4):
        workdir = GcsFolder(gcs.env["STORAGE_EMULATOR_HOST"], f"killed{attempt}")
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/digits.py",
                                    f"--workdir={workdir}", *TINY, *RUN, NO_EVALUATION], cwd=ROOT, env=workdir.env,
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
    assert steps and steps[-1] < 4 and int(unfinished[-1]) not in steps
    assert checkpoint.restore_network(f"{workdir}/checkpoints", -1)[1] == steps[-1]
    with pytest.raises(WorkdirError, match="is in use by another run"):  # the killed run's lease has not lapsed
        workdir_module.claim_workdir(workdir)
    storage.gcs_object(f"{workdir}/{lease.LEASE_OBJECT}").delete()  # as if it had (the lease tests wait for that)
    train.train_and_evaluate(config_of(TINY + RUN + [NO_EVALUATION]), workdir)
    assert_same_end(workdir, demo[0])
    assert checkpoint._finished_steps(f"{workdir}/checkpoints") == [1, 2, 3, 4]


# ---------------------------------------------------------------- data on gs://

def test_prepared_records_on_gs_are_read_from_a_copy_each_host_makes_once_and_resumes(gcs, tmp_path):
    """A gs:// dataset_path of prepared records is copied to records_cache_dir and read from there (array_record
    reads local files: given a gs:// shard its reader did not return): the same images as the local records."""
    from test_records import _config, imagenet_folder

    imagenet_folder(tmp_path / "src")
    out = tmp_path / "records"
    assert prepare.main(["imagenet", "--dataset_path", str(tmp_path / "src"), "--out", str(out), "--max_side", "32",
                         "--workers", "1"]) == 0
    url = f"{gcs}/records"
    for path in sorted(out.iterdir()):
        storage.write_atomic(f"{url}/{path.name}", lambda f, path=path: f.write(path.read_bytes()))

    cache = tmp_path / "cache"
    local, reference = load_splits(_config(url, records_cache_dir=str(cache))), load_splits(_config(out))
    copy = cache / gcs[len("gs://"):] / "records"
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in out.iterdir())
    for name in ("pretrain", "test"):
        a, b = getattr(local, name), getattr(reference, name)
        np.testing.assert_array_equal(a.labels, b.labels)
        x, y = a.load(np.arange(len(a))), b.load(np.arange(len(b)))
        for i in range(len(a)):
            np.testing.assert_array_equal(x.upright(i), y.upright(i))

    (copy / "train-00000-of-00001.array_record").unlink()  # an interrupted copy: only what is missing comes again
    (copy / "records.json").unlink()
    before = (copy / "test-00000-of-00001.array_record").stat().st_mtime_ns
    assert staging.local_copy(url, str(cache)) == str(copy)
    assert records.is_prepared(str(copy))
    assert (copy / "test-00000-of-00001.array_record").stat().st_mtime_ns == before

    storage.write_atomic(f"{gcs}/folder/train/a/0.png", lambda f: f.write(b"not records"))
    with pytest.raises(DataError, match=r"holds no prepared records \(records.json missing\): image folders are read"):
        staging.local_copy(f"{gcs}/folder", str(cache))
