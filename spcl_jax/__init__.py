"""spcl_jax: Siamese Prototypical Contrastive Learning (BMVC 2021) in JAX/Flax NNX."""
import os

from jaxlib import version as _jaxlib_version

# XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK by default. On the AVX2 CPU this project is developed on,
# YNNPACK's convolutions ran 1.4-11x slower than XLA's own (Eigen) ones forward and backward, and the full-width
# ResNet-18 SPCL step 1.9-2.5x slower (BENCHMARKS.md, "The CPU convolution gap"); at narrow widths they tie. So
# convolutions (only) leave YNNPACK's list, unless XLA_FLAGS already chooses. XLA reads the flag when JAX starts its
# CPU backend, i.e. before the first computation; accelerators ignore it. XLA stops the process on a flag it does
# not know, hence the version check: the flag is experimental.
_YNN_TYPES = "--xla_cpu_experimental_ynn_fusion_type"
if _jaxlib_version.__version__.startswith("0.10.") and _YNN_TYPES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_TYPES}=-individual_convolution".strip()

__all__ = ["load_encoder"]


def __getattr__(name):
    """`load_encoder` is imported on first use, so that `import spcl_jax` does not start JAX."""
    if name == "load_encoder":
        from spcl_jax.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
