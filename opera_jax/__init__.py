"""opera-jax: finetune dense retrievers in JAX/Flax, with OPERA data pruning."""

__version__ = "0.1.0"
