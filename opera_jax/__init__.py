"""opera-jax: finetune dense retrievers in JAX/Flax, with OPERA data pruning."""

__version__ = "0.1.0"

from opera_jax.host_memory import keep_scratch_mapped as _keep_scratch_mapped

_keep_scratch_mapped()  # only with OPERA_JAX_KEEP_SCRATCH=1; before XLA's threads allocate (host_memory.py)
