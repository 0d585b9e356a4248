"""Upload an exported model directory to the Hugging Face hub (``opera-jax export RUN --push-to-hub NAME``).

One commit with every file of the directory, through ``huggingface_hub``; the
model card's usage examples are rewritten to load the model by its hub id.
Offline (``HF_HUB_OFFLINE=1``) or unreachable, it stops with one clear error
and leaves the local export as it is.
"""

from __future__ import annotations

from pathlib import Path

from opera_jax.errors import InputError

REPO_ID = r"[\w.-]+/[\w.-]+"


def commit_operations(model_dir: Path, repo_id: str) -> list:
    """The files to upload, as ``CommitOperationAdd``; README.md with the usage examples naming ``repo_id``."""
    import json
    import re

    from huggingface_hub import CommitOperationAdd

    from opera_jax.models.model_card import card_title

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "README.md").is_file():
        raise InputError(f"{model_dir}: not an exported model (needs config.json and README.md)")
    if not re.fullmatch(REPO_ID, repo_id):
        raise InputError(f"--push-to-hub {repo_id!r}: expected a hub repository id, owner/name")
    ops = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        content: Path | bytes = path
        if rel == "README.md":
            text = path.read_text(encoding="utf-8").replace(json.dumps(str(model_dir.resolve())), json.dumps(repo_id))
            content = text.replace(f"\n# {card_title(model_dir)}\n", f"\n# {repo_id}\n", 1).encode("utf-8")
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    return ops


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``model_dir`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    ops = commit_operations(Path(model_dir), repo_id)
    if constants.HF_HUB_OFFLINE:
        raise InputError(
            f"--push-to-hub {repo_id}: the Hugging Face hub is off (HF_HUB_OFFLINE is set); "
            f"the model is exported in {model_dir}: push it from a connected machine"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message="Upload model exported by opera-jax")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(
            f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {e}); the model is exported in {model_dir}"
        ) from None
    except Exception as e:  # the HTTP client's own connection errors (httpx / requests)
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):  # httpx2 too
            raise InputError(
                f"--push-to-hub {repo_id}: the hub cannot be reached ({e}); the model is exported in {model_dir}"
            ) from None
        raise
    return str(getattr(info, "commit_url", info))
