"""The feature pass: every example once in dataset order, its augmented view keyed by its own index."""
import jax
import numpy as np

from configs import digits
from conftest import load_splits
from spcl_jax import features, network, sharding, startup
from spcl_jax.data import ArraySource
from spcl_jax.method import METHODS


def _features(source, kind, batch_size, config, splits):
    graphdef, params, batch_stats = network.create(startup.architecture(config), METHODS["spcl"], splits.num_classes,
                                                   config.seed)
    mesh = sharding.data_mesh()
    aug = startup.augment_params(config, splits.mean, splits.std)
    encode = features.make_encode(graphdef, aug, mesh, kind)
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    maker = features.feature_pass(source, np.arange(len(source)), batch_size, kind,
                                  startup.recipe(config), seed=(config.seed, 1, 0))
    feats, position = features.extract_features(lambda b: encode(params, batch_stats, b), maker, mesh)
    out = np.empty((len(source), feats.shape[1]), np.float32)
    valid = position < len(source)
    out[position[valid]] = sharding.to_host(feats)[valid]
    return out


def test_copies_of_an_image_a_batch_apart_get_their_own_augmented_views():
    """Two copies of each image, B positions apart: the augmented features differ (each example draws its
    view from its own index), the clean eval features are equal."""
    config = digits.get_config()
    config.width_multiplier = 0.0625
    splits = load_splits(config)
    images = splits.pretrain.load(np.arange(16)).pixels
    twice = ArraySource(np.concatenate([images, images]), np.zeros(32))
    augmented = _features(twice, "pretrain", 16, config, splits)
    assert not any(np.allclose(augmented[i], augmented[i + 16], atol=1e-4) for i in range(16))
    clean = _features(twice, "eval", 16, config, splits)
    np.testing.assert_allclose(clean[:16], clean[16:], rtol=1e-5, atol=1e-6)
    again = _features(twice, "pretrain", 8, config, splits)  # another batch size: the same views
    np.testing.assert_allclose(again, augmented, rtol=1e-4, atol=1e-5)


def test_every_pass_reuses_the_compiled_buffer_functions():
    """Each epoch's feature pass of the same shape compiles nothing new for its output buffer (a jit of a fresh
    lambda per pass recompiled both every epoch)."""
    config = digits.get_config()
    config.width_multiplier = 0.0625
    splits = load_splits(config)
    source = ArraySource(splits.pretrain.load(np.arange(12)).pixels, np.zeros(12))
    first = _features(source, "eval", 8, config, splits)
    sizes = features._zeros_buffer._cache_size(), features._buffer_as_rows._cache_size()
    np.testing.assert_array_equal(_features(source, "eval", 8, config, splits), first)
    assert (features._zeros_buffer._cache_size(), features._buffer_as_rows._cache_size()) == sizes
