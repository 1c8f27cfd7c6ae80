"""The trainer end to end: every method through the real launch.py, sharding invariance,
the re-clustering / re-initialisation cadence, and learning on digits."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from spcl_jax import clustering, epoch_batches, loop_support, objective, progress, train, visual
from spcl_jax.metrics import read_metrics
from spcl_jax.method import METHODS
from conftest import ROOT, TINY, launch, launch_cli, load_splits

@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "cluster", "metric", "supervised"])
def test_every_method_runs_end_to_end(tmp_path, method):
    cache = tmp_path / "xla_cache"  # one method also checks the compilation cache: a fresh one fills up
    extra = [f"--config.compilation_cache_dir={cache}"] if method == "simclr" else []
    result = launch(tmp_path, f"--config.method={method}", "--config.evaluate_after_pretrain=False", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr  # stderr is no terminal: plain lines, no bar redrawn in place
    if method == "simclr":  # the train step, and the programs compiling in under a second (JAX skips those by default)
        assert any(name.startswith("jit_step-") for name in os.listdir(cache))
        assert any(name.startswith("jit_broadcast_in_dim-") for name in os.listdir(cache))  # e.g. jnp.zeros
    records = read_metrics(tmp_path)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) for r in train)
    assert json.load(open(tmp_path / "config.json"))["method"] == method
    assert os.listdir(tmp_path / "tensorboard")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


SPCL_RUN = ["--config.method=spcl", "--config.n_epochs=5", "--config.max_steps_per_epoch=1", "--config.reassign=2",
            "--config.classifier_init_freq=3", "--config.visual_cls=True", "--config.visual_freq=4"]


@pytest.fixture(scope="module")
def spcl_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("spcl_run")
    result = launch(workdir, *SPCL_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_spcl_reclusters_and_reinitialises_at_configured_epochs(spcl_run):
    records = read_metrics(spcl_run)
    assert [r["epoch"] for r in records if "kmeans/inertia" in r] == [1, 3, 5]
    assert [r["epoch"] for r in records if "prototypes/classifier_reinitialised" in r] == [1, 4]
    clustering = [r for r in records if "kmeans/inertia" in r]
    assert all(r["kmeans/empty_clusters"] == 0 and "kmeans/nmi" in r for r in clustering)
    train = [r for r in records if "train/loss" in r]
    for key in ("train/loss_contrastive", "train/loss_metric", "train/loss_prototype", "train/lr",
                "train/grad_norm", "train/images_per_sec", "train/false_negative_fraction", "train/true_neg_similarity"):
        assert key in train[0], key
    assert [r["epoch"] for r in records if "train/epoch_loss" in r] == [1, 2, 3, 4, 5]  # 1-based, as the logs
    final = records[-1]
    assert 0 <= final["linear_eval/test_top1"] <= 1 and 0 <= final["knn/test_top1"] <= 1
    assert {"linear_eval/test_top5", "knn/test_top5"} <= set(final)
    saved = json.load(open(spcl_run / "results.json"))  # the same final table, with its protocols
    assert saved["metrics"]["linear_eval/test_top1"] == final["linear_eval/test_top1"] and saved["step"] == 5
    assert "`knn/test_top1`" in (spcl_run / "results.md").read_text()


@pytest.mark.slow
def test_train_log_holds_the_announcements_the_epoch_lines_and_the_results(spcl_run):
    text = (spcl_run / progress.LOG_FILE).read_text()
    assert "\r" not in text
    compiled = re.search(r"\] compiling the training step \.\.\.\n(.*\n)*?.*\] compiled in \d+\.\d s", text)
    clustered = re.search(r"\] epoch 1: clustering 1,347 examples \.\.\.\n(.*\n)*?.*\] epoch 1: clustered in "
                          r"\d+\.\d s: kmeans/inertia=", text)
    assert clustered and compiled and clustered.start() < compiled.start()
    epochs = re.findall(r"\] epoch (\d)/5: loss .*, ETA (\S+)\n", text)
    assert [epoch for epoch, _ in epochs] == ["1", "2", "3", "4", "5"]
    assert epochs[0][1] == "?" and re.fullmatch(r"0:\d\d:\d\d", epochs[1][1]) and epochs[-1][1] == "0:00:00"
    assert re.search(r"\nlinear_eval/test_top1 +\d+\.\d\d%\n", text)  # the results table


@pytest.mark.slow
def test_visual_cls_writes_the_prototype_figure_and_the_losses(spcl_run):
    from PIL import Image

    # Clustering runs at epochs 1, 3, 5 (reassign=2); visual_freq=4 draws at 1 and 5.
    assert sorted(os.listdir(spcl_run / "figs")) == ["losses.png", "prototypes_epoch_1.png", "prototypes_epoch_5.png"]
    image = np.asarray(Image.open(spcl_run / "figs" / "prototypes_epoch_1.png"))
    # digits has labels: pseudo labels and ground truth side by side
    assert image.shape == (visual.PANEL_HEIGHT, 2 * visual.PANEL_WIDTH, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) > 3
    assert np.asarray(Image.open(spcl_run / "figs" / "losses.png")).shape == (visual.PANEL_HEIGHT, 2 * visual.PANEL_WIDTH, 3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linear_eval", "linear_eval_original", "knn_eval", "eval_disent"])
def test_evaluation_from_a_checkpoint(spcl_run, tmp_path, mode):
    flags = {"linear_eval": ["--config.mode=linear_eval", "--config.finetune_epochs=10"],
             "knn_eval": ["--config.mode=knn_eval"],
             "linear_eval_original": ["--config.mode=linear_eval", "--config.linear_eval_protocol=original"],
             "eval_disent": ["--config.eval_disent=True"]}[mode]
    result = launch(tmp_path / "eval", *SPCL_RUN, *flags, f"--config.load_checkpoint_dir={spcl_run / 'checkpoints'}",
                    "--config.checkpoint_step=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluating the encoder of step 4" in result.stderr
    assert "evaluating the encoder of step 4" in (tmp_path / "eval" / progress.LOG_FILE).read_text()
    final = read_metrics(tmp_path / "eval")[-1]
    key = {"linear_eval": "linear_eval/test_top1", "linear_eval_original": "linear_eval/test_top1",
           "knn_eval": "knn/test_top1", "eval_disent": "disent/test_mean"}[mode]
    assert 0.1 <= final[key] <= 1.0, final
    if mode == "knn_eval":
        assert not any(k.startswith("linear_eval/") for k in final)


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(spcl_run):
    before = sorted(os.listdir(spcl_run / "checkpoints"))
    log = (spcl_run / progress.LOG_FILE).read_text()
    result = launch(spcl_run, *SPCL_RUN, "--config.width_multiplier=0.125")
    assert result.returncode == 2
    assert "holds another run (step 5; width_multiplier: 0.0625 -> 0.125)" in result.stderr
    assert sorted(os.listdir(spcl_run / "checkpoints")) == before
    assert (spcl_run / progress.LOG_FILE).read_text() == log


@pytest.mark.slow
def test_three_steps_on_one_device_equal_eight_devices():
    """Same data, keys and init on a 1-device and an 8-device mesh -> the same parameters.

    Sharded reductions sum in another order: the first gradients already differ by ~1e-5 relative
    (BatchNorm backward cancels large terms), and a tiny network amplifies that, so the tolerance is
    1e-3 with a small learning rate. A real sharding bug (per-device BatchNorm statistics, local
    NT-Xent negatives) changes the losses themselves by far more.
    """
    from jax.sharding import Mesh

    from configs import digits
    from spcl_jax import train

    config = digits.get_config()
    config.image_size, config.width_multiplier, config.batch_size = 16, 0.125, 32
    config.num_prototypes, config.pca_dim, config.learning_rate = 8, 8, 0.01
    splits = load_splits(config)
    pseudo = np.arange(len(splits.pretrain)) % config.num_prototypes
    results = []
    for devices in (1, 8):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        setup, state = train.build(config, METHODS["spcl"], splits, mesh)
        plan = epoch_batches.epoch_plan(setup, 0, pseudo)
        for step in range(3):
            state, metrics = setup.train_step(state, epoch_batches.load_batch(setup, 0, plan, step, pseudo))
        assert len(state.params["encoder"]["stem_conv"]["kernel"].sharding.device_set) == devices
        results.append(jax.device_get((state.params, state.batch_stats, state.classifier_params,
                                       metrics)))
    one, eight = (jax.tree_util.tree_leaves_with_path(r) for r in results)
    assert len(one) == len(eight) > 10
    for (path, a), (_, b) in zip(one, eight):
        # The gradient norm is ill-conditioned here: 1e-6 relative noise on the initial parameters moves the
        # third step's by up to 2% (25.56 to 26.08) while the loss moves by 5e-6, in any BatchNorm arithmetic.
        rtol = 5e-2 if "grad_norm" in jax.tree_util.keystr(path) else 1e-3
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-3, err_msg=jax.tree_util.keystr(path))


def test_waiting_for_data_warns_once_naming_num_workers_and_prepare(monkeypatch):
    from types import SimpleNamespace

    loop = SimpleNamespace(warned_waiting=False, run=SimpleNamespace(parts=SimpleNamespace(num_workers=3),
                                                                     source=SimpleNamespace(in_memory=False)))
    warnings = []  # read at the call: absl's handler setup depends on earlier tests
    monkeypatch.setattr(train.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    for fraction in (0.05, 0.5, 0.9):
        loop_support.warn_if_waiting(loop, fraction)
    assert warnings == ["the training steps waited for input data 50% of the time: raise --config.num_workers "
                        "(now 3), or train from records written by `python -m spcl_jax.data.prepare ... --out` "
                        "(5x cheaper to decode)"]


@pytest.mark.slow
def test_spcl_on_digits_learns(tmp_path):
    result = launch(tmp_path, "--config.image_size=16", "--config.width_multiplier=0.125",
                    "--config.batch_size=64", "--config.num_prototypes=20", "--config.pca_dim=16",
                    "--config.max_steps_per_epoch=-1", "--config.n_epochs=3", "--config.warmup_epochs=1",
                    "--config.finetune_epochs=10", "--config.eval_random_init_baseline=True", "--config.hflip_p=0",
                    "--config.log_every_steps=100")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    final = records[-1]
    assert final["linear_eval/test_top1"] > final["linear_eval/random_init_test_top1"], final


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_terms(tmp_path):
    """(The explosion check is off here, to reach the NaN: see test_reliability for a finite explosion.)"""
    result = launch(tmp_path, "--config.method=spcl", "--config.optimiser=sgd", "--config.learning_rate=1e6",
                    "--config.n_epochs=3", "--config.evaluate_after_pretrain=False", "--config.divergence_factor=0")
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("launch.py: error: non-finite loss or gradient at step ")
    assert "with that change" in message and f"--workdir={tmp_path}" in message
    assert "train/loss_contrastive=" in message and "Traceback" not in result.stderr
    assert (tmp_path / progress.LOG_FILE).read_text().splitlines()[-1] == message
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    bad_step = int(message.split("non-finite loss or gradient at step ")[1].split()[0])
    assert all(step < bad_step for step in saved), (saved, bad_step)


def test_asymmetric_first_view_applies_where_the_original_leaves_it():
    """B-7 as written: the first view of every image is the clean eval view in `pretrain` (simclr) and
    `pretrain_metric` (metric: images A and B), never in `pretrain_cluster` (cluster) or SPCL."""
    from configs import digits

    config = digits.get_config()
    config.asymmetric_first_view = True
    specs = lambda name: objective.view_specs(METHODS[name], config.asymmetric_first_view)  # noqa: E731
    assert specs("simclr") == (("a", "eval"), ("a", "pretrain"))
    assert specs("metric") == (("a", "eval"), ("a", "pretrain"), ("b", "eval"), ("b", "pretrain"))
    assert specs("cluster") == (("a", "pretrain"), ("a", "pretrain"))
    assert specs("spcl") == (("a", "pretrain"),) * 2 + (("b", "pretrain"),) * 2
    config.asymmetric_first_view = False
    assert specs("metric") == (("a", "pretrain"),) * 2 + (("b", "pretrain"),) * 2
    assert specs("supervised") == (("a", "train"),)


@pytest.mark.slow
def test_as_written_member_table_draws_ground_truth_buckets_below_k():
    """B-2 as written: pairs from ground-truth class buckets, the bucket drawn from [0, K) (K = 4 of 10)."""
    from jax.sharding import Mesh

    from configs import digits

    config = digits.get_config()
    config.width_multiplier, config.num_prototypes, config.rebuild_member_table = 0.0625, 4, False
    splits = load_splits(config)
    setup, _ = train.build(config, METHODS["spcl"], splits, Mesh(np.array(jax.devices()[:1]), ("data",)))
    pseudo = np.random.default_rng(0).integers(0, 4, len(splits.pretrain))  # what the k-means gave
    plan = epoch_batches.epoch_plan(setup, 0, pseudo)
    truth = splits.pretrain.labels
    assert set(truth[plan["a"]].ravel()) == set(truth[plan["b"]].ravel()) == {0, 1, 2, 3}
    positive = plan["similarity"] == 1
    np.testing.assert_array_equal(truth[plan["a"]][positive], truth[plan["b"]][positive])
    assert (truth[plan["a"]][~positive] != truth[plan["b"]][~positive]).all()
    batch = epoch_batches.load_batch(setup, 0, plan, 0, pseudo)  # the CE targets stay the pseudo labels
    np.testing.assert_array_equal(np.asarray(batch["labels_a"]), pseudo[plan["a"][0]])


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_pseudo_labels_and_first_step():
    """The feature pass lays rows out by device count; k-means draws by example index, views by position:
    the clustering, the pair plan and the first step's losses do not depend on the device count."""
    from jax.sharding import Mesh

    from configs import digits

    config = digits.get_config()
    config.width_multiplier, config.batch_size, config.learning_rate = 0.0625, 32, 0.01
    splits = load_splits(config)
    results = []
    for devices in (1, 8):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        setup, state = train.build(config, METHODS["spcl"], splits, mesh)
        pseudo, stats, _ = clustering.cluster(setup, state, 0, jax.random.key(3))
        plan = epoch_batches.epoch_plan(setup, 0, pseudo)
        _, metrics = setup.train_step(state, epoch_batches.load_batch(setup, 0, plan, 0, pseudo))
        results.append((pseudo, stats, jax.device_get(metrics)))
    (pseudo_1, stats_1, metrics_1), (pseudo_8, stats_8, metrics_8) = results
    np.testing.assert_array_equal(pseudo_1, pseudo_8)
    assert stats_1["inertia"] == pytest.approx(stats_8["inertia"], rel=1e-5)
    for key, value in metrics_1.items():  # the gradient's norm sums BatchNorm terms in another order
        np.testing.assert_allclose(metrics_8[key], value, rtol=1e-3 if key == "train/grad_norm" else 1e-5,
                                   atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_evaluating_with_a_relative_path_writes_next_to_the_run_and_a_rerun_shows_the_results(spcl_run):
    """The README's way: `--config.load_checkpoint_dir=<run>/checkpoints` relative to the current directory and
    no --workdir; the output goes to <run>/eval/knn_eval, and the same command again only shows the results."""
    command = ["--config", os.path.join(ROOT, "configs", "digits.py"), *TINY, *SPCL_RUN, "--config.mode=knn_eval",
               f"--config.load_checkpoint_dir={spcl_run.name}/checkpoints"]
    # While a run holds its workdir (as if it were still training), its checkpoints can be evaluated.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); "
                               "time.sleep(600)", str(spcl_run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        first = launch_cli(*command, cwd=spcl_run.parent)
    finally:
        holder.kill()
        holder.wait()
    assert first.returncode == 0, first.stderr[-3000:]
    output = spcl_run / "eval" / "knn_eval"
    assert f"evaluating the encoder of step 5 from {spcl_run.name}/checkpoints; output in {output}" in first.stderr
    assert {"config.json", "metrics.jsonl", "results.json", "results.md", progress.LOG_FILE} <= set(os.listdir(output))
    assert json.loads((output / "config.json").read_text())["mode"] == "knn_eval"
    assert "read only" not in first.stderr and "read_only" not in first.stderr, first.stderr[-3000:]  # orbax noise
    rows = read_metrics(output)
    again = launch_cli(*command, cwd=spcl_run.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{output} already holds this evaluation of step 5" in again.stderr
    assert "| `knn/test_top1` |" in again.stdout + again.stderr and read_metrics(output) == rows
