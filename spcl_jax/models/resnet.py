"""ResNet encoders (torchvision v1.5) in NHWC, matching the original at initialisation and in shape (DIFFERENCES.md, model and D-15).

PyTorch pads strided convolutions and the stem max-pool symmetrically, so every padding here is explicit
(Flax's 'SAME' pads (0, 1) for stride 2). Parameters and BatchNorm statistics are float32 whatever the compute
dtype; the pooled features are returned in float32 so that the losses never run in bfloat16.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from spcl_jax.models.batch_norm import BatchNorm

# (block kind, blocks per stage) for each supported depth.
ARCHITECTURES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
STEMS = ("cifar", "imagenet")
_STEM_STRIDES = {"cifar": 1, "imagenet": 4}  # imagenet: a stride-2 convolution, then a stride-2 max pool
STEM_CHOICES = ("auto",) + STEMS
REMAT = ("none", "block")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# kaiming_normal_(mode='fan_out', nonlinearity='relu'). JAX's "normal" is untruncated (jax 0.10.2 rejects
# "untruncated_normal"; "truncated_normal" is the truncated one).
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, *, dtype: DTypeLike,
         rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free square convolution with PyTorch's symmetric padding of (k - 1) // 2."""
    pad = (kernel_size - 1) // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=dtype,
        rngs=rngs,
    )


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0), written as a select so that XLA materialises it once.

    XLA:CPU recomputes a `maximum` (and the BatchNorm and residual additions before it) inside each layout
    transpose that the weight gradient of the next convolution needs, and a fused transpose runs about 10x
    slower than a plain one; a select of two full-size operands is not duplicated (BENCHMARKS.md, the CPU
    step). Same values as `jax.nn.relu` (NaN stays NaN) and the same gradient (0 at 0).
    """
    return jnp.where(x <= 0, 0, x)


def stem_max_pool(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride=2, padding=1): symmetric padding with -inf."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def scaled_width(channels: int, width_multiplier: float) -> int:
    """Channel count under a width multiplier, never below one channel."""
    return max(1, round(channels * width_multiplier))


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with an identity or 1x1-projection shortcut (ResNet-18/34)."""

    def __init__(self, in_channels: int, planes: int, stride: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.conv1 = conv(in_channels, planes, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype)
        self.downsample_conv, self.downsample_bn = _shortcut(in_channels, planes, stride, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return relu(y + _apply_shortcut(self, x))


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

    def __init__(self, in_channels: int, planes: int, stride: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        out_channels = planes * _EXPANSION["bottleneck"]
        self.conv1 = conv(in_channels, planes, 1, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype)
        self.conv3 = conv(planes, out_channels, 1, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out_channels, dtype=dtype)
        self.downsample_conv, self.downsample_bn = _shortcut(in_channels, out_channels, stride, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = relu(self.bn1(self.conv1(x)))
        y = relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return relu(y + _apply_shortcut(self, x))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _rematerialised_block(block, x):
    """block(x), its activations recomputed in the backward pass instead of kept (memory for time). Written
    with jax.checkpoint on the block's state, so it also works when the network was merged inside a JAX
    transformation (the train step's grad), where nnx.remat cannot update the BatchNorm statistics."""
    graphdef, state = nnx.split(block)

    def run(values: dict[str, Any], x: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        inner = nnx.merge(graphdef, state, copy=True)
        nnx.update(inner, values)
        return inner(x), nnx.to_pure_dict(nnx.state(inner))

    values, x = gradients_released_together(nnx.to_pure_dict(state), x)
    y, values = jax.checkpoint(run)(values, x)
    nnx.update(block, values)
    return y


@jax.custom_vjp
def gradients_released_together(*args: Any) -> tuple[Any, ...]:
    """The identity; in the backward pass its arguments' cotangents leave together, behind one optimisation barrier.

    Before a rematerialised block it ties the block's weight gradients to its input's: the backward pass moves on
    to the block before only once this block's weight-gradient convolutions have run, so its recomputed activations
    die at once. Without it XLA, compiling for several GPUs, put every weight-gradient convolution at the end of
    the step, after the whole backward pass, keeping every recomputed activation alive, and remat saved nothing:
    a ResNet-18 step (32 px, width 1/4, 64 images per GPU) on 2 H100s held 44.0 MiB of temporaries plain, 40.7
    with jax.checkpoint alone, 21.4 with this; ResNet-50 of configs/imagenet.py on 8 H100s 10.59 GiB plain, 4.68 and
    3.75; on a TPU v5e 2x2 5.35, 2.76 and 2.68 GiB (XLA's memory analysis; BENCHMARKS.md, planning).
    """
    return args


def _released_together_forward(*args):
    return args, None


def _released_together_backward(_, cotangents):
    return jax.lax.optimization_barrier(cotangents)


gradients_released_together.defvjp(_released_together_forward, _released_together_backward)


def _shortcut(in_channels, out_channels, stride, dtype, rngs):
    """(conv, bn) of the projection shortcut, or (None, None) when the identity fits."""
    if stride == 1 and in_channels == out_channels:
        return None, None
    return (
        conv(in_channels, out_channels, 1, stride, dtype=dtype, rngs=rngs),
        BatchNorm(out_channels, dtype=dtype),
    )


def _apply_shortcut(block, x):
    if block.downsample_conv is None:
        return x
    return block.downsample_bn(block.downsample_conv(x))


class ResNet(nnx.Module):
    """ResNet encoder without the fc layer: NHWC images -> (B, features_dim) float32 pooled features.

    `stem='cifar'` is the 3x3 stride-1 stem without max-pool (32-64 px images), `stem='imagenet'` the 7x7
    stride-2 stem with a 3x3 stride-2 max-pool. BatchNorm uses batch statistics after `model.train()` and the
    running averages after `model.eval()`. `remat="block"` recomputes each residual block's activations
    in the backward pass instead of keeping them (same results, less memory, about a third more compute).
    """

    def __init__(self, depth: int, *, stem: str, width_multiplier: float = 1.0, dtype: DTypeLike = jnp.float32,
                 remat: str = "none", rngs: nnx.Rngs):
        if depth not in ARCHITECTURES:
            raise ValueError(f"ResNet depth {depth} not in {sorted(ARCHITECTURES)}")
        if stem not in STEMS:
            raise ValueError(f"stem {stem!r} not in {STEMS}")
        if remat not in REMAT:
            raise ValueError(f"remat {remat!r} not in {REMAT}")
        self.remat = remat
        kind, stage_blocks = ARCHITECTURES[depth]
        self.stem = stem
        self.dtype = dtype
        width = scaled_width(_STAGE_PLANES[0], width_multiplier)
        if stem == "cifar":
            self.stem_conv = conv(3, width, 3, 1, dtype=dtype, rngs=rngs)
        else:
            self.stem_conv = conv(3, width, 7, 2, dtype=dtype, rngs=rngs)
        self.stem_bn = BatchNorm(width, dtype=dtype)

        in_channels = width
        stages = []
        for planes, blocks, stride in zip(_STAGE_PLANES, stage_blocks, _STAGE_STRIDES):
            planes = scaled_width(planes, width_multiplier)
            stage = []
            for index in range(blocks):
                stage.append(_BLOCKS[kind](in_channels, planes, stride if index == 0 else 1, dtype=dtype, rngs=rngs))
                in_channels = planes * _EXPANSION[kind]
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.features_dim = in_channels

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The layer4 output before pooling, (B, H/s, W/s, features_dim) in the compute dtype."""
        x = relu(self.stem_bn(self.stem_conv(x.astype(self.dtype))))
        if self.stem == "imagenet":
            x = stem_max_pool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = _rematerialised_block(block, x) if self.remat == "block" else block(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(self.feature_map(x).astype(jnp.float32), axis=(1, 2))


MODELS = tuple(f"resnet{depth}" for depth in ARCHITECTURES)


def _depth(model_name):
    depth = model_name.removeprefix("resnet")
    if not model_name.startswith("resnet") or not depth.isdigit() or int(depth) not in ARCHITECTURES:
        valid = ", ".join(f"resnet{d}" for d in ARCHITECTURES)
        raise ValueError(f"model {model_name!r} is not supported; valid: {valid}")
    return int(depth)


def feature_dim(model_name: str, width_multiplier: float = 1.0) -> int:
    """Encoder output width D: 512*w for resnet18/34, 2048*w for resnet50/101/152 (w rounded per stage)."""
    kind, _ = ARCHITECTURES[_depth(model_name)]
    return scaled_width(_STAGE_PLANES[-1], width_multiplier) * _EXPANSION[kind]


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' picks the CIFAR stem for images of at most 64 px, the ImageNet stem above."""
    if stem == "auto":
        return "cifar" if image_size <= 64 else "imagenet"
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r} is not supported; valid: {', '.join(STEM_CHOICES)}")
    return stem


def total_stride(stem: str, image_size: int) -> int:
    """Input pixels per side of one pixel of the last feature map: images smaller than this reach the last
    stages as padding."""
    return _STEM_STRIDES[resolve_stem(stem, image_size)] * math.prod(_STAGE_STRIDES)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The network's shape and numerics (config keys model, stem, image_size, width_multiplier, dtype, remat,
    proj_dim): what building, restoring and exporting an encoder need."""

    model: str
    stem: str
    image_size: int
    width_multiplier: float
    dtype: str
    remat: str
    proj_dim: int

    @property
    def features_dim(self) -> int:
        """The encoder's output width D."""
        return feature_dim(self.model, self.width_multiplier)


def build_encoder(architecture: Architecture, *, rngs: nnx.Rngs) -> ResNet:
    """The ResNet of `architecture` (its projection head is built by `spcl_jax.network`)."""
    a = architecture
    if a.dtype not in DTYPES:
        raise ValueError(f"dtype {a.dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    if a.width_multiplier <= 0:
        raise ValueError(f"width_multiplier {a.width_multiplier} must be positive")
    return ResNet(
        _depth(a.model),
        stem=resolve_stem(a.stem, a.image_size),
        width_multiplier=a.width_multiplier,
        dtype=DTYPES[a.dtype],
        remat=a.remat,
        rngs=rngs,
    )
