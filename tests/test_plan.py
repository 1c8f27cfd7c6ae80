"""The planner's parts that need no accelerator route: the abstract builders against the concrete ones they stand
for, the nominal data, the sharded kNN against one device, the HLO reading, the targets and the batch search, and
the accelerator check before a run loads its data. (The TPU and GPU routes: tests/test_plan_targets.py.)"""
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import digits, imagenet
from conftest import load_splits
from spcl_jax import data, epoch_batches, network, probes, startup, train
from spcl_jax.data import datasets, pipeline
from spcl_jax.data.sizes import Sizes
from spcl_jax.errors import ConfigError
from spcl_jax.method import METHODS
from spcl_jax.plan import fit, hlo, planner, programs, targets


def _tiny(**overrides):
    config = digits.get_config()
    config.image_size, config.width_multiplier, config.batch_size = 16, 0.0625, 16
    config.num_prototypes, config.pca_dim = 8, 8
    for key, value in overrides.items():
        config[key] = value
    return config


def _mesh(devices):
    return Mesh(np.array(jax.devices()[:devices]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_abstract_state_and_batch_are_the_shapes_of_the_concrete_ones():
    """What the planner compiles from (shapes and shardings, nothing computed) is what a run passes its step."""
    config = _tiny()
    splits = load_splits(config)
    for method in ("spcl", "simclr", "supervised"):
        architecture = startup.architecture(config)
        abstract_graph = network.abstract(architecture, METHODS[method], splits.num_classes)[0]
        assert abstract_graph == network.create(architecture, METHODS[method], splits.num_classes, 0)[0]
        run, state = train.build(config, METHODS[method], splits, _mesh(8))
        shapes = train.abstract_state(run)
        assert jax.tree.structure(shapes) == jax.tree.structure(state)
        for a, c in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
            assert (a.shape, a.dtype, a.sharding) == (c.shape, c.dtype, c.sharding)
        pseudo = np.arange(len(splits.pretrain)) % config.num_prototypes
        batch = epoch_batches.load_batch(run, 0, epoch_batches.epoch_plan(run, 0, pseudo), 0, pseudo)
        spec = train.batch_spec(run, config.batch_size)
        assert spec.keys() == batch.keys(), method
        for key, value in batch.items():
            assert (spec[key].shape, spec[key].dtype, spec[key].sharding) == (value.shape, value.dtype,
                                                                              value.sharding), key
        if method == "spcl":  # the step compiled from the shapes runs on the concrete arrays
            compiled = run.train_step.lower(shapes, spec).compile()
            new_state, metrics = compiled(state, batch)
            assert np.isfinite(float(metrics["train/loss"])) and int(new_state.step) == 1


def test_nominal_sizes_and_canvas_stand_for_the_data():
    config = _tiny()
    real = load_splits(config)
    assert datasets.nominal_canvas(config.dataset, config.image_size) == tuple(real.pretrain.canvas_shape)
    config = imagenet.get_config()
    pool = data.nominal_pool(startup.data_spec(config))
    assert (len(pool.train), len(pool.test), pool.classes) == (1_281_167, 50_000, 1000)
    splits = load_splits(config, pool)
    assert len(splits.valid) == 50 * 1000 and len(splits.pretrain) == 1_281_167 - 50_000  # val_sample held out
    assert tuple(splits.pretrain.canvas_shape) == (256, 384)
    with pytest.raises(data.DataError if hasattr(data, "DataError") else Exception, match="no images"):
        splits.pretrain.load(np.arange(2))
    config.dataset = "imagefolder"
    with pytest.raises(Exception, match="--num_examples"):
        data.nominal_pool(startup.data_spec(config))
    assert len(data.nominal_pool(startup.data_spec(config), 5_000).train) == 5_000


def test_sharded_knn_votes_equal_one_device_on_random_features():
    """The kNN bank sharded over 8 devices (rows padded to a multiple of 8) votes as one device does."""
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(203, 12)).astype(np.float32), rng.normal(size=(37, 12)).astype(np.float32)
    train_y = rng.integers(0, 6, 203)
    one = probes.knn_predict(train_x, train_y, test_x, 6, 15, 0.1, chunk=16)
    eight = probes.knn_predict(train_x, train_y, test_x, 6, 15, 0.1, chunk=16, mesh=_mesh(8))
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert (eight.argmax(1) == one.argmax(1)).all()


def test_programs_build_for_a_mesh_and_compile_on_the_cpu():
    """Every program of a run, built from shapes alone, compiles here; its memory is XLA's and the step's FLOPs
    grow with the batch."""
    config = _tiny()
    sizes = Sizes.of(load_splits(config), nominal=False)
    splits = sizes.splits(config.dataset)
    built = programs.build(startup.parts(config, METHODS["spcl"], splits), sizes, _mesh(8))
    assert list(built) == ["train_step", "feature_pass", "pca_statistics", "pca_projection", "kmeans",
                           "linear_eval_step", "knn"]
    assert built["kmeans"].counted_flops > 0 and built["feature_pass"].resident > 0
    supervised = programs.build(startup.parts(config, METHODS["supervised"], splits), sizes, _mesh(8))
    assert "kmeans" not in supervised and "feature_pass" not in supervised


def test_hlo_traffic_counts_collectives_and_loop_trips():
    text = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups={}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8], b: bf16[4,4]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = bf16[4,4]{1,0} parameter(1)
  %g = bf16[16,4]{1,0} all-gather(%b), dimensions={0}
  %f = f32[8]{0} fusion(%a, %g), kind=kLoop, calls=%fused
  %init = (s32[], f32[8]) tuple(%zero, %f)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
    traffic = hlo.traffic(text)
    assert traffic.collectives == {"all-gather": (1, 128), "all-reduce": (5, 5 * 32)}
    # the all-gather (32 in, 128 out), the fusion (32 + 128 in, 32 out), five all-reduces (32 in, 32 out)
    assert traffic.kernel_bytes == 160 + 192 + 5 * 64
    assert hlo.shape_bytes("(f32[2,3]{1,0}, bf16[4]{0:T(128)S(1)}, pred[])") == 24 + 8 + 1


def test_targets_parse_cloud_names():
    assert (targets.parse("v5e-64").chips, targets.parse("v5e-64").hosts) == (64, 8)
    assert targets.parse("v4-32").chips == 16 and targets.parse("v5p-128").chips == 64  # named by TensorCores
    gpu = targets.parse("h100x8", hosts=4)
    assert (gpu.chips, gpu.hosts, gpu.usable_memory()) == (32, 4, int(0.75 * gpu.chip.memory_bytes))
    assert targets.parse("v5e-16", slices=2).chips == 32
    for bad in ("v5e-3", "v4-4", "h100x3", "tpu"):
        with pytest.raises(ValueError, match="valid: TPU slices"):
            targets.parse(bad)
    assert {"v5e-256", "v6e-1", "v4-8", "v5p-8", "h200x8", "a100-80x8"} <= set(targets.names())
    for family in targets.GPU_TARGET_FILES:
        description = targets.gpu_target_description(family)
        assert f"device_memory_size: {targets.CHIPS[family].memory_bytes}" in description


def _measured(batch, total, temporaries, arguments=0):
    return dataclasses.make_dataclass("M", ["bytes_per_device", "temporaries", "arguments"])(total, temporaries,
                                                                                            arguments)


def _search(memory, usable=100, granularity=4, first=8):
    """Runs planner.Search against a memory curve (batch -> bytes) as the planner runs it against compiles."""
    search = planner.Search("none", usable=usable, granularity=granularity)
    search.add(first, _measured(first, memory(first), memory(first) - 2, 4))
    while (batch := search.next_batch()) is not None:
        search.checks += 1
        search.add(batch, _measured(batch, memory(batch), memory(batch) - 2, 4))
    return search


def test_batch_search_finds_the_largest_batch_by_compiles():
    """On a straight memory line (fixed 4, 3 per pair; 100 usable, 4 devices) one compile of the predicted 32 ends
    the search; where the line bends above 28 (32 needs 106), 32 is compiled over and 28 under: bracketed."""
    straight = _search(lambda b: 4 + 3 * b)
    assert straight.answer() == {"global_batch": 32, "bytes_per_device": 100, "next_over": "predicted"}
    assert sorted(straight.seen) == [8, 32] and straight.checks == 1
    bent = _search(lambda b: 4 + 3 * b + (6 if b > 28 else 0))
    assert bent.answer() == {"global_batch": 28, "bytes_per_device": 88, "next_over": "compiled"}
    assert sorted(bent.seen) == [8, 28, 32]
    assert _search(lambda b: 200 + b).answer() is None  # nothing fits
    assert fit.predict_largest_batch(4 + 3 * 8, 3 * 8 - 2 + 2, 4, 8, 100, 4) == 32


def test_a_step_that_cannot_fit_stops_before_the_data_is_loaded(monkeypatch, tmp_path):
    """On an accelerator (here: a CPU made to report a device memory) the run stops in one line naming the bytes
    and the remedies, and never loads its data."""
    config = _tiny(method="supervised")  # one view: the cheapest step to compile
    monkeypatch.setattr(fit, "device_memory", lambda device: 1 << 16)  # 64 KiB
    monkeypatch.setattr(data, "load_splits", lambda *a, **k: pytest.fail("the data was loaded"))
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(error.value)
    assert "\n" not in message and "GiB per device" in message and "has 0.00 GiB" in message
    assert "--config.remat=block" in message and "spcl_jax.plan" in message and "more devices" in message
    monkeypatch.setattr(fit, "device_memory", lambda device: 1 << 40)
    train.check_step_fits(config, METHODS["supervised"], train.sharding.data_mesh())  # fits: nothing raised


def test_batch_spec_matches_the_batches_the_loader_makes():
    config = _tiny()
    splits = load_splits(config)
    specs = (("a", "pretrain"), ("a", "pretrain"), ("b", "eval"))
    maker = pipeline.make_pass(splits.pretrain, {"a": np.arange(32).reshape(2, 16), "b": np.arange(32).reshape(2, 16)},
                               specs, startup.recipe(config), (1, 2))
    batch = maker(0)
    spec = pipeline.batch_spec(("a", "b"), 3, splits.pretrain.canvas_shape, 16)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(d)) for k, (s, d) in spec.items()}


def test_a_crashed_compiler_process_leaves_its_tasks_to_one_process(monkeypatch):
    """When a compiler process dies with several at work (the host's memory ran out), the tasks not finished are
    compiled again one at a time, and so is everything after; with one process at work the crash is the error."""
    calls = []

    def completed(pool, tasks):
        calls.append(list(tasks))
        if len(calls) == 1:
            yield tasks[0], ["a compiled"]
            raise planner.CompilerCrashed("the compiler crashed")
        yield from ((task, [f"{task} compiled"]) for task in tasks)

    monkeypatch.setattr(planner, "completed", completed)
    with planner.Compilers(2) as pool:
        assert list(pool.run(["a", "b", "c"])) == [("a", ["a compiled"]), ("b", ["b compiled"]),
                                                    ("c", ["c compiled"])]
        assert calls[1] == ["b", "c"] and pool.jobs == 1
        assert list(pool.run(["d"])) == [("d", ["d compiled"])]
    calls.clear()
    with planner.Compilers(1) as pool, pytest.raises(planner.CompilerCrashed):
        list(pool.run(["a", "b"]))
