"""Tokenisation: prefixes, truncation, bucketing, padding sides, the on-disk cache."""

import numpy as np
import pytest

from opera_jax.data import tokens as tk
from opera_jax.data.tokens import bucket_for, bucket_lengths, load_tokenizer, tokenize


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


TEXTS = ["short", "a somewhat longer sentence about aerodynamics and wings", "", "x " * 400]


def test_matches_transformers_with_prefix_and_truncation(tokenizer):
    arrays = tokenize(tokenizer, TEXTS, 32, prefix="query: ", use_cache=False)
    for i, text in enumerate(TEXTS):
        want = tokenizer("query: " + text, truncation=True, max_length=32)["input_ids"]
        got = arrays.flat[arrays.offsets[i] : arrays.offsets[i] + arrays.lengths[i]]
        assert got.tolist() == want
    assert arrays.lengths.max() == 32 and arrays.flat.dtype == np.int32


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
    monkeypatch.setenv(tk.CACHE_ENV, str(tmp_path))
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
