"""Export a checkpoint's encoder as a torchvision ResNet `state_dict` in a numpy .npz, for PyTorch users.

    python -m spcl_jax.export --checkpoint <workdir>/checkpoints --out encoder.npz [--step N]

Names and layouts are torchvision's: `conv1.weight` (O, I, kh, kw) from our (kh, kw, I, O) kernels,
`bn1.weight/bias/running_mean/running_var/num_batches_tracked`, `layer1.0.conv1.weight`,
`layer1.0.downsample.0.weight`, `layer1.0.downsample.1.*`, ...; no `fc`. `encoder.json` beside the npz
describes the architecture (block, blocks per stage, stem, stem and stage widths) and the mean and std
that input images are normalised with; `torchvision_encoder(path)` builds that ResNet (a CIFAR stem:
3x3 stride-1 conv1 and no max-pool; the stage widths of any `width_multiplier`) and loads the weights.
The running variance was averaged from biased batch variances (flax's convention; torch averages
unbiased ones), which changes nothing in eval mode. `num_batches_tracked` holds the checkpoint's training step.
Bad input stops with one line `export: error: ...` and exit status 2; the output appears atomically.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from spcl_jax import checkpoint, runtime, storage
from spcl_jax.data import datasets
from spcl_jax.errors import CheckpointError, UserError
from spcl_jax.models.resnet import ARCHITECTURES
from spcl_jax.storage import write_atomic

if TYPE_CHECKING:
    from torchvision.models import ResNet

# Our module name -> torchvision's, in torchvision's registration (= state_dict) order.
_BLOCK_MODULES = (("conv1", "conv1"), ("bn1", "bn1"), ("conv2", "conv2"), ("bn2", "bn2"), ("conv3", "conv3"),
                  ("bn3", "bn3"), ("downsample_conv", "downsample.0"), ("downsample_bn", "downsample.1"))
_STEMS = {3: "cifar", 7: "imagenet"}


def _array(node):
    """A leaf of a target-less orbax restore (nnx Variables come back as {'value': array})."""
    return np.asarray(node["value"] if isinstance(node, dict) else node)


def _stages(encoder):
    """[[block dicts of layer1], ..., [of layer4]] in block order."""
    return [[encoder[f"layer{s}"][i] for i in sorted(encoder[f"layer{s}"], key=int)] for s in range(1, 5)]


def _module(name, params, stats, step):
    """torchvision tensors of one conv (kernel) or BatchNorm (scale, bias + running statistics)."""
    if "kernel" in params:
        return {f"{name}.weight": np.transpose(_array(params["kernel"]), (3, 2, 0, 1))}
    return {f"{name}.weight": _array(params["scale"]), f"{name}.bias": _array(params["bias"]),
            f"{name}.running_mean": _array(stats["mean"]), f"{name}.running_var": _array(stats["var"]),
            f"{name}.num_batches_tracked": np.asarray(step, np.int64)}


def torchvision_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                           step: int) -> dict[str, np.ndarray]:
    """{torchvision name: numpy array} of the encoder in nested-dict `params`/`batch_stats` (the
    `encoder` subtrees of a restored checkpoint), in torchvision's state_dict order."""
    out = {}
    out.update(_module("conv1", params["stem_conv"], None, step))
    out.update(_module("bn1", params["stem_bn"], batch_stats["stem_bn"], step))
    for s, (blocks, stat_blocks) in enumerate(zip(_stages(params), _stages(batch_stats)), start=1):
        for i, (block, block_stats) in enumerate(zip(blocks, stat_blocks)):
            for ours, theirs in _BLOCK_MODULES:
                if ours in block:
                    out.update(_module(f"layer{s}.{i}.{theirs}", block[ours], block_stats.get(ours), step))
    return out


def describe(params: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture of encoder `params` read off the weights: model, stem and stage widths."""
    stages = _stages(params)
    kind = "bottleneck" if "conv3" in stages[0][0] else "basic"
    blocks = tuple(len(stage) for stage in stages)
    model = next((f"resnet{d}" for d, arch in ARCHITECTURES.items() if arch == (kind, blocks)), None)
    kernel = _array(params["stem_conv"]["kernel"])
    return {"format": "torchvision ResNet state_dict without fc (numpy .npz)", "model": model, "block": kind,
            "blocks_per_stage": list(blocks), "stem": _STEMS[kernel.shape[0]], "stem_width": int(kernel.shape[3]),
            "stage_widths": [int(_array(stage[0]["conv1"]["kernel"]).shape[3]) for stage in stages],
            "features_dim": int(_array(stages[-1][-1]["bn3" if kind == "bottleneck" else "bn2"]["scale"]).shape[0])}


def _check_out(out):
    folder = storage.parent(out)
    if not out.endswith(".npz"):
        raise UserError(f"--out {out!r} must end in .npz")
    if storage.isdir(out):
        raise UserError(f"--out {out!r} is a directory; valid: a file path ending in .npz")
    if storage.is_url(out):  # objects need no folder, and permissions show at the upload
        return
    if not os.path.isdir(folder):
        raise UserError(f"--out {out!r}: directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {out!r}: directory {folder} is not writable")


def export(directory: str, out: str, step: int = -1) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Writes the encoder of checkpoint `step` (-1 = newest) in `directory` to `out` (.npz) and its
    description (architecture, the normalisation of its inputs, step) to the .json beside it; returns
    (description, {name: array})."""
    if step < -1:
        raise UserError(f"--step {step}; valid: -1 (newest) or a saved step >= 0")
    _check_out(out)
    raw, step = checkpoint.restore_network(directory, step)
    try:
        params, stats = raw["params"]["encoder"], raw["batch_stats"]["encoder"]
        arrays = torchvision_state_dict(params, stats, step)
        description = describe(params)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint step {step} in {directory} has no ResNet encoder ({e!r} missing); "
                              "pass the <workdir>/checkpoints of a spcl_jax pretraining run") from e
    saved = checkpoint.restore_config(directory, step)[0]
    mean, std = datasets.normalisation(saved["dataset"], saved["image_size"])
    description.update(mean=list(mean), std=list(std), checkpoint=storage.absolute(directory), step=int(step))
    try:
        write_atomic(out, lambda f: np.savez(f, **arrays))
        write_atomic(out[:-len(".npz")] + ".json",
                      lambda f: f.write(json.dumps(description, indent=2).encode() + b"\n"))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
    return description, arrays


def _exported_files(path):
    """(npz, json) paths of the export at `path`: the .npz itself or the directory holding exactly one."""
    path = os.fspath(path)
    if storage.isdir(path):
        found = sorted(name for name in storage.listdir(path) if name.endswith(".npz"))
        if len(found) != 1:
            raise UserError(f"{path} holds {len(found)} .npz files ({', '.join(found) or 'none'}); "
                            "valid: a directory with one encoder written by python -m spcl_jax.export, or its .npz")
        path = storage.join(path, found[0])
    if not path.endswith(".npz") or not storage.isfile(path):
        raise UserError(f"{path} is not an exported .npz; valid: the --out file of python -m spcl_jax.export "
                        "or the directory holding it")
    description = path[:-len(".npz")] + ".json"
    if not storage.isfile(description):
        raise UserError(f"{description} is missing; python -m spcl_jax.export writes it beside {path}")
    return path, description


def torchvision_encoder(path: str | os.PathLike) -> ResNet:
    """The encoder exported to `path` (.npz, or the directory holding it) as a torchvision ResNet in eval
    mode whose forward pass returns the pooled features (fc = Identity), built from the .json beside it.

    torchvision's constructors fix the stem (7x7, max-pool) and the stage widths (64-512), so the stem and
    the stages are made anew in the .json's shapes, the stages with torchvision's own `_make_layer`.
    The model takes NCHW float images in [0, 1] normalised with the .json's `mean` and `std`.
    """
    npz, description = _exported_files(path)
    try:
        import torch
        from torchvision.models import resnet
    except ImportError as e:
        raise UserError(f"torchvision_encoder needs PyTorch and torchvision ({e.name} is not installed): "
                        "pip install torch torchvision") from None
    meta = json.loads(storage.read_text(description))
    block = {"basic": resnet.BasicBlock, "bottleneck": resnet.Bottleneck}[meta["block"]]
    model = resnet.ResNet(block, meta["blocks_per_stage"])
    width = meta["stem_width"]
    if meta["stem"] == "cifar":
        model.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    else:
        model.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(width)
    model.inplanes = width
    for stage, (planes, blocks) in enumerate(zip(meta["stage_widths"], meta["blocks_per_stage"]), start=1):
        setattr(model, f"layer{stage}", model._make_layer(block, planes, blocks, stride=1 if stage == 1 else 2))
    model.fc = torch.nn.Identity()
    with np.load(io.BytesIO(storage.read_bytes(npz))) as arrays:
        model.load_state_dict({name: torch.from_numpy(array) for name, array in arrays.items()})
    return model.eval()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"export: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m spcl_jax.export",
                     description="Write a checkpoint's encoder with torchvision ResNet names and layouts.")
    parser.add_argument("--checkpoint", required=True, help="the <workdir>/checkpoints directory of a run")
    parser.add_argument("--out", required=True, help="output .npz (a .json description is written beside it)")
    parser.add_argument("--step", type=int, default=-1, help="checkpoint step to export (-1 = newest)")
    args = parser.parse_args(argv)
    runtime.configure()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on opening a checkpoint read-only
    try:
        description, arrays = export(args.checkpoint, args.out, args.step)
    except UserError as e:
        parser.error(str(e))
    print(f"export: wrote {len(arrays)} tensors of {description['model']} ({description['stem']} stem, stage widths "
          f"{description['stage_widths']}) from step {description['step']} to {args.out}")


if __name__ == "__main__":
    main()
