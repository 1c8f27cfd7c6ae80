"""The prepared record format: round trip against the folder, resume after an interruption, bad files."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from spcl_jax.data import prepare, records
from spcl_jax.errors import DataError
from spcl_jax.metrics import read_metrics
from conftest import launch_cli, load_splits

WNIDS = ["n01440764", "n01443537", "n01484850"]


def imagenet_folder(root, per_class=(5, 4, 6), test_per_class=2, seed=0):
    """root/{train,val}/<wnid>/*.JPEG: photos-like noise of varied sizes and orientations, PNG for one."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", per_class), ("val", (test_per_class,) * len(WNIDS))):
        for c, (wnid, count) in enumerate(zip(WNIDS, counts)):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            for i in range(count):
                h, w = [(60, 80), (80, 60), (30, 40), (50, 50), (40, 100)][i % 5]
                base = np.full((h, w, 3), 60 * c + 40, np.uint8)
                image = np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                ext, fmt = ("png", "PNG") if i == 3 else ("JPEG", "JPEG")
                Image.fromarray(image).save(os.path.join(root, split, wnid, f"{wnid}_{i}.{ext}"), format=fmt)


def _config(path, **overrides):
    config = get_config()
    config.update(dict(dict(dataset="imagenet", dataset_path=str(path), image_size=28, n_classes=3, pre_classes=3,
                            val_sample=1), **overrides))
    return config


def test_prepared_records_hold_the_folders_images(tmp_path, capsys):
    imagenet_folder(tmp_path / "src")
    out = tmp_path / "records"
    assert prepare.main(["imagenet", "--dataset_path", str(tmp_path / "src"), "--out", str(out), "--max_side", "32",
                         "--workers", "1"]) == 0
    assert f"3 classes, 15 training and 6 test images; train with --config.dataset_path={out}" in capsys.readouterr().out
    meta = records.read_meta(str(out))
    assert meta["classes"] == WNIDS and meta["splits"]["train"]["count"] == 15 and meta["max_side"] == 32
    assert sorted(os.listdir(out)) == ["records.json", "test-00000-of-00001.array_record", "test_files.txt",
                                       "test_labels.npy", "train-00000-of-00001.array_record", "train_files.txt",
                                       "train_labels.npy"]
    folder, prepared = load_splits(_config(tmp_path / "src")), load_splits(_config(out))
    for name in ("pretrain", "train", "valid", "test"):
        a, b = getattr(folder, name), getattr(prepared, name)
        np.testing.assert_array_equal(a.labels, b.labels, err_msg=name)
        x, y = a.load(np.arange(len(a))), b.load(np.arange(len(b)))
        for field in ("size", "raw_size", "transposed"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{name} {field}")
        for i in range(len(a)):  # re-encoded at quality 90: close, not equal
            assert np.abs(x.upright(i).astype(int) - y.upright(i).astype(int)).mean() < 4
    files = (out / "train_files.txt").read_text().splitlines()
    assert [os.path.basename(f) for f in files[:2]] == ["n01440764_0.JPEG", "n01440764_1.JPEG"]
    assert prepare.main(["imagenet", "--dataset_path", str(tmp_path / "src"), "--out", str(out)]) == 2
    assert "already holds a prepared dataset" in capsys.readouterr().out


def test_imagenet100_selects_from_imagenet_records(tmp_path):
    imagenet_folder(tmp_path / "src")
    out = tmp_path / "records"
    assert prepare.main(["imagefolder", "--dataset_path", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]) == 0
    config = _config(out, dataset="imagenet100", imagenet100_classes="first100")
    with pytest.raises(DataError, match="at least 100 classes, found 3"):
        load_splits(config)


def test_an_interrupted_prepare_is_refused_for_training_and_resumes(tmp_path, monkeypatch, capsys):
    imagenet_folder(tmp_path / "src", per_class=(500, 400, 300))  # 1,200 training images: 2 shards
    out = tmp_path / "records"
    argv = ["imagefolder", "--dataset_path", str(tmp_path / "src"), "--out", str(out), "--max_side", "16",
            "--workers", "1"]
    write_shard, written = records.write_shard, []

    def dies_after_one_shard(job):
        if written:
            raise KeyboardInterrupt
        written.append(job[1])
        return write_shard(job)

    monkeypatch.setattr(records, "write_shard", dies_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    assert written == ["train-00000-of-00002.array_record"]
    config = _config(out, dataset="imagefolder")
    with pytest.raises(DataError, match="is a prepare that did not finish: run the same"):
        load_splits(config)
    monkeypatch.setattr(records, "write_shard", lambda job: written.append(job[1]) or write_shard(job))
    assert prepare.main(argv) == 0
    assert "resuming the prepare" in capsys.readouterr().out
    assert written[1:] == ["train-00001-of-00002.array_record", "test-00000-of-00001.array_record"]
    s = load_splits(config)
    assert len(s.train) + len(s.valid) == 1200 and s.train.canvas_shape == (32, 48)
    changed = argv[:-4] + ["--max_side", "20", "--workers", "1"]
    os.unlink(out / "records.json")
    (out / records.PLAN).write_text(json.dumps({"other": "plan"}))
    assert prepare.main(changed) == 2
    assert "unfinished prepare of other images or settings" in capsys.readouterr().out


def test_bad_source_files(tmp_path, capsys):
    imagenet_folder(tmp_path / "src")
    broken = tmp_path / "src" / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(broken, format="JPEG")
    broken.write_bytes(broken.read_bytes()[:3000])  # the header reads, the pixels do not
    argv = ["imagenet", "--dataset_path", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert prepare.main(argv) == 2
    assert f"image file {broken} cannot be decoded" in capsys.readouterr().out
    assert prepare.main(argv + ["--skip_bad_images"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {broken}" in out and "14 training and 6 test images" in out
    (tmp_path / "src" / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    assert prepare.main(argv[:3] + ["--out", str(tmp_path / "out2"), "--workers", "1"]) == 2
    assert "notes.txt is not a readable image" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_configs_imagenet_trains_from_prepared_records(tmp_path):
    """configs/imagenet.py (ResNet-50, ImageNet stem, blur, bfloat16) end to end on a small ImageNet-layout
    folder prepared to records, decoded by a worker process; only the sizes are shrunk."""
    imagenet_folder(tmp_path / "src", per_class=(12, 12, 12))
    out = tmp_path / "records"
    assert prepare.main(["imagenet", "--dataset_path", str(tmp_path / "src"), "--out", str(out), "--max_side", "82",
                         "--workers", "1"]) == 0
    workdir = tmp_path / "run"
    result = launch_cli(
        "--config", "configs/imagenet.py", f"--workdir={workdir}",
        f"--config.dataset_path={out}", "--config.image_size=72", "--config.n_classes=3", "--config.pre_classes=3",
        "--config.val_sample=1", "--config.width_multiplier=0.0625", "--config.batch_size=16",
        "--config.num_prototypes=4", "--config.pca_dim=4", "--config.n_epochs=1", "--config.warmup_epochs=1",
        "--config.max_steps_per_epoch=2", "--config.finetune_epochs=1", "--config.finetune_batch_size=16",
        "--config.knn_k=5", "--config.log_every_steps=1", "--config.num_workers=1",
        timeout=850)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "input: decoded by 1 worker process(es), num_workers=1" in result.stderr
    records_seen = read_metrics(workdir)
    train = [r for r in records_seen if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0.0 <= r["data/wait_fraction"] <= 1.0 and np.isfinite(r["train/loss"]) for r in train)
    assert 0.0 <= records_seen[-1]["linear_eval/test_top1"] <= 1.0
    assert json.load(open(workdir / "config.json"))["dataset_path"] == str(out)
