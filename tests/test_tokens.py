"""Tokenisation: prefixes, truncation, bucketing, padding sides, the on-disk cache."""

import numpy as np
import pytest

from opera_jax import io_utils
from opera_jax.data import tokens as tk
from opera_jax.data.tokens import bucket_for, bucket_lengths, load_tokenizer, tokenize


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


TEXTS = ["short", "a somewhat longer sentence about aerodynamics and wings", "", "x " * 400]


def _transformers(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)


@pytest.mark.parametrize("model", ["minilm", "tiny_bert", "tiny_qwen3"])
@pytest.mark.parametrize("max_len", [8, 32])
def test_matches_transformers_with_prefix_and_truncation(minilm_dir, model, max_len):
    """Our tokenizers-only path gives transformers' ids: special tokens (Qwen3's appended
    <|endoftext|>), truncation, pad id, and none of the padding MiniLM's tokenizer.json carries."""
    from conftest import GOLDEN

    model_dir = minilm_dir if model == "minilm" else GOLDEN / model
    ours, theirs = load_tokenizer(model_dir), _transformers(model_dir)
    assert isinstance(ours, tk.FastTokenizer) and ours.pad_token_id == theirs.pad_token_id
    texts = [*TEXTS, "Ünïcödé — 数学 text\twith\ttabs", "[SEP] <|endoftext|> inside"]
    arrays = tokenize(ours, texts, max_len, prefix="query: ", use_cache=False)
    for i, text in enumerate(texts):
        want = theirs("query: " + text, truncation=True, max_length=max_len)["input_ids"]
        got = arrays.flat[arrays.offsets[i] : arrays.offsets[i] + arrays.lengths[i]]
        assert got.tolist() == want, text
    assert arrays.lengths.max() == max_len and arrays.flat.dtype == np.int32
    assert arrays.pad_id == (theirs.pad_token_id or 0)


def test_loading_a_tokenizer_does_not_import_transformers(minilm_dir):
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from opera_jax.data.tokens import load_tokenizer; "
        f"load_tokenizer(Path({str(minilm_dir)!r})); print('transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False" and "PyTorch" not in done.stderr, done.stderr


def test_the_definition_and_the_cache_key_do_not_change_with_use(tokenizer):
    before = tokenizer.backend_tokenizer.to_str()
    tokenize(tokenizer, TEXTS, 8, use_cache=False)
    assert tokenizer.backend_tokenizer.to_str() == before
    assert tokenizer(TEXTS[3])["input_ids"] == tokenizer([TEXTS[3]])["input_ids"][0]
    assert len(tokenizer(TEXTS[3])["input_ids"]) == 402  # no truncation unless asked (the file sets 128)


def test_batches_pad_right_and_left_with_filler_rows(tokenizer):
    arrays = tokenize(tokenizer, TEXTS, 32, use_cache=False)
    n0 = int(arrays.lengths[0])
    assert arrays.lengths[3] == 32
    ids, mask = arrays.batch(np.array([0, 3, -1]), 16)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32
    assert mask[0].sum() == n0 and mask[1].sum() == 16  # row 3 cut to the bucket
    assert (ids[0, n0:] == arrays.pad_id).all()
    assert mask[2].tolist() == [1] + [0] * 15  # filler: one attended pad token
    left_ids, left_mask = arrays.batch(np.array([0, 3, -1]), 16, padding_side="left")
    np.testing.assert_array_equal(left_ids[0, 16 - n0 :], ids[0, :n0])
    assert left_mask[0].tolist() == [0] * (16 - n0) + [1] * n0
    np.testing.assert_array_equal(left_ids[1], ids[1])


def test_bucket_lengths():
    assert bucket_lengths(256) == (16, 32, 64, 128, 256)
    assert bucket_lengths(300) == (16, 32, 64, 128, 256, 300)
    assert bucket_lengths(16) == (16,)
    assert [bucket_for(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]


def test_cache_is_keyed_by_length_prefix_and_content(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv(io_utils.CACHE_ENV, str(tmp_path))
    first = tokenize(tokenizer, TEXTS, 32)
    files = sorted((tmp_path / "tokens").glob("*.npz"))
    assert len(files) == 1
    again = tokenize(tokenizer, TEXTS, 32)
    np.testing.assert_array_equal(first.flat, again.flat)
    tokenize(tokenizer, TEXTS, 64)
    tokenize(tokenizer, TEXTS, 32, prefix="query: ")
    tokenize(tokenizer, TEXTS[:2], 32)
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 4
    assert not list((tmp_path / "tokens").glob("*.tmp"))
