"""spcl_jax: Siamese Prototypical Contrastive Learning (BMVC 2021) in JAX/Flax NNX."""
__all__ = ["load_encoder"]


def __getattr__(name):
    """`load_encoder` is imported on first use, so that `import spcl_jax` does not start JAX."""
    if name == "load_encoder":
        from spcl_jax.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
