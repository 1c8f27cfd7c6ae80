"""`python -m spcl_jax.export`: torchvision ResNet names, shapes and layouts, checked against the
torchvision convention written out here and against a numpy NCHW forward pass of torchvision's ResNet
on the exported tensors; bad input gives one line and exit status 2. `torchvision_encoder` against our
encoder (where torch is installed) and `spcl_jax.load_encoder` against the trained network."""
import builtins
import json
import logging as std_logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spcl_jax
from configs import digits
from conftest import load_splits
from spcl_jax import checkpoint, export, network
from spcl_jax.errors import CheckpointError, UserError
from spcl_jax.models.resnet import ResNet
from spcl_jax.storage import write_atomic
from spcl_jax.method import METHODS

STAGE_PLANES = (64, 128, 256, 512)


def torchvision_names_and_shapes(depth, width=1.0, stem="imagenet"):
    """(name, shape) of `torchvision.models.resnet<depth>().state_dict()` without fc, in order, written
    from torchvision's ResNet: conv1 7x7 (3x3 for the CIFAR stem), bn1, then per stage blocks of
    conv1/bn1/conv2/bn2 (BasicBlock) or conv1 1x1/conv2 3x3/conv3 1x1 x4 with bn1-3 (Bottleneck) and a
    downsample (1x1 conv, bn) where the stride or the width changes. Channels scaled as max(1, round(c*w))."""
    blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
    expansion = 4 if bottleneck else 1

    def scaled(c):
        return max(1, round(c * width))

    def bn(name, c):
        return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
                (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]

    kernel = 7 if stem == "imagenet" else 3
    inplanes = scaled(64)
    out = [("conv1.weight", (inplanes, 3, kernel, kernel))] + bn("bn1", inplanes)
    for s, (planes, count) in enumerate(zip(STAGE_PLANES, blocks), start=1):
        planes = scaled(planes)
        for i in range(count):
            p, stride = f"layer{s}.{i}", 2 if s > 1 and i == 0 else 1
            if bottleneck:
                out += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + bn(f"{p}.bn1", planes)
                out += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
                out += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + bn(f"{p}.bn3", planes * 4)
            else:
                out += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + bn(f"{p}.bn1", planes)
                out += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
            if stride != 1 or inplanes != planes * expansion:
                out += [(f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1))]
                out += bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return out


def test_the_written_out_convention_has_torchvision_sizes():
    # len(torchvision.models.resnet18().state_dict()) == 122 and resnet50: 320, both with fc.weight/fc.bias.
    r18, r50 = dict(torchvision_names_and_shapes(18)), dict(torchvision_names_and_shapes(50))
    assert len(r18) + 2 == 122 and len(r50) + 2 == 320
    assert r18["layer4.1.conv2.weight"] == (512, 512, 3, 3) and r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in r18
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1) and r50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert r50["conv1.weight"] == (64, 3, 7, 7) and r50["bn1.num_batches_tracked"] == ()


def _random_fill(state, rng):
    """Random values of plausible scale: He-scaled kernels, BatchNorm scales and variances near 1."""

    def fill(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        shape = leaf.shape
        if name == "kernel":
            return (rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        return rng.normal(scale=0.2, size=shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, state)


def _conv(x, weight, stride):
    """torch.nn.functional.conv2d in NCHW/OIHW with padding k // 2 (cross-correlation), float64."""
    k = weight.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    h, w = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], weight.shape[0], h, w))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + stride * h:stride, j:j + stride * w:stride],
                             weight[:, :, i, j])
    return out


def _bn(x, sd, name):
    shape = (1, -1, 1, 1)
    return ((x - sd[f"{name}.running_mean"].reshape(shape)) / np.sqrt(sd[f"{name}.running_var"].reshape(shape) + 1e-5)
            * sd[f"{name}.weight"].reshape(shape) + sd[f"{name}.bias"].reshape(shape))


def _max_pool(x):
    """MaxPool2d(3, stride=2, padding=1)."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    return np.max([x[:, :, i:i + 2 * h:2, j:j + 2 * w:2] for i in range(3) for j in range(3)], axis=0)


def torchvision_forward(sd, images_nchw, stem):
    """torchvision ResNet.forward (eval mode) without fc, from state-dict tensors only; pooled features."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(_bn(_conv(images_nchw, sd["conv1.weight"], 1 if stem == "cifar" else 2), sd, "bn1"))
    if stem == "imagenet":
        x = _max_pool(x)
    for s in range(1, 5):
        i = 0
        while f"layer{s}.{i}.conv1.weight" in sd:
            p, stride = f"layer{s}.{i}", 2 if s > 1 and i == 0 else 1
            if f"{p}.conv3.weight" in sd:  # Bottleneck: the stride is on conv2 (v1.5)
                y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], 1), sd, f"{p}.bn1"))
                y = relu(_bn(_conv(y, sd[f"{p}.conv2.weight"], stride), sd, f"{p}.bn2"))
                y = _bn(_conv(y, sd[f"{p}.conv3.weight"], 1), sd, f"{p}.bn3")
            else:
                y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], stride), sd, f"{p}.bn1"))
                y = _bn(_conv(y, sd[f"{p}.conv2.weight"], 1), sd, f"{p}.bn2")
            shortcut = x
            if f"{p}.downsample.0.weight" in sd:
                shortcut = _bn(_conv(x, sd[f"{p}.downsample.0.weight"], stride), sd, f"{p}.downsample.1")
            x = relu(y + shortcut)
            i += 1
    assert np.isfinite(x).all()
    return x.mean(axis=(2, 3))


def _our_features(graphdef, params, batch_stats, images_nhwc):
    def forward(params, batch_stats, x):
        model = nnx.merge(graphdef, params, batch_stats)
        model.eval()
        return model(x), model.stem_conv(x)

    return jax.jit(forward)(params, batch_stats, jnp.asarray(images_nhwc, jnp.float32))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A checkpoint (step 7) of a tiny ResNet-18 network with random parameters and statistics, saved
    by the trainer's checkpoint Manager."""
    config = digits.get_config()
    config.image_size, config.width_multiplier, config.method = 16, 0.0625, "simclr"
    workdir = tmp_path_factory.mktemp("export_run")
    graphdef, params, batch_stats = nnx.split(
        nnx.eval_shape(lambda: network.Network(config, METHODS["simclr"], 10, rngs=nnx.Rngs(0))), nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    params, batch_stats = _random_fill(params, rng), _random_fill(batch_stats, rng)
    state = dict(params=params, batch_stats=batch_stats, step=jnp.int32(7), first_nonfinite_step=jnp.int32(-1))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        manager = checkpoint.Manager(workdir, config, METHODS["simclr"])
        manager.restore_or(state, 10)
        manager.save(state, None, epoch_end=True)
        manager.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return workdir / "checkpoints", graphdef, params, batch_stats


def test_export_writes_torchvision_names_layouts_and_values(saved_run, tmp_path):
    directory, graphdef, params, batch_stats = saved_run
    out = tmp_path / "encoder.npz"
    # Relative paths, the way the README writes them (orbax itself reads absolute paths only).
    result = subprocess.run([sys.executable, "-m", "spcl_jax.export", "--checkpoint", directory.name,
                             "--out", os.path.relpath(out, directory.parent)], cwd=directory.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 120 tensors of resnet18" in result.stdout and "WARNING:absl" not in result.stderr
    with np.load(out) as npz:
        sd = dict(npz)
    assert [(k, v.shape) for k, v in sd.items()] == torchvision_names_and_shapes(18, 0.0625, "cifar")
    assert all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in sd.items())
    assert sd["bn1.num_batches_tracked"] == 7
    assert sorted(os.listdir(tmp_path)) == ["encoder.json", "encoder.npz"]
    meta = json.load(open(tmp_path / "encoder.json"))
    assert (meta["model"], meta["stem"], meta["stage_widths"], meta["step"]) == ("resnet18", "cifar", [4, 8, 16, 32], 7)
    config = digits.get_config()
    config.image_size = 16
    splits = load_splits(config)
    assert (meta["mean"], meta["std"]) == (list(splits.mean), list(splits.std))  # what the run trained with

    encoder = nnx.to_pure_dict(params["encoder"])
    np.testing.assert_array_equal(sd["layer2.0.downsample.0.weight"][:, :, 0, 0],
                                  encoder["layer2"][0]["downsample_conv"]["kernel"][0, 0].T)
    np.testing.assert_array_equal(sd["layer3.1.bn2.running_var"],
                                  nnx.to_pure_dict(batch_stats["encoder"])["layer3"][1]["bn2"]["var"])

    # Independent check of names, layouts and eval-mode BatchNorm: torchvision's forward pass in NCHW
    # on the exported tensors equals our encoder on the same images (and the stem conv on its own).
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3))
    net = nnx.merge(graphdef, params, batch_stats)
    encoder_graphdef, encoder_params, encoder_stats = nnx.split(net.encoder, nnx.Param, nnx.BatchStat)
    ours, stem = _our_features(encoder_graphdef, encoder_params, encoder_stats, images)
    nchw = images.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.asarray(stem).transpose(0, 3, 1, 2),
                               _conv(nchw, sd["conv1.weight"].astype(np.float64), 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, torchvision_forward(sd, nchw, "cifar"), rtol=1e-4, atol=1e-4)


def test_bottleneck_and_imagenet_stem_match_a_torchvision_forward():
    model = nnx.eval_shape(lambda: ResNet(50, stem="imagenet", width_multiplier=0.0625, rngs=nnx.Rngs(0)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(2)
    params, batch_stats = _random_fill(params, rng), _random_fill(batch_stats, rng)
    sd = export.torchvision_state_dict(nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), 3)
    assert [(k, v.shape) for k, v in sd.items()] == torchvision_names_and_shapes(50, 0.0625, "imagenet")
    assert export.describe(nnx.to_pure_dict(params))["model"] == "resnet50"
    images = rng.normal(size=(2, 32, 32, 3))
    ours, _ = _our_features(graphdef, params, batch_stats, images)
    np.testing.assert_allclose(ours, torchvision_forward(sd, images.transpose(0, 3, 1, 2), "imagenet"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_full_width_export_has_torchvision_names_and_shapes(depth, stem):
    model = nnx.eval_shape(lambda: ResNet(depth, stem=stem, rngs=nnx.Rngs(0)))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    zeros = lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape)  # noqa: E731  (no memory)
    params, batch_stats = (nnx.to_pure_dict(jax.tree.map(zeros, s)) for s in (params, batch_stats))
    sd = export.torchvision_state_dict(params, batch_stats, 0)
    expected = torchvision_names_and_shapes(depth, 1.0, stem)
    assert [(k, v.shape) for k, v in sd.items()] == expected
    meta = export.describe(params)
    assert (meta["model"], meta["stem"], meta["features_dim"]) == (f"resnet{depth}", stem, 512 if depth == 18 else 2048)


def _export_error(argv, capsys):
    absl_logger = std_logging.getLogger("absl")
    level = absl_logger.level
    try:
        with pytest.raises(SystemExit) as exit_info:
            export.main(argv)
    finally:  # main quiets orbax's notes for its process; the tests after this one log as before
        absl_logger.setLevel(level)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: error: "), lines
    return lines[0]


def test_bad_input_gives_one_line_and_exit_2(saved_run, tmp_path, capsys):
    directory = str(saved_run[0])
    out = str(tmp_path / "e.npz")
    assert "does not exist" in _export_error(["--checkpoint", str(tmp_path / "nope"), "--out", out], capsys)
    (tmp_path / "empty").mkdir()
    assert "no checkpoint in" in _export_error(["--checkpoint", str(tmp_path / "empty"), "--out", out], capsys)
    assert "step 5 is not saved" in _export_error(["--checkpoint", directory, "--out", out, "--step", "5"], capsys)
    assert "saved steps: [7]" in _export_error(["--checkpoint", directory, "--out", out, "--step", "5"], capsys)
    assert "--step -2; valid: -1" in _export_error(["--checkpoint", directory, "--out", out, "--step", "-2"], capsys)
    assert "invalid int value" in _export_error(["--checkpoint", directory, "--out", out, "--step", "x"], capsys)
    assert "required: --out" in _export_error(["--checkpoint", directory], capsys)
    assert "does not exist" in _export_error(["--checkpoint", directory, "--out", str(tmp_path / "no/e.npz")], capsys)
    (tmp_path / "dir.npz").mkdir()
    assert "is a directory" in _export_error(["--checkpoint", directory, "--out", str(tmp_path / "dir.npz")], capsys)
    assert "must end in .npz" in _export_error(["--checkpoint", directory, "--out", str(tmp_path / "e.pt")], capsys)
    other = tmp_path / "other"
    manager = checkpoint.open_manager(str(other))
    manager.save(1, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardSave(
        {"params": {"head": {"kernel": np.ones((2, 2), np.float32)}}})))
    manager.close()
    assert "has no ResNet encoder" in _export_error(["--checkpoint", str(other), "--out", out], capsys)
    assert sorted(os.listdir(tmp_path)) == ["dir.npz", "empty", "other"]  # nothing written, no temporaries


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "encoder.npz"
    path.write_bytes(b"previous")

    def fail(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(str(path), fail)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["encoder.npz"]


def _trained_encoder(saved_run):
    """f(normalised NHWC images) -> features of the saved network's encoder, BatchNorm in eval mode."""
    _, graphdef, params, batch_stats = saved_run
    net = nnx.merge(graphdef, params, batch_stats)
    net.encoder.eval()
    return lambda x: np.asarray(net.encoder(jnp.asarray(x, jnp.float32)))


def test_load_encoder_from_a_relative_path_equals_the_trained_encoder(saved_run, monkeypatch, tmp_path):
    directory = saved_run[0]
    monkeypatch.chdir(directory.parent.parent)
    encode = spcl_jax.load_encoder(os.path.join(directory.parent.name, directory.name))
    config = digits.get_config()
    config.image_size = 16
    splits = load_splits(config)  # the normalisation the run trained with
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)  # any size: nothing is cropped
    normalised = (images / 255.0 - np.asarray(splits.mean)) / np.asarray(splits.std)
    trained = _trained_encoder(saved_run)
    np.testing.assert_allclose(encode(images), trained(normalised), rtol=1e-5, atol=1e-5)
    floats = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(encode(floats), trained(floats), rtol=1e-5, atol=1e-5)
    assert encode(floats).shape == (2, 32)
    np.testing.assert_array_equal(spcl_jax.load_encoder(directory, step=7)(floats), encode(floats))
    with pytest.raises(CheckpointError, match="step 5 is not saved in .*; saved steps: \\[7\\]"):
        spcl_jax.load_encoder(directory, step=5)
    with pytest.raises(UserError, match="step=-1; valid: None"):
        spcl_jax.load_encoder(directory, step=-1)
    manager = checkpoint.open_manager(str(tmp_path / "no_config"))  # a checkpoint not written by a run
    manager.save(1, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardSave({"step": np.int32(1)})))
    manager.close()
    with pytest.raises(CheckpointError, match="^checkpoint step 1 in .*no_config has no readable config \\(.*\\); pass the "
                                              "<workdir>/checkpoints of a spcl_jax pretraining run$"):
        spcl_jax.load_encoder(tmp_path / "no_config")


def test_torchvision_encoder_equals_our_encoder(saved_run, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    (tmp_path / "cifar").mkdir()
    description, _ = export.export(str(saved_run[0]), str(tmp_path / "cifar" / "encoder.npz"))
    model = export.torchvision_encoder(tmp_path / "cifar")  # the directory: its one .npz
    assert not model.training and isinstance(model.fc, torch.nn.Identity) and isinstance(model.maxpool, torch.nn.Identity)
    images = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(theirs, _trained_encoder(saved_run)(images), rtol=1e-4, atol=1e-4)
    assert description["stage_widths"] == [4, 8, 16, 32]

    # A Bottleneck ResNet-50 with the ImageNet stem at 1/16 width, written as the exporter writes it.
    encoder = nnx.eval_shape(lambda: ResNet(50, stem="imagenet", width_multiplier=0.0625, rngs=nnx.Rngs(0)))
    graphdef, params, batch_stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(5)
    params, batch_stats = _random_fill(params, rng), _random_fill(batch_stats, rng)
    pure = nnx.to_pure_dict(params)
    np.savez(tmp_path / "r50.npz", **export.torchvision_state_dict(pure, nnx.to_pure_dict(batch_stats), 3))
    (tmp_path / "r50.json").write_text(json.dumps(export.describe(pure)))
    model = export.torchvision_encoder(str(tmp_path / "r50.npz"))
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ours, _ = _our_features(graphdef, params, batch_stats, images)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_torchvision_encoder_without_torch_or_with_a_bad_path_says_so_in_one_line(tmp_path, monkeypatch):
    def message(path):
        with pytest.raises(UserError) as error:
            export.torchvision_encoder(path)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "holds 0 .npz files (none)" in message(tmp_path)
    (tmp_path / "a.npz").write_bytes(b"")
    assert "encoder.json" not in message(tmp_path) and "a.json is missing" in message(tmp_path)
    (tmp_path / "b.npz").write_bytes(b"")
    assert "holds 2 .npz files (a.npz, b.npz)" in message(tmp_path)
    assert "is not an exported .npz" in message(tmp_path / "nope.npz")
    (tmp_path / "a.json").write_text("{}")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert message(tmp_path / "a.npz") == ("torchvision_encoder needs PyTorch and torchvision (torch is not "
                                           "installed): pip install torch torchvision")
