"""spcl_jax.optim against float64 references: LARS in both modes (which tensors get weight decay and the trust
ratio) and the pretraining learning-rate schedule, epoch by epoch, against the original's curve."""
import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax import optim


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "stem_conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "stem_bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "layer1": {"bn1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
        "proj_fc1": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32), "bias": jnp.zeros(4)},
    }


def _toy_grads(params):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def test_lars_simclr_mode_leaves_bias_and_norm_params_plain():
    params, grads = _toy_params(), _toy_grads(_toy_params())
    lr, wd, eta = 0.5, 1e-2, 1e-3
    tx = optim.build_optimiser("lars", lr, weight_decay=wd, params=params, lars_mode="simclr", lars_eta=eta)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat_u = dict(jax.tree_util.tree_leaves_with_path(updates))
    flat_p = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        p = np.asarray(flat_p[path], np.float64)
        g = np.asarray(g, np.float64)
        if name.endswith("['kernel']"):
            d = g + wd * p
            expected = -lr * eta * np.linalg.norm(p) / np.linalg.norm(d) * d
        else:  # biases and BatchNorm scale/bias: no decay, no trust ratio
            expected = -lr * g
        # Nesterov with an empty buffer: update = step + momentum * step.
        np.testing.assert_allclose(flat_u[path], 1.9 * expected, rtol=1e-5, err_msg=name)


def test_lars_as_written_reproduces_the_original_rule():
    params, grads = _toy_params(), _toy_grads(_toy_params())
    lr, wd, eta = 0.5, 1e-2, 1e-3
    tx = optim.build_optimiser("lars", lr, weight_decay=wd, params=params, lars_mode="as_written", lars_eta=eta)
    updates, _ = tx.update(grads, tx.init(params), params)
    decayed = {"['stem_conv']['kernel']", "['stem_bn']['scale']", "['proj_fc1']['kernel']"}
    flat_p = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_g = dict(jax.tree_util.tree_leaves_with_path(grads))
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        p, g = np.asarray(flat_p[path], np.float64), np.asarray(flat_g[path], np.float64)
        d = g + wd * p if name in decayed else g
        expected = -lr * eta * np.linalg.norm(p) / np.linalg.norm(d) * d  # zero-norm biases: exactly 0
        np.testing.assert_allclose(u, 1.9 * expected, rtol=1e-5, atol=1e-12, err_msg=name)
    assert not np.any(np.asarray(updates["stem_bn"]["bias"]))
    zero_grads = jax.tree.map(jnp.zeros_like, grads)
    nan_updates, _ = tx.update(zero_grads, tx.init(params), params)
    # |g| = 0 on a tensor without weight decay: eta*|w|/0 * 0 = nan, as the original.
    assert np.isnan(np.asarray(nan_updates["layer1"]["bn1"]["scale"])).all()


def test_pretrain_schedule_matches_the_original_per_epoch_curve():
    kwargs = dict(base_lr=1.0, batch_size=512, n_epochs=100, warmup_epochs=10, steps_per_epoch=7)
    fixed = optim.pretrain_lr_schedule(**kwargs)
    written = optim.pretrain_lr_schedule(**kwargs, epoch0_zero_lr=True)
    for epoch in range(100):
        step = jnp.int32(epoch * 7 + 3)
        cosine = 0.5 * (1 + np.cos(np.pi * (epoch - 10) / 90))
        want_fixed = (epoch + 1) / 10 if epoch < 10 else cosine
        want_written = 1e-13 if epoch == 0 else (epoch / 10 if epoch <= 10 else cosine)
        np.testing.assert_allclose(float(fixed(step)), want_fixed, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(float(written(step)), want_written, rtol=1e-4, atol=1e-7)
    no_warmup = optim.pretrain_lr_schedule(**dict(kwargs, warmup_epochs=0))
    np.testing.assert_allclose(float(no_warmup(jnp.int32(0))), 1.0, rtol=1e-6)  # the same peak as with warmup
    as_written = optim.pretrain_lr_schedule(**dict(kwargs, warmup_epochs=0), no_warmup_peak="scaled")
    np.testing.assert_allclose(float(as_written(jnp.int32(0))), 2.0, rtol=1e-6)  # LR*B/256 = 1.0*512/256 (DIFFERENCES.md, B-6)
    for epoch in (1, 50, 99):
        np.testing.assert_allclose(float(as_written(jnp.int32(epoch * 7))), 2 * float(no_warmup(jnp.int32(epoch * 7))),
                                   rtol=1e-6)
    per_step = optim.pretrain_lr_schedule(**kwargs, stepping="step")
    np.testing.assert_allclose(float(per_step(jnp.int32(0))), 1 / 70, rtol=1e-5)
    np.testing.assert_allclose(float(per_step(jnp.int32(69))), 1.0, rtol=1e-5)
