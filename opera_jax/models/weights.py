"""Hugging Face safetensors <-> NNX parameters, through a declarative name table.

A model's params module (``bert_params.py``, ``qwen3_params.py``) declares a table of ``(hf_name, our_path, transpose)``
rows, where ``{i}`` stands for a layer number. ``NameMap`` compiles it to
regular expressions and maps in both directions: loading (HF -> ours) and
export (ours -> HF). Loading is strict: a checkpoint tensor that maps to
nothing (and is not declared ignorable), a parameter the checkpoint lacks, or a
shape mismatch is an ``InputError`` naming the tensor and the file.

safetensors only: no pickle, no remote code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from opera_jax.errors import InputError

Path_ = tuple[str | int, ...]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class NameMap:
    """A bidirectional HF-name <-> parameter-path mapping built from a table."""

    def __init__(
        self,
        table: Iterable[tuple[str, str, bool]],
        *,
        strip_prefixes: tuple[str, ...] = (),
        ignore: tuple[str, ...] = (),
        aliases: dict[str, str] | None = None,
    ):
        self._rows = []
        for hf, ours, transpose in table:
            hf_re = re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
            ours_re = re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
            self._rows.append((hf, hf_re, ours, ours_re, transpose))
        self.strip_prefixes = strip_prefixes
        self.ignore = tuple(re.compile(p) for p in ignore)
        self.aliases = aliases or {}

    def canonical(self, hf_name: str) -> str:
        """Strip an architecture prefix (``bert.``) and apply legacy aliases (``gamma`` -> ``weight``)."""
        for prefix in self.strip_prefixes:
            if hf_name.startswith(prefix):
                hf_name = hf_name[len(prefix) :]
                break
        for old, new in self.aliases.items():
            if hf_name.endswith(old):
                hf_name = hf_name[: -len(old)] + new
        return hf_name

    def is_ignored(self, hf_name: str) -> bool:
        return any(p.search(self.canonical(hf_name)) for p in self.ignore)

    def to_ours(self, hf_name: str) -> tuple[Path_, bool] | None:
        name = self.canonical(hf_name)
        for _, hf_re, ours, _, transpose in self._rows:
            m = hf_re.match(name)
            if m:
                return _parse_path(ours.replace("{i}", m.groupdict().get("i") or "")), transpose
        return None

    def to_hf(self, path: Path_) -> tuple[str, bool]:
        dotted = ".".join(str(p) for p in path)
        for hf, _, _, ours_re, transpose in self._rows:
            m = ours_re.match(dotted)
            if m:
                return hf.replace("{i}", m.groupdict().get("i") or ""), transpose
        raise KeyError(f"parameter {dotted} has no Hugging Face name")


def _parse_path(dotted: str) -> Path_:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or the shards an index names."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise InputError(f"{index}: names shard {f.name}, which does not exist")
        return files
    if single.exists():
        return [single]
    found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = f" (found {', '.join(found)}: pickle checkpoints are not loaded; convert to safetensors)" if found else ""
    raise InputError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, np.ndarray]]:
    """Yield ``(name, file, array)`` for every tensor; bf16/f16 come back as float32."""
    for f in files:
        try:
            with safe_open(str(f), framework="flax") as st:
                for name in st.keys():
                    arr = st.get_tensor(name)
                    if arr.dtype in (jnp.bfloat16, jnp.float16):
                        arr = arr.astype(jnp.float32)
                    yield name, f, np.asarray(arr)
        except InputError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"{f}: cannot read safetensors ({e})") from None


def load_into(model: nnx.Module, model_dir: Path, name_map: NameMap) -> None:
    """Overwrite every ``nnx.Param`` of ``model`` from the checkpoint in ``model_dir``."""
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    loaded: dict[Path_, np.ndarray] = {}
    for name, file, arr in iter_tensors(checkpoint_files(model_dir)):
        mapped = name_map.to_ours(name)
        if mapped is None:
            if name_map.is_ignored(name):
                continue
            raise InputError(f"{file}: tensor {name!r} does not map to any parameter of {type(model).__name__}")
        path, transpose = mapped
        if path not in flat:
            raise InputError(f"{file}: tensor {name!r} maps to {'.'.join(map(str, path))}, which the model lacks")
        value = arr.T if transpose else arr
        want = flat[path].shape
        if value.shape != tuple(want):
            raise InputError(
                f"{file}: tensor {name!r} has shape {arr.shape}, expected {tuple(want)[::-1] if transpose else tuple(want)}"
            )
        loaded[path] = value
    missing = [".".join(map(str, p)) for p in flat if p not in loaded]
    if missing:
        raise InputError(f"{model_dir}: checkpoint lacks {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}")
    for path, var in flat.items():
        var.set_value(jnp.asarray(loaded[path], dtype=var.get_value().dtype))
    nnx.update(model, nnx.from_flat_state(flat))


def hf_state_dict(model: nnx.Module, name_map: NameMap) -> dict[str, np.ndarray]:
    """The model's parameters under their Hugging Face names, as float32 NumPy arrays."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = name_map.to_hf(path)
        arr = np.asarray(var.get_value(), dtype=np.float32)
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out
