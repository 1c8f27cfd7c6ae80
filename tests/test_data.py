"""Datasets, sources and splits (DIFFERENCES.md, datasets and splits): digits offline, image folders, tfds via mock_data."""
import importlib.util
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from conftest import ROOT, load_splits
from spcl_jax.data import UNLABELED, epoch_order
from spcl_jax.data import digits
from spcl_jax.data.imagefolder import IMAGENET100_CMC
from spcl_jax.data.splits import pretrain_summary, split_indices
from spcl_jax.errors import DataError

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [240, 240, 40], [20, 20, 20]])


def _config(**overrides):
    config = get_config()
    config.update(overrides)
    return config


def _class_of(images):
    """Nearest class colour of each (flat-coloured) image of an `Images` batch."""
    mean = np.stack([images.upright(i).reshape(-1, 3).mean(0) for i in range(len(images.pixels))])
    return np.argmin(((mean[:, None] - COLOURS[None]) ** 2).sum(-1), axis=1)


def _write(path, colour, fmt, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path, format=fmt)


def _folder(root, counts, split="train", classes=None):
    """root/split/<class>/<i>.{png,jpg} with a flat class colour, PNG and JPEG alternating."""
    for c, n in enumerate(counts):
        name = classes[c] if classes else f"class{c}"
        for i in range(n):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            _write(os.path.join(root, split, name, f"{i}.{ext}"), COLOURS[c % len(COLOURS)], fmt)


def _check_aligned(splits):
    for name in ("pretrain", "train", "valid", "test"):
        src = getattr(splits, name)
        if len(src):
            np.testing.assert_array_equal(_class_of(src.load(np.arange(len(src)))), src.labels, err_msg=name)


# ---------------------------------------------------------------- digits (offline)


@pytest.mark.parametrize("size", [16, 32])
def test_digits_default_protocol(size):
    s = load_splits(_config(dataset="digits", image_size=size, n_classes=10, pre_classes=10, val_sample=20))
    assert s.name == "digits" and s.num_classes == 10
    assert (len(s.train) + len(s.valid), len(s.test)) == (1347, 450)
    assert np.all(np.bincount(s.valid.labels) == 20)
    np.testing.assert_array_equal(s.pretrain.index, s.train.index)
    assert not set(s.train.index) & set(s.valid.index)
    for src in (s.pretrain, s.train, s.valid, s.test):
        assert src.canvas_shape == (size, size) and src.labels.dtype == np.int64
        batch = src.load(np.array([0, len(src) - 1]))
        assert batch.pixels.shape == (2, size, size, 3) and batch.pixels.dtype == np.uint8
        assert batch.size.tolist() == batch.raw_size.tolist() == [[size, size]] * 2 and not batch.transposed.any()
    assert len(s.mean) == 3 and 0.2 < s.mean[0] < 0.4 and 0.2 < s.std[0] < 0.45


def test_digits_test_split_is_fixed_and_stratified():
    train_x, train_y, test_x, test_y = digits.digits_arrays(8)
    assert len(train_y) == 1347 and len(test_y) == 450
    assert np.bincount(test_y).min() >= 43 and np.bincount(test_y).max() <= 46
    assert train_x.max() == 255 and train_x.min() == 0
    raw = digits.load_digits()
    # at size 8 the images are the originals scaled to 0..255, each with its own label
    originals = {(np.round(im * 255 / 16).astype(np.uint8).tobytes(), int(y)) for im, y in zip(raw.images, raw.target)}
    assert all((x[..., 0].tobytes(), int(y)) in originals for x, y in zip(test_x, test_y))
    assert (test_x[..., 0] == test_x[..., 2]).all()


def test_digits_options_honoured():
    config = _config(dataset="digits", image_size=16, n_classes=4, pre_classes=6, train_sample=30, val_sample=5, seed=3)
    s = load_splits(config)
    assert np.all(np.bincount(s.train.labels) == 30) and s.train.labels.max() == 3
    assert np.all(np.bincount(s.valid.labels) == 5) and s.valid.labels.max() == 3
    assert np.all(np.bincount(s.pretrain.labels) == 30) and s.pretrain.labels.max() == 5
    assert set(np.unique(s.test.labels)) == {0, 1, 2, 3} and s.num_classes == 4
    assert not set(s.pretrain.index) & set(s.valid.index)
    again = load_splits(config)
    np.testing.assert_array_equal(again.valid.index, s.valid.index)
    other = load_splits(_config(**{**config.to_dict(), "seed": 4}))
    assert not np.array_equal(other.valid.index, s.valid.index)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"n_classes": 11}, "n_classes=11"),
        ({"pre_classes": 0}, "pre_classes=0"),
        ({"val_sample": 500}, "val_sample=500"),
        ({"train_sample": 0}, "train_sample=0"),
        ({"dataset": "mnist"}, "dataset='mnist'"),
    ],
)
def test_bad_options_raise_data_error(overrides, match):
    with pytest.raises(DataError, match=match):
        load_splits(_config(**{"dataset": "digits", "image_size": 8, **overrides}))


# ---------------------------------------------------------------- splits


def test_split_indices_per_class_and_unlabeled():
    labels = np.array([0] * 10 + [1] * 8 + [2] * 6 + [UNLABELED] * 5)
    idx = split_indices(labels, n_classes=2, pre_classes=3, train_sample=4, val_sample=2, seed=0, dataset="toy")
    assert np.bincount(labels[idx.train]).tolist() == [4, 4]
    assert np.bincount(labels[idx.valid]).tolist() == [2, 2]
    assert not set(idx.train) & set(idx.valid)
    pre = labels[idx.pretrain]
    assert (pre == UNLABELED).sum() == 5 and np.bincount(pre[pre >= 0]).tolist() == [4, 4, 4]
    every = split_indices(labels, n_classes=3, pre_classes=3, train_sample=-1, val_sample=0, seed=0, dataset="toy")
    assert len(every.train) == 24 and len(every.valid) == 0


def test_pretrain_summary_says_how_many_images_pretraining_uses_and_where_the_others_went():
    labels = np.array([0] * 10 + [1] * 8 + [2] * 6 + [UNLABELED] * 5)
    idx = split_indices(labels, n_classes=2, pre_classes=2, train_sample=4, val_sample=2, seed=0, dataset="toy")
    assert pretrain_summary(labels, len(idx.pretrain), pre_classes=2, train_sample=4, val_sample=2) == (
        "pretraining on 13 of the 29 training images (5 unlabeled): 4 held out for validation (2 per class, "
        "val_sample=2); 6 beyond train_sample=4 per class left out; 6 of the classes >= pre_classes=2 left out")
    every = split_indices(labels, n_classes=3, pre_classes=3, train_sample=-1, val_sample=0, seed=0, dataset="toy")
    assert pretrain_summary(labels, len(every.pretrain), pre_classes=3, train_sample=-1, val_sample=0) == (
        "pretraining on all 29 training images (5 unlabeled)")


def test_epoch_order_modes():
    labels = np.array([0] * 90 + [1] * 10)
    rng = np.random.default_rng(0)
    perm = epoch_order(labels, rng)
    assert sorted(perm) == list(range(100))
    draws = np.concatenate([epoch_order(labels, rng, "weighted_replacement") for _ in range(20)])
    assert len(draws) == 2000 and 0.4 < (labels[draws] == 1).mean() < 0.6  # class-balanced, as written (B-15)


# ---------------------------------------------------------------- image folders


def test_imagefolder_png_jpeg_labels_aligned(tmp_path):
    _folder(tmp_path, [9, 8, 7])
    _folder(tmp_path, [3, 3, 3], split="val")
    s = load_splits(_config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=28, n_classes=2, pre_classes=3, val_sample=2))
    assert s.train.canvas_shape == (32, 48)  # shorter side capped at round(28 / 0.875), canvas 1.5 x wider
    assert (len(s.pretrain), len(s.train), len(s.valid), len(s.test)) == (18, 13, 4, 6)
    _check_aligned(s)


def test_zero_classes_stand_for_every_class_of_the_folder(tmp_path):
    _folder(tmp_path, [6, 5, 4])
    _folder(tmp_path, [1, 1, 1], split="val")
    s = load_splits(_config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=0, pre_classes=2,
                            val_sample=1, infer_from_data=True))
    assert (s.num_classes, s.pre_classes, len(s.pretrain), len(s.train), len(s.test)) == (3, 2, 9, 12, 3)
    assert s.pretrain_summary == ("pretraining on 9 of the 15 training images: 2 held out for validation (1 per class, "
                                  "val_sample=1); 4 of the classes >= pre_classes=2 left out")


def test_unlabeled_image_folder_is_for_pretraining_only(tmp_path):
    for i in range(5):
        _write(str(tmp_path / "train" / f"{i}.png"), COLOURS[i % 3], "PNG")
    s = load_splits(_config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=0, pre_classes=0,
                            infer_from_data=True))
    assert (len(s.pretrain), len(s.train), len(s.valid), len(s.test), s.num_classes) == (5, 0, 0, 0, 0)
    assert (s.pretrain.labels == UNLABELED).all() and s.pretrain.load([4]).pixels.shape[0] == 1
    with pytest.raises(DataError, match=f"^n_classes=10 but {tmp_path}/train holds images without class folders "
                                        r"\(unlabeled\): pretrain on them with --config configs/imagefolder.py"):
        load_splits(_config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14))


def test_imagefolder_images_are_stored_whole(tmp_path):
    """Shorter side capped at the load size, the longer one at 1.5 x it; portraits stored transposed."""
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, 15:45] = 255  # white centre, black sides: both sides must survive
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "a")
        Image.fromarray(image).save(tmp_path / split / "a" / "wide.png")
        Image.fromarray(image[:, 10:40]).save(tmp_path / split / "a" / "square.png")
        Image.fromarray(image.transpose(1, 0, 2)[:40]).save(tmp_path / split / "a" / "tall.png")
    s = load_splits(_config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=1, pre_classes=1, val_sample=0))
    images = s.test.load([0, 1, 2])  # sorted: square, tall, wide
    assert images.size.tolist() == [[16, 16], [21, 16], [12, 24]]
    assert images.raw_size.tolist() == [[30, 30], [40, 30], [30, 60]]
    assert images.transposed.tolist() == [False, True, False]
    wide = images.upright(2)
    assert wide[:, :4].max() < 60 and wide[:, 8:16].min() > 200 and wide[:, -4:].max() < 60
    np.testing.assert_array_equal(images.pixels[1, :16, :21], images.upright(1).transpose(1, 0, 2))
    assert not images.pixels[2, 12:].any() and not images.pixels[0, :, 16:].any()  # zero padding


def test_image_folder_header_checks_are_cached_by_folder_mtime_and_count(tmp_path, monkeypatch, caplog):
    from spcl_jax.data import imagefolder

    _folder(tmp_path / "data", [3, 3])
    _folder(tmp_path / "data", [1, 1], split="val")
    (tmp_path / "data" / "train" / "class1" / "notes.txt").write_text("not an image")
    config = _config(dataset="imagefolder", dataset_path=str(tmp_path / "data"), image_size=14, n_classes=2,
                     pre_classes=2, val_sample=0, skip_bad_images=True, listing_cache_dir=str(tmp_path / "cache"))
    first = load_splits(config)
    assert len(os.listdir(tmp_path / "cache")) == 2  # one per split
    opened, header_error = [], imagefolder.header_error
    monkeypatch.setattr(imagefolder, "header_error", lambda path: opened.append(path) or header_error(path))
    with caplog.at_level(logging.WARNING):
        again = load_splits(config)
    assert opened == [] and "skipping" in caplog.text and "notes.txt" in caplog.text  # the cached verdict
    np.testing.assert_array_equal(again.train.labels, first.train.labels)
    _write(str(tmp_path / "data" / "train" / "class0" / "9.png"), COLOURS[0], "PNG")  # the folder changed
    grown = load_splits(config)
    assert len(grown.train) == len(first.train) + 1 and len(opened) == 8  # train re-checked: 7 images + notes.txt
    config.listing_cache_dir = ""
    load_splits(config)
    assert len(opened) == 8 + 8 + 2  # no cache: both splits checked every time


def test_imagefolder_corrupt_and_non_image_files(tmp_path, caplog):
    _folder(tmp_path, [4, 4])
    _folder(tmp_path, [2, 2], split="val")
    bad = tmp_path / "train" / "class1" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    (tmp_path / "train" / "class0" / "notes.txt").write_text("hello")
    (tmp_path / "train" / "class0" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    config = _config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=2, pre_classes=2, val_sample=1)
    with pytest.raises(DataError, match="notes.txt.*skip_bad_images") as err:
        load_splits(config)
    assert "\n" not in str(err.value) and "1 more" in str(err.value)
    config.skip_bad_images = True
    with caplog.at_level(logging.WARNING):
        s = load_splits(config)
    assert "broken.jpg" in caplog.text and "notes.txt" in caplog.text
    assert len(s.train) + len(s.valid) == 8
    _check_aligned(s)


def test_imagefolder_truncated_file_fails_at_decode(tmp_path, caplog):
    _folder(tmp_path, [2])
    _folder(tmp_path, [2], split="test")
    path = tmp_path / "test" / "class0" / "0.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:3000])  # valid header, missing scan data
    config = _config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=1, pre_classes=1, val_sample=0)
    s = load_splits(config)
    with pytest.raises(DataError, match="0.jpg cannot be decoded"):
        s.test.load([0, 1])
    config.skip_bad_images = True
    with caplog.at_level(logging.WARNING):
        images = load_splits(config).test.load([0, 1])
    assert images.pixels[0].max() == 0 and images.pixels[1].max() > 0 and "0.jpg" in caplog.text


def _huge_png(path, side=20000):
    """A valid all-black 1-bit PNG of side x side pixels (400 megapixels for 20000) in about 48 KB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate = zlib.compressobj(9)
    row = bytes(1 + side // 8)  # filter byte, then 1 bit per pixel
    pixels = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_imagefolder_decompression_bombs_are_bad_files(tmp_path, capsys, caplog, monkeypatch):
    from spcl_jax.data import decode, prepare

    _folder(tmp_path, [2, 2])
    _folder(tmp_path, [1, 1], split="val")
    bomb = tmp_path / "train" / "class1" / "huge.png"
    _huge_png(bomb)
    config = _config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=2, pre_classes=2,
                     val_sample=0, listing_cache_dir="")
    with pytest.raises(DataError, match=r"huge.png is not a readable image \(Image size \(400000000 pixels\) "
                                        r"exceeds limit.*skip_bad_images") as err:
        load_splits(config)
    assert "\n" not in str(err.value)
    with pytest.raises(decode.DecodeError, match="exceeds limit"):
        decode.decode_into(np.zeros((16, 24, 3), np.uint8), bomb.read_bytes())
    assert prepare.main(["imagefolder", "--dataset_path", str(tmp_path)]) == 2
    assert "huge.png is not a readable image" in capsys.readouterr().out
    config.skip_bad_images = True
    with caplog.at_level(logging.WARNING):
        assert len(load_splits(config).train) == 4 and "skipping" in caplog.text and "huge.png" in caplog.text
    bomb.unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)  # PIL only warns up to twice its limit
    config.skip_bad_images = False
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
            DataError, match="40x30 pixels exceed PIL's decompression-bomb limit of 1199 pixels"):
        load_splits(config)


def _release_readers(fifo, stop, released):
    """Opens `fifo` for writing, then closes it, whenever a reader waits on it (the reader sees end of file),
    recording each time in `released`: code that opens the pipe fails the test instead of hanging it."""
    while not stop.wait(0.05):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody is reading
            continue
        released.append(fifo)


def test_imagefolder_named_pipes_are_bad_files_not_a_hang(tmp_path, caplog):
    _folder(tmp_path, [2, 2])
    _folder(tmp_path, [1, 1], split="val")
    fifo = tmp_path / "train" / "class0" / "stuck.png"
    os.mkfifo(fifo)  # opening it for reading waits for a writer, forever
    os.mkdir(tmp_path / "train" / "class1" / "nested")
    stop, released = threading.Event(), []
    threading.Thread(target=_release_readers, args=(fifo, stop, released), daemon=True).start()
    config = _config(dataset="imagefolder", dataset_path=str(tmp_path), image_size=14, n_classes=2, pre_classes=2,
                     val_sample=0, listing_cache_dir="")
    try:
        with pytest.raises(DataError, match=r"stuck.png is not a readable image \(a named pipe, not a regular "
                                            r"file\) \(and 1 more\).*skip_bad_images") as err:
            load_splits(config)
        config.skip_bad_images = True
        with caplog.at_level(logging.WARNING):
            assert len(load_splits(config).train) == 4
    finally:
        stop.set()
    assert released == [] and "\n" not in str(err.value)
    assert "stuck.png: not a readable image (a named pipe" in caplog.text
    assert "nested: not a readable image (a directory, not a regular file)" in caplog.text


SCAN_THEN_CTRL_C = """
import signal, sys, threading, time
from spcl_jax.data import imagefolder
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds a program
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # whatever the test worker that started this does


def hung(path):  # a file system that never answers
    if sys.argv[1] == "scan_thread":  # the kernel can only hand the Ctrl-C to a scan thread
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Event().wait()


imagefolder.header_error = hung
if sys.argv[1] == "scan_thread":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread's; the scan threads inherit it
print("scanning", flush=True)
began = time.monotonic()
try:
    imagefolder.header_errors([f"/mnt/hung/{i}.jpg" for i in range(100)])
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - began:.1f} s", flush=True)
"""


@pytest.mark.parametrize("receiver", ["main_thread", "scan_thread"])
def test_ctrl_c_ends_a_stuck_header_scan_and_the_process_exits(receiver):
    """The KeyboardInterrupt reaches the scanning thread at once, whichever thread the kernel hands the signal to,
    and the process exits although the scan's threads are still stuck (a thread pool would join them: Ctrl-C would
    do nothing until they return)."""
    child = subprocess.Popen([sys.executable, "-c", SCAN_THEN_CTRL_C, receiver], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "scanning"
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0 and out.startswith("interrupted after "), out
    assert float(out.split()[2]) < 3


def test_imagefolder_layout_errors(tmp_path):
    config = _config(dataset="imagefolder", dataset_path=str(tmp_path / "missing"), image_size=14)
    with pytest.raises(DataError, match="missing does not exist.*train/<class>/<image>"):
        load_splits(config)
    _folder(tmp_path, [2, 2])
    os.makedirs(tmp_path / "train" / "class2")
    _folder(tmp_path, [1, 1], split="val")
    config.dataset_path = str(tmp_path)
    with pytest.raises(DataError, match=r"class folder .*train/class2 is empty"):
        load_splits(config)
    config.dataset_path = ""
    with pytest.raises(DataError, match="dataset_path=DIR"):
        load_splits(config)


def test_tinyimagenet_layout(tmp_path):
    wnids = ["n01443537", "n01629819", "n01641577"]
    for c, wnid in enumerate(wnids):
        for i in range(5):
            _write(str(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"), COLOURS[c], "JPEG", (64, 64))
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, c in enumerate([2, 0, 1, 1, 0, 2]):
        _write(str(tmp_path / "val" / "images" / f"val_{i}.JPEG"), COLOURS[c], "JPEG", (64, 64))
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t10\t10\n")
    (tmp_path / "val" / "val_annotations.txt").write_text("".join(lines))
    config = _config(dataset="tinyimagenet", dataset_path=str(tmp_path), image_size=16, n_classes=3, pre_classes=3, val_sample=1)
    s = load_splits(config)
    assert s.train.canvas_shape == (16, 24)  # 64x64 files capped at the crop size, as the original
    assert (len(s.train), len(s.valid), len(s.test)) == (12, 3, 6)
    assert s.test.labels.tolist() == [2, 0, 1, 1, 0, 2]
    _check_aligned(s)
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="val_annotations.txt is missing"):
        load_splits(config)


def test_imagenet100_class_lists(tmp_path):
    extra = ["n00000001", "n99999999"]  # one sorts before every CMC wnid, one after
    names = sorted(IMAGENET100_CMC + tuple(extra))
    for split in ("train", "val"):
        for name in names:
            os.makedirs(tmp_path / split / name)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    config = _config(dataset="imagenet100", dataset_path=str(tmp_path), image_size=14, n_classes=100, pre_classes=100, val_sample=0)
    first = load_splits(config)  # the default: the original's first 100 wnids
    assert len(first.train) == 100 and len(first.test) == 100
    assert {os.path.basename(os.path.dirname(p)) for p in first.train.paths} == set(names[:100])
    config.imagenet100_classes = "cmc"
    cmc = load_splits(config)
    assert {os.path.basename(os.path.dirname(p)) for p in cmc.train.paths} == set(IMAGENET100_CMC)
    os.rename(tmp_path / "train" / IMAGENET100_CMC[5], tmp_path / "train" / "n55555555")
    config.imagenet100_classes = "cmc"
    with pytest.raises(DataError, match="1 of the 100 CMC"):
        load_splits(config)


# ---------------------------------------------------------------- tensorflow-datasets


def test_cifar10_through_tfds_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _config(dataset="cifar10", data_dir=str(tmp_path), n_classes=10, pre_classes=10, val_sample=0)
    with tfds.testing.mock_data(num_examples=40):
        s = load_splits(config)
    assert len(s.pretrain) == len(s.train) == 40 and len(s.test) == 40 and len(s.valid) == 0
    assert s.train.canvas_shape == (32, 32) and s.train.load([0, 1]).pixels.dtype == np.uint8
    assert s.mean[0] == pytest.approx(0.4914, abs=1e-4)
    config.n_classes, config.pre_classes = 5, 5
    with tfds.testing.mock_data(num_examples=40):
        s = load_splits(config)
    assert s.test.labels.max() < 5 and s.train.labels.max() < 5


def test_stl10_pretrain_includes_unlabelled(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _config(dataset="stl10", data_dir=str(tmp_path), image_size=96, n_classes=2, pre_classes=3, val_sample=0)
    with tfds.testing.mock_data(num_examples=30):
        s = load_splits(config)
    assert (s.pretrain.labels == UNLABELED).sum() == 30 and set(s.pretrain.labels) == {UNLABELED, 0, 1, 2}
    assert set(s.train.labels) == {0, 1} and s.train.canvas_shape == (96, 96)
    assert len(s.pretrain) == 30 + len(s.train) + (s.pretrain.labels == 2).sum()


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    config = _config(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"not prepared in {tmp_path}.*python -m spcl_jax.data.prepare cifar10") as err:
        load_splits(config)
    assert "\n" not in str(err.value)
    assert ("`pip install tensorflow-cpu` (preparing needs it once, training never) then" in str(err.value)) == (
        importlib.util.find_spec("tensorflow") is None)  # the whole way in one message


def _fake_imagenet2012(data_dir, train=30, validation=10):
    """A tiny imagenet2012 written as array_record without TensorFlow (JPEG bytes, 4 classes)."""
    import io

    import tensorflow_datasets as tfds

    names = tfds.builder("imagenet2012").info.features["label"].names

    class FakeImagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "imagenet2012"
        VERSION = tfds.core.Version("5.1.0")

        def _info(self):
            features = {"image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(names=names), "file_name": tfds.features.Text()}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

        def _generate_examples(self, count):
            for i in range(count):
                data = io.BytesIO()
                Image.fromarray(np.full((40 + i, 60, 3), COLOURS[i % 4], np.uint8)).save(data, format="JPEG")
                yield i, {"image": data.getvalue(), "label": i % 4, "file_name": f"{i}.JPEG"}

    FakeImagenet2012(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_imagenet_through_tfds_array_record(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    _fake_imagenet2012(str(tmp_path))
    config = _config(dataset="imagenet", data_dir=str(tmp_path), image_size=28, n_classes=4, pre_classes=4, val_sample=1)
    s = load_splits(config)
    assert (len(s.train), len(s.valid), len(s.test)) == (26, 4, 10)
    assert s.train.canvas_shape == (32, 48)
    _check_aligned(s)
    cached = list(tmp_path.glob("imagenet2012/5.1.0/spcl_jax_labels_*.npy"))
    assert len(cached) == 2
    np.testing.assert_array_equal(load_splits(config).test.labels, s.test.labels)  # read back from the cache


# ---------------------------------------------------------------- prepare


def test_prepare_command(tmp_path, capsys):
    from spcl_jax.data import prepare

    assert prepare.main(["digits"]) == 0
    _folder(tmp_path, [2, 2])
    _folder(tmp_path, [1, 1], split="val")
    assert prepare.main(["imagefolder", "--dataset_path", str(tmp_path)]) == 0
    assert "2 classes, 4 training and 2 test images" in capsys.readouterr().out
    assert prepare.main(["tinyimagenet", "--dataset_path", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().out
    _fake_imagenet2012(str(tmp_path / "tfds"))
    assert prepare.main(["imagenet", "--data_dir", str(tmp_path / "tfds")]) == 0
    assert "imagenet2012 is ready" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="with TensorFlow, prepare would try to download")
def test_prepare_without_tensorflow_says_what_to_install(tmp_path, capsys):
    from spcl_jax.data import prepare

    assert prepare.main(["cifar10", "--data_dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "pip install tensorflow-cpu" in out and f"--data_dir {tmp_path}" in out


def test_imagenet_without_data_names_dataset_path_first(tmp_path):
    config = get_config()
    config.update(dataset="imagenet", data_dir=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_splits(config)
    assert str(err.value).startswith("dataset imagenet has no images: pass --config.dataset_path=DIR, an ImageNet "
                                     "folder (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG) or the records")
    assert f"tfds imagenet2012 in {tmp_path}: " in str(err.value)
