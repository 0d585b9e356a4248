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
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from opera_jax.errors import InputError
from opera_jax.io_utils import atomic_path

CACHE_ENV = "OPERA_CACHE_DIR"


def load_tokenizer(model_dir: Path):
    """The model's fast tokenizer, from local files only."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: cannot load a tokenizer ({e})") from None
    if not tok.is_fast:
        raise InputError(f"{model_dir}: no fast tokenizer (tokenizer.json) available")
    return tok


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "opera_jax") / "tokens"


@dataclasses.dataclass(frozen=True)
class TokenArrays:
    """Ragged token ids: text ``i`` is ``flat[offsets[i]:offsets[i] + lengths[i]]``."""

    flat: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int32 [n]
    pad_id: int

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, rows: np.ndarray) -> "TokenArrays":
        """The texts at ``rows``, as a new ragged array."""
        rows = np.asarray(rows)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows), np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = np.concatenate([self.flat[o : o + n] for o, n in zip(self.offsets[rows], lengths)]) if len(rows) else self.flat[:0]
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
    path = cache_dir() / f"{_key(tokenizer, texts, max_len, prefix)}.npz"
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
