"""opera-jax: finetune dense retrievers in JAX/Flax, with OPERA data pruning.

The public Python API (loaded on first use, so ``import opera_jax`` stays light):

- ``DenseRetriever(model)``: ``encode_queries``, ``encode_passages``, ``search``, ``save``;
- ``finetune(data, config=..., out=..., **overrides)`` -> ``FinetuneResult(run_dir, model_dir, metrics)``;
- ``load_config``, ``Config``; ``TrainData`` (already-loaded splits); ``push_to_hub``; ``InputError``.
"""

__version__ = "0.1.0"

_API = {
    "DenseRetriever": "opera_jax.retriever",
    "finetune": "opera_jax.finetuning",
    "FinetuneResult": "opera_jax.finetuning",
    "Config": "opera_jax.config",
    "load_config": "opera_jax.config",
    "TrainData": "opera_jax.data.tables",
    "push_to_hub": "opera_jax.models.publish",
    "InputError": "opera_jax.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'opera_jax' has no attribute {name!r}")
