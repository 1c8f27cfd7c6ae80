"""`config.dtype="bfloat16"`: bf16 convolutions and dense layers, with float32 parameters, optimiser state,
BatchNorm statistics and loss math, a loss at initialisation close to float32's, and which configs use it."""
import importlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import digits
from conftest import load_splits
from spcl_jax import epoch_batches, objective, train
from spcl_jax.method import METHODS

LOSS_PRIMITIVES = {"exp", "log", "log1p", "logistic", "rsqrt", "div"}


def _config(dtype):
    """The tiny digits run of test_train's sharding test (its float32 step is in the compile cache)."""
    config = digits.get_config()
    config.image_size, config.width_multiplier, config.batch_size = 16, 0.125, 32
    config.num_prototypes, config.pca_dim, config.learning_rate = 8, 8, 0.01
    config.dtype = dtype
    return config


@pytest.fixture(scope="module")
def steps():
    """One SPCL step per dtype from the same init and batch: (state before, state after, metrics)."""
    splits = load_splits(_config("float32"))
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    pseudo = np.arange(len(splits.pretrain)) % 8
    results = {}
    for dtype in ("float32", "bfloat16"):
        setup, state = train.build(_config(dtype), METHODS["spcl"], splits, mesh)
        batch = epoch_batches.load_batch(setup, 0, epoch_batches.epoch_plan(setup, 0, pseudo), 0, pseudo)
        before = jax.device_get(state)  # the step donates `state`
        after, metrics = setup.train_step(state, batch)
        results[dtype] = (setup, before, jax.device_get(after), jax.device_get(metrics), batch)
    return results


def _float_leaves(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if np.issubdtype(np.asarray(x).dtype, np.floating) or np.asarray(x).dtype == jax.numpy.bfloat16]


@pytest.mark.slow
def test_bf16_step_keeps_parameters_optimiser_state_and_statistics_float32(steps):
    _, before, after, metrics, _ = steps["bfloat16"]
    for part in ("params", "batch_stats", "opt_state", "classifier_params", "classifier_opt_state"):
        leaves = _float_leaves(getattr(after, part))
        assert leaves or part == "classifier_opt_state", part  # plain SGD keeps no float state
        for name, leaf in leaves:
            assert np.asarray(leaf).dtype == np.float32, f"{part}{name}: {np.asarray(leaf).dtype}"
    for key, value in metrics.items():  # counts are int32, everything else float32
        assert np.asarray(value).dtype in (np.float32, np.int32) and np.isfinite(value), key
    assert np.asarray(metrics["train/loss"]).dtype == np.float32
    moved = [not np.array_equal(a, b) for (_, a), (_, b) in zip(_float_leaves(before.batch_stats),
                                                                  _float_leaves(after.batch_stats))]
    assert all(moved)  # the running statistics were updated, in float32
    assert not np.array_equal(before.params["encoder"]["stem_conv"]["kernel"],
                              after.params["encoder"]["stem_conv"]["kernel"])


@pytest.mark.slow
def test_bf16_loss_at_init_matches_float32(steps):
    """Same float32 initialisation, batch and key. bf16 rounds each activation to 8 significant bits
    (2^-9 ~ 2e-3 relative); the losses average that over the batch. Measured: total 7e-4, NT-Xent 1.5e-3,
    metric 4e-4, prototype 1e-4 relative; the tolerance is 5e-3."""
    _, before32, _, metrics32, _ = steps["float32"]
    _, before16, _, metrics16, _ = steps["bfloat16"]
    jax.tree.map(np.testing.assert_array_equal, before32.params, before16.params)
    for key in ("train/loss", "train/loss_contrastive", "train/loss_prototype", "train/loss_metric"):
        np.testing.assert_allclose(metrics16[key], metrics32[key], rtol=5e-3, err_msg=key)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    yield from _equations(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _equations(inner)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convolutions_run_in_the_compute_dtype_and_the_loss_math_in_float32(steps, dtype):
    """The traced loss: every convolution in `dtype`; every exp/log/rsqrt/division (NT-Xent, softmax
    cross-entropy, BCE, BatchNorm normalisation, the augmentation) in float32."""
    setup, before, _, _, batch = steps[dtype]
    loss_fn = objective.make_loss_fn(setup.parts.objective, METHODS["spcl"], setup.graphdef, setup.classifier_graphdef,
                                     setup.parts.augment, setup.specs)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: loss_fn(*a)[0]))(
        before.params, before.classifier_params, before.batch_stats, batch)
    equations = list(_equations(jaxpr.jaxpr))
    convolutions = [e for e in equations if e.primitive.name == "conv_general_dilated"]
    assert len(convolutions) > 40  # 4 views x 20 convolutions forward, and their backward
    assert {str(v.aval.dtype) for e in convolutions for v in e.invars} == {dtype}
    math = [e for e in equations if e.primitive.name in LOSS_PRIMITIVES]
    assert {"exp", "log", "log1p", "rsqrt", "div"} <= {e.primitive.name for e in math}
    assert {str(v.aval.dtype) for e in math for v in e.outvars} - {"int32"} == {"float32"}  # int: crop boxes


def test_accelerator_configs_default_to_bfloat16_and_digits_to_float32():
    for name in ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "tinyimagenet"):
        assert importlib.import_module(f"configs.{name}").get_config().dtype == "bfloat16", name
    assert digits.get_config().dtype == "float32"
    assert importlib.import_module("configs.default").get_config().dtype == "float32"
