"""spcl_jax: Siamese Prototypical Contrastive Learning (BMVC 2021) in JAX/Flax NNX."""
from spcl_jax import storage as _storage

__all__ = ["load_encoder"]
_storage.use_emulator_if_set()  # before orbax, tensorstore or gcsfs read their variables


def __getattr__(name):
    """`load_encoder` is imported on first use, so that `import spcl_jax` does not start JAX."""
    if name == "load_encoder":
        from spcl_jax.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
