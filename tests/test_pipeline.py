"""The host input pipeline: batches equal to the plan, views drawn per global position, resumable passes,
worker processes equal to in-process loading."""
import os

import numpy as np
import pytest
from PIL import Image

from spcl_jax.data import crops, pipeline
from spcl_jax.data.sources import ArraySource, FileSource
from spcl_jax.errors import DataError

SPECS = (("a", "pretrain"), ("a", "eval"), ("b", "train"))
RECIPE = pipeline.Recipe(crop_scale=(0.08, 1.0), eval_crop=7)


def _array_source(n=40, size=8):
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n) % 4), images


def _plans(n=40, steps=5, batch=8):
    rng = np.random.default_rng(1)
    return {"a": rng.integers(0, n, (steps, batch)), "b": rng.integers(0, n, (steps, batch))}


def _equal(x, y):
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_a_batch_holds_the_planned_images_and_their_views():
    source, images = _array_source()
    plans = _plans()
    maker = pipeline.make_pass(source, plans, SPECS, RECIPE, seed=(7, 3, 0))
    batch = maker(2)
    np.testing.assert_array_equal(batch["pixels_a"], images[plans["a"][2]])
    np.testing.assert_array_equal(batch["pixels_b"], images[plans["b"][2]])
    np.testing.assert_array_equal(batch["frame_a"], [[8, 8, 0, 1]] * 8)
    assert batch["boxes"].shape == (8, 3, 4) and batch["draws"].shape == (8, 3, crops.VIEW_DRAWS)
    np.testing.assert_array_equal(batch["boxes"][:, 1], [[0, 0, 7, 7]] * 8)  # centre crop 7 of 8: round(0.5) = 0
    ids = 2 * 8 + np.arange(8)  # the images' positions in the plan
    u = np.stack([crops.counter_uniforms((7, 3, 0), ids * 3 + v, pipeline.VIEW_COLUMNS) for v in range(3)], axis=1)
    np.testing.assert_array_equal(batch["boxes"][:, 0], crops.random_resized_crop_boxes(
        u[:, 0, :crops.CROP_DRAWS], [8] * 8, [8] * 8, RECIPE.crop_scale))
    np.testing.assert_array_equal(batch["draws"], u[:, :, crops.CROP_DRAWS:].astype(np.float32))
    _equal(batch, maker(2))  # a pure function of (seed, step)
    assert not np.array_equal(batch["draws"], maker(3)["draws"])


def test_views_keyed_by_dataset_index_do_not_depend_on_the_batch():
    """The feature pass keys each image's view by its index: the same view in any batch size or order."""
    source, _ = _array_source()
    specs = (("a", "pretrain"),)
    by_eight = pipeline.make_pass(source, {"a": np.arange(40).reshape(5, 8)}, specs, RECIPE, (1,), key_by="index")
    shuffled = np.random.default_rng(3).permutation(40)
    by_ten = pipeline.make_pass(source, {"a": shuffled.reshape(4, 10)}, specs, RECIPE, (1,), key_by="index")
    first = {k: np.concatenate([by_eight(s)[k] for s in range(5)]) for k in ("boxes", "draws")}
    second = {k: np.concatenate([by_ten(s)[k] for s in range(4)])[np.argsort(shuffled)] for k in ("boxes", "draws")}
    _equal(first, second)
    by_position = pipeline.make_pass(source, {"a": np.arange(40).reshape(5, 8)}, specs, RECIPE, (1,))
    assert not np.array_equal(by_position(1)["draws"], by_ten(1)["draws"])


def test_each_host_gets_its_columns_of_the_single_host_batch():
    source, _ = _array_source()
    plans = _plans()
    whole = pipeline.make_pass(source, plans, SPECS, RECIPE, seed=(1,))(4)
    parts = [pipeline.make_pass(source, plans, SPECS, RECIPE, (1,), process, 4)(4) for process in range(4)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.host_share(plans["a"], 0, 3, axis=1)


def test_a_pass_resumes_at_any_step_with_the_same_batches():
    source, _ = _array_source()
    maker = pipeline.make_pass(source, _plans(), SPECS, RECIPE, seed=(2,))
    with pipeline.Loader(maker) as loader:
        batches = list(loader)
        assert loader.position == 5 and loader.wait_seconds >= 0
    assert len(batches) == 5
    for step, batch in enumerate(batches):
        _equal(batch, maker(step))
    with pipeline.Loader(maker, start=3) as resumed:
        rest = list(resumed)
    assert len(rest) == 2
    for batch, expected in zip(rest, batches[3:]):
        _equal(batch, expected)


def _file_source(root, count=24, bad=None):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(count):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        path = os.path.join(root, f"{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    if bad is not None:
        with open(paths[bad], "wb") as f:
            f.write(b"\xff\xd8 not a jpeg")
    return FileSource(paths, np.zeros(count), load_size=32)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_worker_processes_give_the_in_process_batches(tmp_path):
    source = _file_source(tmp_path)
    assert pipeline.worker_count(3, source) == 3 and pipeline.worker_count(3, _array_source()[0]) == 0
    plans = {"a": np.arange(24).reshape(6, 4)[:, ::-1], "b": np.roll(np.arange(24), 5).reshape(6, 4)}
    maker = pipeline.make_pass(source, plans, SPECS, RECIPE, seed=(3,))
    expected = [maker(step) for step in range(6)]
    assert expected[0]["pixels_a"].shape == (4, 32, 48, 3)
    with pipeline.Loader(maker, num_workers=2) as loader:
        batches = list(loader)
    with pipeline.Loader(maker, num_workers=2, start=4) as loader:
        batches += list(loader)
    assert len(batches) == 8
    for batch, want in zip(batches, expected + expected[4:]):
        _equal(batch, want)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_bad_file_in_a_worker_is_the_same_one_line_error(tmp_path):
    source = _file_source(tmp_path, count=8, bad=5)
    maker = pipeline.make_pass(source, {"a": np.arange(8).reshape(2, 4)}, (("a", "eval"),), RECIPE, seed=(0,))
    with pytest.raises(DataError, match="005.jpg cannot be decoded"):
        with pipeline.Loader(maker, num_workers=1) as loader:
            list(loader)
