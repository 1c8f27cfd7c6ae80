"""ResNet encoders and heads: shapes, parameter counts, initialisation, padding, BatchNorm modes and dtypes.

Deep networks are only traced abstractly (nnx.eval_shape); real forward passes use a narrow ResNet-18 on tiny images.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spcl_jax.models import (
    Architecture,
    LinearHead,
    MetricLearner,
    ProjectionHead,
    PrototypeClassifier,
    ResNet,
    build_encoder,
    feature_dim,
    is_norm_or_bias,
)
from spcl_jax.models.batch_norm import BatchNorm
from spcl_jax.models.resnet import relu, stem_max_pool

TINY_WIDTH = 1 / 16  # 4, 8, 16, 32 channels
TINY_IMAGES = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)

# One jitted forward for every real pass: same model structure and input shape -> one compilation.
forward = nnx.jit(lambda model, x: model(x))


def rngs(seed=0):
    """Real initialisation with the 'rbg' PRNG: XLA compiles it per shape ~8x faster than threefry on CPU."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def images(seed):
    return jax.random.normal(jax.random.key(seed), TINY_IMAGES.shape)


@pytest.fixture(scope="module")
def tiny():
    """Narrow ResNet-18 with the CIFAR stem; tests that mutate it work on an nnx.clone."""
    return ResNet(18, stem="cifar", width_multiplier=TINY_WIDTH, rngs=rngs())


def abstract_resnet(depth, **kwargs):
    return nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0), **kwargs))


def param_count(model):
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def flat_values(model, kind):
    return {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, kind))}


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (50, 23_508_032)])
def test_parameter_count_matches_torchvision_without_fc(depth, expected):
    assert param_count(abstract_resnet(depth, stem="imagenet")) == expected


@pytest.mark.parametrize(
    "depth,stem,width",
    [
        pytest.param(depth, stem, width, marks=[pytest.mark.slow] if depth >= 101 else [])
        for depth, stem, width in itertools.product((18, 34, 50, 101, 152), ("cifar", "imagenet"), (1.0, 0.25))
    ],
)
def test_output_shapes_for_every_depth_stem_and_width(depth, stem, width):
    # Each depth and stem is traced once per width; the dtype alternates so that each sees both.
    dtype = jnp.bfloat16 if (width == 1.0) == (stem == "imagenet") else jnp.float32
    size, spatial = (32, 4) if stem == "cifar" else (224, 7)
    model = abstract_resnet(depth, stem=stem, width_multiplier=width, dtype=dtype)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    features, feature_map = nnx.eval_shape(lambda m, x: (m(x), m.feature_map(x)), model, images)
    dim = feature_dim(f"resnet{depth}", width)
    assert model.features_dim == dim
    assert (features.shape, features.dtype) == ((2, dim), jnp.float32)
    assert (feature_map.shape, feature_map.dtype) == ((2, spatial, spatial, dim), dtype)


def test_feature_dim():
    assert feature_dim("resnet18") == feature_dim("resnet34") == 512
    assert feature_dim("resnet50") == feature_dim("resnet101") == feature_dim("resnet152") == 2048
    assert feature_dim("resnet50", 0.5) == 1024
    assert feature_dim("resnet18", TINY_WIDTH) == 32
    assert feature_dim("resnet18", 1e-3) == 1  # at least one channel per stage


def _config(**overrides):
    fields = dict(model="resnet18", stem="auto", image_size=32, width_multiplier=1.0, dtype="float32", remat="none",
                  proj_dim=128)
    return Architecture(**{**fields, **overrides})


def test_build_encoder_reads_the_architecture():
    auto_small = nnx.eval_shape(lambda: build_encoder(_config(image_size=64), rngs=nnx.Rngs(0)))
    assert auto_small.stem == "cifar" and auto_small.stem_conv.kernel.shape == (3, 3, 3, 64)
    auto_large = nnx.eval_shape(
        lambda: build_encoder(_config(model="resnet50", image_size=96, width_multiplier=0.5, dtype="bfloat16"),
                              rngs=nnx.Rngs(0))
    )
    assert auto_large.stem == "imagenet" and auto_large.stem_conv.kernel.shape == (7, 7, 3, 32)
    assert auto_large.stem_conv.padding == ((3, 3), (3, 3))
    assert auto_large.features_dim == 1024 and auto_large.dtype == jnp.bfloat16
    forced = nnx.eval_shape(lambda: build_encoder(_config(stem="imagenet"), rngs=nnx.Rngs(0)))
    assert forced.stem == "imagenet"


@pytest.mark.parametrize(
    "overrides",
    [dict(model="resnet20"), dict(model="vgg16"), dict(stem="tiny"), dict(dtype="float16"), dict(width_multiplier=0)],
)
def test_build_encoder_rejects_bad_config(overrides):
    with pytest.raises(ValueError):
        build_encoder(_config(**overrides), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- real forward passes on a narrow network


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_rematerialised_blocks_give_the_same_loss_gradients_and_statistics(model):
    """remat="block" recomputes each block in the backward pass: the numbers stay those of remat="none"."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
    results = []
    for remat in ("none", "block"):
        encoder = build_encoder(_config(model=model, image_size=16, width_multiplier=0.0625, remat=remat),
                                rngs=nnx.Rngs(0))
        graphdef, params, stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)

        def loss(params, stats):
            net = nnx.merge(graphdef, params, stats, copy=True)
            return jnp.sum(net(x) ** 2), nnx.state(net, nnx.BatchStat)

        (value, new_stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, stats)
        results.append((value, grads, new_stats))
        primitives = {e.primitive.name for e in jax.make_jaxpr(jax.grad(lambda p: loss(p, stats)[0]))(params).eqns}
        assert ("remat2" in primitives) == (remat == "block"), primitives  # jax.checkpoint's primitive
        # and the barrier of resnet.gradients_released_together, which makes multi-GPU compiles free the memory
        assert ("optimization_barrier" in primitives) == (remat == "block"), primitives
    (a, grads_a, stats_a), (b, grads_b, stats_b) = results
    np.testing.assert_allclose(b, a, rtol=1e-5)
    for tree_a, tree_b in ((grads_a, grads_b), (stats_a, stats_b)):
        for u, v in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
            np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-6)


def test_tiny_forward_pass(tiny):
    model = nnx.clone(tiny)
    features = forward(model, images(1))
    assert features.shape == (4, 32) and features.dtype == jnp.float32
    assert np.all(np.isfinite(features)) and np.all(features >= 0)  # pooled ReLU outputs
    assert np.any(model.layer4[1].bn2.mean[...] != 0)  # the running averages left the jitted call


def test_batch_norm_train_mode_uses_batch_statistics_eval_mode_running_averages(tiny):
    model = nnx.clone(tiny)
    x = images(2)
    h = np.float64(model.stem_conv(x))
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))

    model.train()
    np.testing.assert_allclose(model.stem_bn(h.astype(np.float32)), (h - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    running_mean, running_var = np.float64(model.stem_bn.mean[...]), np.float64(model.stem_bn.var[...])
    np.testing.assert_allclose(running_mean, 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * var, rtol=1e-5)

    model.eval()
    expected = (h - running_mean) / np.sqrt(running_var + 1e-5)
    np.testing.assert_allclose(model.stem_bn(h.astype(np.float32)), expected, atol=1e-4)
    np.testing.assert_array_equal(model.stem_bn.mean[...], running_mean.astype(np.float32))  # no update in eval

    # Whole network: in eval mode a sample's features do not depend on the rest of the batch, in train mode they do.
    other = x.at[2:].set(images(3)[2:])
    np.testing.assert_allclose(forward(model, x)[:2], forward(model, other)[:2], rtol=1e-5, atol=1e-6)
    model.train()
    assert not np.allclose(forward(model, x)[:2], forward(model, other)[:2], rtol=1e-3)


def test_batch_norm_matches_flax_batch_norm():
    x = 3 * jax.random.normal(jax.random.key(3), (5, 4, 4, 6)) + 1
    ours = BatchNorm(6)
    flax_bn = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-5, rngs=rngs())
    both = nnx.jit(lambda a, b, x: (a(x), b(x)))
    for _ in range(2):
        np.testing.assert_allclose(*both(ours, flax_bn, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], flax_bn.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], flax_bn.var[...], rtol=1e-5)
    ours.eval()
    flax_bn.eval()
    np.testing.assert_allclose(*both(ours, flax_bn, x), rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_match_float64_on_offset_data():
    """Within float32 rounding of the float64 formula on data whose mean is 60-300x its spread, where a one-pass
    variance E[x²] - E[x]² (flax's default) is off by 1e-2 (measured): the variance subtracts the mean first."""
    spread = jnp.linspace(0.1, 0.5, 5)
    x = np.asarray(30.0 + jax.random.normal(jax.random.key(6), (32, 8, 8, 5)) * spread)
    bn = BatchNorm(5)
    bn.scale.set_value(jnp.linspace(0.5, 2.0, 5))
    bn.bias.set_value(jnp.linspace(-1.0, 1.0, 5))
    out = np.asarray(nnx.jit(lambda bn, x: bn(x))(bn, x))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    want = (x64 - mean) / np.sqrt(var + 1e-5) * np.linspace(0.5, 2.0, 5) + np.linspace(-1.0, 1.0, 5)
    np.testing.assert_allclose(out, want, atol=5e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var, rtol=1e-6)


def test_relu_values_and_gradient_are_jax_nn_relu():
    x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0, jnp.inf, -jnp.inf, jnp.nan])
    np.testing.assert_array_equal(relu(x), jax.nn.relu(x))  # NaN stays NaN
    gradient = lambda f: jax.grad(lambda x: f(x).sum())(x[:7])  # noqa: E731
    np.testing.assert_array_equal(gradient(relu), gradient(jax.nn.relu))
    assert relu(x).dtype == jnp.float32 and relu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def _fused_transposes(activation):
    """Fusions of the compiled weight gradient of conv(activation(x·a + y)) that transpose inside a loop over the
    activation (XLA:CPU recomputing it where the convolution's weight gradient transposes it)."""
    conv = lambda h, w: jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda w, x, y, a: jnp.sum(conv(activation(x * a + y), w) ** 2)  # noqa: E731
    cpu = jax.devices("cpu")[0]  # XLA:CPU's fusion decisions, whatever the default backend
    w, x, a = (jax.device_put(jnp.ones(shape), cpu) for shape in ((3, 3, 16, 16), (8, 8, 8, 16), (16,)))
    text = jax.jit(jax.grad(loss)).lower(w, x, x, a).compile().as_text()
    computations = text.split("\n\n")
    activation_ops = (" maximum(", " select(", " compare(")
    return [c for c in computations if " transpose(" in c and any(op in c for op in activation_ops)]


def test_relu_is_materialised_before_the_weight_gradient_transposes():
    """With jnp.maximum, XLA:CPU recomputes the activation inside the transpose the weight gradient needs (a
    fused transpose ran ~10x slower than a plain one); the select-based relu is computed once."""
    assert _fused_transposes(lambda z: jnp.maximum(z, 0))  # the behaviour worked around
    assert not _fused_transposes(relu)


def test_batch_norm_gradients_skip_the_running_averages():
    x = jax.random.normal(jax.random.key(4), (6, 3))

    def updated_running_mean(x):
        bn = BatchNorm(3)
        bn(x)
        return jnp.sum(bn.mean[...])

    weights = jax.random.normal(jax.random.key(5), (6, 3))

    def weighted(normalise):
        return lambda x: jnp.sum(normalise(x) * weights)

    def formula(x):
        return (x - x.mean(axis=0)) / jnp.sqrt(x.var(axis=0) + 1e-5)

    np.testing.assert_array_equal(jax.grad(updated_running_mean)(x), 0.0)
    # The batch statistics used for normalising are differentiated, as in the plain formula.
    ours = jax.grad(weighted(lambda x: BatchNorm(3)(x)))(x)
    np.testing.assert_allclose(ours, jax.grad(weighted(formula))(x), atol=1e-5)


@pytest.mark.slow
def test_bfloat16_model_keeps_float32_state_and_tracks_float32(tiny):
    bf16 = ResNet(18, stem="cifar", width_multiplier=TINY_WIDTH, dtype=jnp.bfloat16, rngs=rngs())
    features_bf16, features_f32 = forward(bf16, images(5)), forward(nnx.clone(tiny), images(5))
    assert features_bf16.dtype == jnp.float32
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(bf16))} == {jnp.dtype(jnp.float32)}
    relative = np.linalg.norm(features_bf16 - features_f32) / np.linalg.norm(features_f32)
    assert relative < 0.05


def test_abstract_bfloat16_state_is_float32():
    model = abstract_resnet(18, stem="imagenet", dtype=jnp.bfloat16)
    nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    dtypes = {value.dtype for _, value in nnx.to_flat_state(nnx.state(model))}
    assert dtypes == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------- initialisation and padding


def test_conv_init_is_untruncated_he_fan_out(tiny):
    standardised = []
    for path, kernel in flat_values(tiny, nnx.Param).items():
        if path[-1] != "kernel":
            continue
        kh, kw, _, out_channels = kernel.shape
        z = np.asarray(kernel).ravel() / np.sqrt(2.0 / (out_channels * kh * kw))
        if z.size >= 4096:
            assert abs(z.std() - 1) < 0.05, path
            assert abs(z.mean()) < 0.05, path
        standardised.append(z)
    z = np.concatenate(standardised)
    assert abs(z.std() - 1) < 0.02
    assert np.abs(z).max() > 3.0  # a (-2, 2)-truncated normal could not reach this


def test_batch_norm_init(tiny):
    for path, value in flat_values(tiny, nnx.Param).items():
        if path[-1] == "scale":
            np.testing.assert_array_equal(value, 1.0)
        elif path[-1] == "bias":
            np.testing.assert_array_equal(value, 0.0)
    for path, value in flat_values(tiny, nnx.BatchStat).items():
        np.testing.assert_array_equal(value, 0.0 if path[-1] == "mean" else 1.0)


def test_strided_conv_pads_symmetrically(tiny):
    conv = tiny.layer2[0].conv1  # 3x3, stride 2, 4 -> 8 channels
    kernel = conv.kernel[...]
    x = jax.random.normal(jax.random.key(6), (2, 8, 8, 4))

    def reference(padding):
        return jax.lax.conv_general_dilated(
            x, kernel, (2, 2), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )

    np.testing.assert_allclose(conv(x), reference(((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)
    assert not np.allclose(conv(x), reference("SAME"), atol=1e-3)  # Flax's SAME pads (0, 1) here
    shortcut = tiny.layer2[0].downsample_conv  # 1x1 stride 2 keeps pixels 0, 2, 4, ...
    np.testing.assert_allclose(shortcut(x), x[:, ::2, ::2] @ shortcut.kernel[...][0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [6, 7])
def test_stem_max_pool_pads_with_minus_infinity(size):
    x = -1 - np.abs(np.random.default_rng(size).normal(size=(2, size, size, 3))).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out = (size + 2 - 3) // 2 + 1
    expected = np.empty((2, out, out, 3), np.float32)
    for i, j in itertools.product(range(out), range(out)):
        expected[:, i, j] = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    np.testing.assert_array_equal(stem_max_pool(jnp.asarray(x)), expected)


# ---------------------------------------------------------------- heads


def test_projection_head():
    head = ProjectionHead(256, 8, rngs=rngs())
    h = jax.random.normal(jax.random.key(7), (4, 256))
    z = head(h)
    assert z.shape == (4, 8) and z.dtype == jnp.float32
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)  # ends in a train-mode BN, no ReLU
    kernel = np.asarray(head.proj_fc1.kernel[...])
    assert abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005
    np.testing.assert_array_equal(head.proj_fc1.bias[...], 0.0)
    np.testing.assert_array_equal(head.proj_fc2.bias[...], 0.0)


def test_projection_head_bfloat16_returns_float32():
    head = nnx.eval_shape(lambda: ProjectionHead(32, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    z = nnx.eval_shape(lambda m, h: m(h), head, jax.ShapeDtypeStruct((4, 32), jnp.float32))
    assert z.dtype == jnp.float32
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(head))} == {jnp.dtype(jnp.float32)}


def test_prototype_classifier_and_linear_head():
    h = jax.random.normal(jax.random.key(8), (3, 16))
    first, second = PrototypeClassifier(16, 10, rngs=rngs(0)), PrototypeClassifier(16, 10, rngs=rngs(1))
    assert first(h).shape == (3, 10)
    assert not np.allclose(first.fc.kernel[...], second.fc.kernel[...])  # re-initialised with a new key
    np.testing.assert_array_equal(first.fc.bias[...], 0.0)
    assert abs(float(first.fc.kernel[...].std()) - 0.01) < 0.003
    assert LinearHead(16, 7, rngs=rngs())(h).shape == (3, 7)


def test_metric_learner_on_absolute_difference():
    learner = MetricLearner(16, rngs=rngs())
    h_x, h_y = (jax.random.normal(jax.random.key(k), (5, 16)) for k in (9, 10))
    logits = learner(h_x, h_y)
    assert logits.shape == (5,)
    np.testing.assert_allclose(logits, learner(h_y, h_x), rtol=1e-6)
    expected = np.abs(np.asarray(h_x) - np.asarray(h_y)) @ np.asarray(learner.fc.kernel[...])[:, 0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(learner.from_difference(jnp.abs(h_x - h_y)), logits, rtol=1e-6)


# ---------------------------------------------------------------- LARS masks


def test_is_norm_or_bias_selects_biases_and_norm_parameters():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.encoder = ResNet(18, stem="imagenet", width_multiplier=TINY_WIDTH, rngs=rngs)
            self.head = ProjectionHead(32, 8, rngs=rngs)
            self.metric = MetricLearner(32, rngs=rngs)

    params = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0))), nnx.Param)
    flat = [path for path, _ in nnx.to_flat_state(params)]
    excluded = {path for path in flat if is_norm_or_bias(path)}
    expected = {path for path in flat if path[-1] == "bias" or (path[-1] == "scale" and "bn" in path[-2])}
    assert excluded == expected
    assert all(path[-1] == "kernel" for path in set(flat) - excluded)
    assert ("encoder", "layer2", 0, "downsample_bn", "scale") in excluded
    assert ("encoder", "stem_bn", "scale") in excluded and ("head", "proj_bn2", "bias") in excluded
    assert ("metric", "fc", "bias") in excluded and ("metric", "fc", "kernel") not in excluded

    # The same answer on jax key paths (what tree_map_with_path gives for an nnx State, ending in `.value`).
    key_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(key_paths) == len(flat)
    assert sum(is_norm_or_bias(path) for path, _ in key_paths) == len(excluded)
    assert is_norm_or_bias(("layer_norm", "scale")) and not is_norm_or_bias(("ebn", "scale"))
