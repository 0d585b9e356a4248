"""A run directory, bound to the config it was started with.

``config.yaml`` is written once, atomically, when a run starts. Running again with the same
config resumes from the latest checkpoint, or, once the run has finished (its ``model/`` is
exported, which happens last and atomically), does nothing. A different config (any field,
``optim.max_steps`` included) is refused with the differing fields listed, unless a new run is
asked for (``new_run``, the CLI's ``--new-run``): then the old run's files are removed and the
run starts from step 0. A non-empty directory without ``config.yaml`` is not a run: refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from opera_jax.config import Config, config_to_dict, dump_config, load_config
from opera_jax.errors import InputError
from opera_jax.preflight import check_output_dir

CONFIG_FILE = "config.yaml"
# What a run writes into its directory; a new run in the same directory removes exactly these.
RUN_FILES = (CONFIG_FILE, "checkpoints", "tb", "metrics.jsonl", "train_log.jsonl", "run.trec", "model")

NEW, RESUME, FINISHED, REPLACE = "new", "resume", "finished", "replace"


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``'key: old -> new'`` for every leaf that differs between two nested config dicts."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def inspect(workdir: str | Path, config: Config, *, new_run: bool = False) -> str:
    """What running ``config`` in ``workdir`` means: ``new``, ``resume``, ``finished`` or
    ``replace`` (``new_run`` over an existing run). Reads only; raises InputError when the
    directory cannot be written, is not a run, or holds a run of a different config."""
    workdir = Path(workdir)
    check_output_dir(workdir, "run directory")
    if not workdir.exists() or not any(workdir.iterdir()):
        return NEW
    config_file = workdir / CONFIG_FILE
    if not config_file.is_file():
        raise InputError(f"{workdir}: not empty and not a run directory (no {CONFIG_FILE}); pick another --out")
    if new_run:
        return REPLACE
    differences = config_differences(config_to_dict(load_config(config_file)), config_to_dict(config))
    if differences:
        raise InputError(
            f"{workdir} holds a run of a different config ({'; '.join(differences)}): "
            "run the same config to resume it, pass --new-run to discard it and start over, "
            "or pick another --out"
        )
    return FINISHED if (workdir / "model").is_dir() else RESUME


def start(workdir: str | Path, config: Config, status: str) -> None:
    """Make the run directory ready (process 0 only): a replaced run's files removed, then
    ``config.yaml`` written, once; a resumed run is left as it is."""
    workdir = Path(workdir)
    if status == REPLACE:
        for name in RUN_FILES:
            path = workdir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    if status != RESUME:
        dump_config(config, workdir / CONFIG_FILE)


def last_metrics(workdir: str | Path) -> dict[str, Any]:
    """The last row of the run's ``metrics.jsonl`` ({} when there is none)."""
    path = Path(workdir) / "metrics.jsonl"
    rows = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    rows = [r for r in rows if r.strip()]
    return json.loads(rows[-1]) if rows else {}
