"""Texts -> int32 token arrays, once, cached on disk; token arrays -> padded batches of few shapes.

A tokenised collection is ``TokenArrays``: every text's ids concatenated into
one flat int32 array plus offsets (ragged, so a large corpus costs no padding).
``batch`` cuts rows out of it and pads them to a bucket length from a short,
fixed list (powers of two up to the max length), so a jitted encoder compiles a
handful of shapes, not one per batch.

The cache key covers the tokenizer (its full serialised definition), the max
length, the prefix and the texts themselves; entries are ``.npz`` files (no
pickle), written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opera_jax.errors import InputError
from opera_jax.io_utils import atomic_path, cache_dir

# The files that define a tokenizer, copied as they are by ``FastTokenizer.save_pretrained``.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


def load_tokenizer(model_dir: Path):
    """The model's fast tokenizer (``tokenizer.json``), from local files only.

    Through ``tokenizers`` alone (:class:`FastTokenizer`): 0.1 s to load instead of 2.6 s through
    transformers, and no "PyTorch was not found" warning. A ``tokenizer_config.json`` asking
    transformers to add BOS / EOS tokens itself (``add_bos_token``, ``add_eos_token``) goes
    through transformers, which rewrites the post-processor for them.
    """
    config = _read_tokenizer_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir}: no fast tokenizer (tokenizer.json) available")
    if config.get("add_bos_token") or config.get("add_eos_token"):
        return _transformers_tokenizer(model_dir)
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise InputError(f"{model_dir / 'tokenizer.json'}: cannot load a tokenizer ({e})") from None
    pad = config.get("pad_token")
    if pad is None and (model_dir / "special_tokens_map.json").is_file():
        pad = _read_json_object(model_dir / "special_tokens_map.json").get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return FastTokenizer(backend, model_dir, pad, config.get("truncation_side", "right"))


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with the part of transformers' fast-tokenizer interface opera-jax
    uses: ``tokenizer(texts, truncation=True, max_length=n)["input_ids"]`` (special tokens added,
    no padding, cut on ``truncation_side``), ``pad_token_id``, ``backend_tokenizer``,
    ``convert_tokens_to_ids`` and ``save_pretrained``. Between calls the backend has neither
    padding nor truncation set (a tokenizer.json may carry both), so its definition is stable."""

    is_fast = True

    def __init__(self, backend, source: Path, pad_token: str | None, truncation_side: str = "right"):
        backend.no_padding()
        backend.no_truncation()
        self.backend_tokenizer, self.source, self.truncation_side = backend, source, truncation_side
        self.pad_token = pad_token
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token is not None else None

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        truncation: bool = False,
        max_length: int | None = None,
        padding: bool = False,
        add_special_tokens: bool = True,
        **_ignored,
    ) -> dict:
        if padding:
            raise ValueError("FastTokenizer does not pad: TokenArrays.batch does")
        single = isinstance(texts, str)
        backend = self.backend_tokenizer
        if truncation and max_length is not None:
            backend.enable_truncation(max_length, strategy="longest_first", direction=self.truncation_side)
        try:
            encodings = backend.encode_batch([texts] if single else list(texts), add_special_tokens=add_special_tokens)
        finally:
            backend.no_truncation()
        ids = [e.ids for e in encodings]
        return {"input_ids": ids[0] if single else ids}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    def save_pretrained(self, out: str | os.PathLike) -> None:
        """The source's tokenizer files, copied as they are (``tokenizer_config.json`` made if absent)."""
        out = Path(out)
        for name in TOKENIZER_FILES:
            if (self.source / name).is_file():
                shutil.copyfile(self.source / name, out / name)
        if not (out / "tokenizer_config.json").exists():
            config = {"pad_token": self.pad_token} if self.pad_token is not None else {}
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def _read_tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return _read_json_object(path) if path.is_file() else {}


def _transformers_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: cannot load a tokenizer ({e})") from None
    if not tok.is_fast:
        raise InputError(f"{model_dir}: no fast tokenizer (tokenizer.json) available")
    return tok


@dataclasses.dataclass(frozen=True)
class TokenArrays:
    """Ragged token ids: text ``i`` is ``flat[offsets[i]:offsets[i] + lengths[i]]``."""

    flat: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int32 [n]
    pad_id: int

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, rows: np.ndarray) -> TokenArrays:
        """The texts at ``rows``, as a new ragged array."""
        rows = np.asarray(rows)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows), np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = (
            np.concatenate([self.flat[o : o + n] for o, n in zip(self.offsets[rows], lengths)])
            if len(rows)
            else self.flat[:0]
        )
        return TokenArrays(flat.astype(np.int32), offsets, lengths, self.pad_id)

    def batch(self, rows: np.ndarray, length: int, padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int32 ``[len(rows), length]``.

        A row of ``-1`` is filler (to keep the batch shape static): one attended
        pad token, so every row stays finite; its output is to be ignored.
        """
        rows = np.asarray(rows)
        filler = rows < 0
        safe = np.where(filler, 0, rows)
        lengths = np.where(filler, 1, np.minimum(self.lengths[safe], length))
        pos = np.arange(length)
        valid = pos[None, :] < lengths[:, None]
        src = self.offsets[safe][:, None] + np.minimum(pos[None, :], np.maximum(lengths[:, None] - 1, 0))
        ids = np.where(valid & ~filler[:, None], self.flat[np.minimum(src, len(self.flat) - 1)], self.pad_id)
        mask = valid.astype(np.int32)
        if padding_side == "left":
            shift = length - lengths
            idx = (pos[None, :] - shift[:, None]) % length
            ids, mask = np.take_along_axis(ids, idx, 1), np.take_along_axis(mask, idx, 1)
        return ids.astype(np.int32), mask


def bucket_lengths(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_len``, then ``max_len`` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


def _key(tokenizer, texts: Sequence[str], max_len: int, prefix: str) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"\0{max_len}\0{prefix}\0{len(texts)}\0".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def tokenize(
    tokenizer,
    texts: Sequence[str],
    max_len: int,
    prefix: str = "",
    *,
    use_cache: bool = True,
) -> TokenArrays:
    """Tokenise ``prefix + text`` for every text, truncated to ``max_len`` tokens (special tokens included)."""
    path = cache_dir("tokens") / f"{_key(tokenizer, texts, max_len, prefix)}.npz"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if use_cache and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return TokenArrays(z["flat"], z["offsets"], z["lengths"], int(z["pad_id"]))
    enc = tokenizer(
        [prefix + t for t in texts],
        truncation=True,
        max_length=max_len,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    lengths = np.fromiter((len(x) for x in enc), dtype=np.int32, count=len(enc))
    offsets = np.zeros(len(enc), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.fromiter((i for x in enc for i in x), dtype=np.int32, count=int(lengths.sum()))
    arrays = TokenArrays(flat, offsets, lengths, int(pad_id))
    if use_cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, flat=flat, offsets=offsets, lengths=lengths, pad_id=np.int64(pad_id))
    return arrays
