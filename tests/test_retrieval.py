"""On-device encoding and chunked, sharded exact top-k, against direct computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.data.tokens import tokenize
from opera_jax.eval.retrieval import encode, exact_topk
from opera_jax.models.encoder import load_encoder

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"


def _reference_topk(q, d, k):
    scores = q @ d.T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, 1), idx


@pytest.mark.parametrize("n_docs, k, chunk", [(1001, 10, 64), (300, 100, 4096), (7, 10, 2)])
def test_topk_matches_full_sort_on_1_and_8_devices(mesh1, mesh8, n_docs, k, chunk):
    rng = np.random.default_rng(n_docs)
    q = rng.normal(size=(45, 16)).astype(np.float32)
    d = rng.normal(size=(n_docs, 16)).astype(np.float32)
    want_s, want_i = _reference_topk(q, d, k)
    for mesh in (mesh1, mesh8):
        s, i = exact_topk(jnp.asarray(q), jnp.asarray(d), k, mesh=mesh, doc_chunk=chunk, query_block=16)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_allclose(s, want_s, rtol=1e-6, atol=1e-6)


def test_topk_ties_go_to_the_lower_index(mesh8):
    d = np.zeros((50, 4), np.float32)
    d[:, 0] = 1.0  # every document scores the same
    s, i = exact_topk(jnp.ones((2, 4)), jnp.asarray(d), 5, mesh=mesh8, doc_chunk=4)
    assert i.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_encode_is_order_preserving_and_device_count_invariant(tiny_bert_dir, mesh1, mesh8):
    enc = load_encoder(str(tiny_bert_dir))
    texts = [("word " * n).strip() for n in (1, 9, 3, 20, 2, 5, 14, 7, 1, 11, 4)]
    arrays = tokenize(enc.tokenizer, texts, 32, use_cache=False)
    one = np.asarray(encode(enc.model, arrays, max_len=32, batch_size=4, mesh=mesh1))
    eight = np.asarray(encode(enc.model, arrays, max_len=32, batch_size=4, mesh=mesh8))
    assert one.shape == (len(texts), enc.config.hidden_size)
    np.testing.assert_allclose(eight, one, atol=1e-5)
    for i in (0, 3, 10):  # each text alone, unpadded, gives the same embedding
        ids, mask = arrays.batch(np.array([i]), int(arrays.lengths[i]))
        direct = np.asarray(enc.model(jnp.asarray(ids), jnp.asarray(mask)))[0]
        np.testing.assert_allclose(one[i], direct, atol=1e-5)
