"""Checkpoint round trip: what the Manager saves, `restore_or` gives back bit for bit."""
import signal

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import digits
from spcl_jax import checkpoint, sharding
from spcl_jax.method import METHODS


@pytest.fixture
def keep_signal_handlers():
    """The Manager installs SIGTERM/SIGINT handlers; give pytest its own back afterwards."""
    previous = {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _random_state(mesh, rng):
    """A state shaped like the trainer's, with random leaves of several dtypes and the float values
    that a lossy or value-based copy would change: NaN, -0.0, +-inf, subnormals."""
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40, -3e-39], np.float32)
    replicated, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    put = lambda x, where=replicated: jax.device_put(x, where)  # noqa: E731
    return dict(
        params={"encoder": {"kernel": put(np.concatenate([special, rng.normal(size=10).astype(np.float32)])),
                            "bf16": put(rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16)),
                            "half": put(rng.normal(size=(5,)).astype(np.float16))}},
        batch_stats={"rows": put(rng.normal(size=(16, 3)).astype(np.float32), rows)},
        opt_state=(put(rng.integers(-2**31, 2**31 - 1, size=(4,), dtype=np.int32)),
                   {"mask": put(rng.random(6) < 0.5), "bytes": put(rng.integers(0, 256, 7).astype(np.uint8))}),
        classifier_params={}, classifier_opt_state=(),
        step=put(np.int32(rng.integers(1, 1000))), first_nonfinite_step=put(np.int32(-1)))


def test_save_then_restore_or_gives_every_leaf_back_bit_identical(tmp_path, keep_signal_handlers):
    config = digits.get_config()
    mesh = sharding.data_mesh()
    rng = np.random.default_rng(0)
    state = _random_state(mesh, rng)
    pseudo = rng.integers(0, config.num_prototypes, 50)
    manager = checkpoint.Manager(tmp_path, config, METHODS["spcl"])
    fresh = jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), state)
    assert manager.restore_or(fresh, len(pseudo)) == (fresh, None)
    manager.save(state, pseudo, epoch_end=True)
    manager.close()

    restored, restored_pseudo = checkpoint.Manager(tmp_path, config, METHODS["spcl"]).restore_or(fresh, len(pseudo))
    saved_leaves, treedef = jax.tree.flatten_with_path(state)
    restored_leaves, restored_treedef = jax.tree.flatten_with_path(restored)
    assert restored_treedef == treedef and len(saved_leaves) == 9
    for (path, want), (_, got) in zip(saved_leaves, restored_leaves):
        name = jax.tree_util.keystr(path)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim), name
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), name
    assert restored_pseudo.dtype == np.int64
    np.testing.assert_array_equal(restored_pseudo, pseudo)
