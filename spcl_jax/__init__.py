"""spcl_jax: Siamese Prototypical Contrastive Learning (BMVC 2021) in JAX/Flax NNX."""
