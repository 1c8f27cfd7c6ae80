"""Own image folders through configs/imagefolder.py (issue 18, item 3): the config fits itself to a labelled folder,
says so and what pretraining uses, and the same command resumes; an unlabeled folder pretrains without evaluation
or label statistics; what needs labels is refused in one line before anything is written."""
import json
import os

import pytest

from configs import imagefolder
from spcl_jax import train
from spcl_jax.errors import ConfigError
from spcl_jax.metrics import read_metrics
from test_data import COLOURS, _folder, _write

# conftest.TINY's sizes; batch_size, num_prototypes and warmup_epochs keep the defaults, for infer_from_data to fit.
TINY_OWN = dict(image_size=16, stem="auto", width_multiplier=0.0625, pca_dim=8, max_steps_per_epoch=2, n_epochs=2,
                finetune_epochs=1, finetune_batch_size=64, knn_k=5, log_every_steps=1, linear_eval_protocol="fast",
                num_workers=0)


def _config(root, **overrides):
    config = imagefolder.get_config()
    config.update(dict(dataset_path=str(root), **TINY_OWN, **overrides))
    return config


def _unlabeled(root, count):
    """root/train/<i>.png: images without class folders."""
    for i in range(count):
        _write(os.path.join(root, "train", f"{i}.png"), COLOURS[i % 3], "PNG")


@pytest.fixture
def info_lines(monkeypatch):
    """The info lines logged through absl (read at the call: absl's handler setup depends on earlier tests)."""
    lines = []
    monkeypatch.setattr(train.logging, "info", lambda fmt, *args, **kwargs: lines.append(str(fmt % args if args else fmt)))
    return lines


def test_a_labelled_folder_fits_the_config_and_the_same_command_resumes(tmp_path, info_lines):
    _folder(tmp_path / "data", [8, 8])
    _folder(tmp_path / "data", [2, 2], split="val")
    workdir = str(tmp_path / "run")
    state, results = train.train_and_evaluate(_config(tmp_path / "data"), workdir)
    assert int(state.step) == 2 and 0 <= results["knn/test_top1"] <= 1
    assert ("infer_from_data: n_classes 0 -> 2 (every class of the data); pre_classes 0 -> 2 (every class of the data); "
            "batch_size 512 -> 16 (at most the 16 pretrain images, in multiples of 8 devices and of 2 for the pairs' "
            "halves); warmup_epochs 10 -> 0 (at most a tenth of n_epochs=2); num_prototypes 512 -> 2 (16 pretraining "
            "images, 39 or more per prototype as faiss asks of a k-means centroid, and 2 prototypes at least)"
            ) in info_lines
    assert "pretraining on all 16 training images" in info_lines
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert [saved[k] for k in ("n_classes", "pre_classes", "batch_size", "num_prototypes", "warmup_epochs")] == [
        2, 2, 16, 2, 0]
    info_lines.clear()
    state, again = train.train_and_evaluate(_config(tmp_path / "data"), workdir)  # the same command: same inference
    assert any(line.startswith("resuming from the checkpoint of step 2 in ") for line in info_lines)
    assert int(state.step) == 2 and again == results


def test_an_unlabeled_folder_pretrains_without_evaluation_or_label_statistics(tmp_path, info_lines):
    _unlabeled(tmp_path / "data", 16)
    state, results = train.train_and_evaluate(_config(tmp_path / "data"), str(tmp_path / "run"))
    assert int(state.step) == 2 and results == {}
    inferred = next(line for line in info_lines if line.startswith("infer_from_data: "))
    assert (f"evaluate_after_pretrain True -> False (linear/kNN evaluation needs labelled images: {tmp_path}/data/train "
            "has no class folders)") in inferred
    assert "n_classes" not in inferred  # 0: none
    assert "pretraining on all 16 training images (16 unlabeled)" in info_lines
    clusterings = [r for r in read_metrics(tmp_path / "run") if "kmeans/inertia" in r]
    assert len(clusterings) == 2 and not any("kmeans/nmi" in r or "kmeans/ari" in r for r in clusterings)


@pytest.mark.parametrize("overrides,what,fix", [
    (dict(method="supervised"), "method=supervised", "pass a self-supervised method, e.g. --config.method=spcl"),
    (dict(rebuild_member_table=False), "rebuild_member_table=False (pairs drawn from the ground-truth classes, B-2)",
     "pass --config.rebuild_member_table=True"),
    (dict(method="cluster", prototype_classifier_width="n_classes"), "prototype_classifier_width='n_classes'",
     "pass --config.prototype_classifier_width=num_prototypes"),
    (dict(knn_every_epochs=1), "knn_every_epochs=1", "pass --config.knn_every_epochs=0"),
    (dict(mode="knn_eval", load_checkpoint_dir="/nowhere"), "evaluating a checkpoint (mode=knn_eval)",
     "evaluate on a folder with train/<class>/ folders"),
], ids=["supervised", "as_written_member_table", "as_written_classifier_width", "knn_monitor", "knn_eval"])
def test_what_needs_labels_is_refused_in_one_line_before_anything_is_written(tmp_path, overrides, what, fix):
    _unlabeled(tmp_path / "data", 4)
    with pytest.raises(ConfigError) as refused:
        train.run_mode(_config(tmp_path / "data", **overrides), str(tmp_path / "run"))
    assert str(refused.value) == (f"invalid config: {what} needs labelled images, and {tmp_path}/data/train has no "
                                  f"class folders; {fix}")
    assert not os.path.exists(tmp_path / "run")
