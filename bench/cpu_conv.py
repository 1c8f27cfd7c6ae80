"""CPU convolutions of a CIFAR ResNet-18: XLA's two kernels and im2col + dot against PyTorch's, fwd and fwd+bwd.

    python -m bench.cpu_conv                        # the distinct 3x3 convolutions at 32 px, batch 32
    python -m bench.cpu_conv --batch 8 --shapes 16x128x128x1

Why spcl_jax.runtime.configure() takes convolutions off YNNPACK: each 3x3 convolution (NHWC, pad 1) runs as
"ynnpack" (jaxlib 0.10's default on CPU), "xla" (XLA's own Eigen kernel, what spcl_jax sets), "im2col"
(9 shifted slices concatenated, one matmul, on YNNPACK like every matmul) and, when torch is importable,
PyTorch's (oneDNN, NCHW, its default threads). fwd+bwd = the output and both gradients. float32.
Each cell: median (min–max) ms of --repeats rounds (default 5) in which the variants take turns, after one
untimed warm-up call each (bench/common.py `interleaved`), so that load from other jobs hits them alike. The
ratio columns "A / xla" are A's median time over XLA's (>1 = XLA's kernel faster) with the range of the
per-round ratios.
"""
import argparse
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

# (size, in channels, out channels, stride) of the 3x3 convolutions of ResNet-18's CIFAR stages, 32 px input.
SHAPES = "32x64x64x1,16x128x128x1,8x256x256x1,4x512x512x1,32x64x128x2"
KERNELS = {"ynnpack": common.YNNPACK_DEFAULT, "xla": common.YNNPACK_WITHOUT_CONVOLUTIONS}
VARIANTS = ("ynnpack", "xla", "im2col", "torch")
RATIOS = [(other, kind) for other in ("ynnpack", "torch") for kind in ("fwd", "fwd+bwd")]  # time ratios over xla


def lax_conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col_conv(x, w, stride):
    """The same convolution as one matmul over the 9 shifted (strided) slices of the padded input."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = (x.shape[1] - 1) // stride + 1
    span = stride * (out - 1) + 1
    cols = jnp.concatenate([padded[:, i:i + span:stride, j:j + span:stride] for i in range(3) for j in range(3)], -1)
    return cols @ w.reshape(-1, w.shape[-1])


def jax_pair(conv, options, x, w, stride):
    """(forward, forward+backward) compiled with XLA compiler options, each run to completion."""
    forward = jax.jit(lambda x, w: conv(x, w, stride)).lower(x, w).compile(compiler_options=options)

    def with_grads(x, w):
        y, pullback = jax.vjp(lambda x, w: conv(x, w, stride), x, w)
        return (y,) + pullback(jnp.ones_like(y))

    both = jax.jit(with_grads).lower(x, w).compile(compiler_options=options)
    return lambda: jax.block_until_ready(forward(x, w)), lambda: jax.block_until_ready(both(x, w))


def torch_pair(x, w, stride):
    import torch

    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    wt = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy(), requires_grad=True)

    def forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)

    def both():
        y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)
        torch.autograd.grad(y, (xt, wt), torch.ones_like(y))

    return forward, both


def measure(batch, size, cin, cout, stride, reps, use_torch):
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, size, size, cin), np.float32))
    w = jax.device_put(rng.standard_normal((3, 3, cin, cout), np.float32) * np.float32((2 / (9 * cin)) ** 0.5))
    pairs = {name: jax_pair(lax_conv, options, x, w, stride) for name, options in KERNELS.items()}
    pairs["im2col"] = jax_pair(im2col_conv, common.YNNPACK_WITHOUT_CONVOLUTIONS, x, w, stride)
    if use_torch:
        pairs["torch"] = torch_pair(x, w, stride)
    steps = {f"{name} {kind}": fn for name, pair in pairs.items() for kind, fn in zip(("fwd", "fwd+bwd"), pair)}
    seconds = common.interleaved(steps, reps)
    gflop = 2 * batch * ((size - 1) // stride + 1) ** 2 * cin * cout * 9 / 1e9
    row = dict(shape=f"{size}x{size}x{cin}->{cout} /{stride}", gflop=gflop)
    row.update({f"{name}_ms": common.spread(s, 1e3, "{:.3g}") for name, s in seconds.items()})
    for other, kind in RATIOS:
        if f"{other} {kind}" in seconds:
            row[f"{other}/xla {kind}"] = common.ratio_cell(seconds[f"{other} {kind}"], seconds[f"xla {kind}"])
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=common.positive(int), default=32)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated SIZExCINxCOUTxSTRIDE (default %(default)s)")
    parser.add_argument("--repeats", "--reps", dest="reps", type=common.positive(int), default=5,
                        help="timed rounds, the variants taking turns (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes: expected comma-separated SIZExCINxCOUTxSTRIDE, positive integers; got {args.shapes!r}")
    use_torch = importlib.util.find_spec("torch") is not None
    print(common.machine_note(), flush=True)
    rows = [measure(args.batch, *shape, args.reps, use_torch) for shape in shapes]
    columns = [("shape", "H x W x C_in -> C_out /stride", "{}"), ("gflop", "GFLOP fwd", "{:.2f}")] + [
        (f"{name} {kind}_ms", f"{name} {kind} ms", "{}")
        for name in VARIANTS if use_torch or name != "torch" for kind in ("fwd", "fwd+bwd")] + [
        (f"{other}/xla {kind}", f"{other} / xla {kind}", "{}")
        for other, kind in RATIOS if use_torch or other != "torch"]
    if use_torch:
        import torch

        other = f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"
    else:
        other = "torch not importable (pip install -r bench/requirements.txt): no PyTorch columns"
    print(f"jax {jax.__version__}, float32, NHWC, batch {args.batch}, {common.SPREAD} ms of {args.reps} interleaved "
          f"rounds; {common.load_note()}; {other}")
    print(common.markdown(rows, columns))
    print(common.load_after())


if __name__ == "__main__":
    main()
