"""On-device encoding and exact inner-product top-k retrieval.

``encode`` embeds a tokenised collection in fixed-size batches, sorted by length
and padded to bucket lengths, so the jitted encoder sees a few shapes; batches
are split over the mesh. Embeddings stay on device.

``exact_topk`` scores queries against the corpus chunk by chunk and keeps a
running top-k, so memory is bounded by ``query_block x doc_chunk`` scores and
never holds a full queries x corpus matrix. The corpus is sharded over every
device of the mesh; each device keeps a top-k of its shard, and the per-device
candidates are gathered and merged. Ties go to the lower document index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from opera_jax.data.tokens import TokenArrays, bucket_for, bucket_lengths
from opera_jax.sharding import BATCH_AXES, batch_sharding, make_mesh, round_up


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def encode(
    model: nnx.Module,
    tokens: TokenArrays,
    *,
    max_len: int,
    batch_size: int = 128,
    padding_side: str = "right",
    mesh: Mesh | None = None,
    desc: str | None = None,
) -> jax.Array:
    """Embed every text of ``tokens``; returns ``[n, dim]`` float32 on device, in input order."""
    mesh = mesh or make_mesh()
    batch_size = round_up(batch_size, mesh.size)
    sharding = batch_sharding(mesh)
    buckets = bucket_lengths(max_len)
    graphdef, state = nnx.split(model)
    lengths = np.minimum(tokens.lengths, max_len)
    order = np.argsort(-lengths, kind="stable")  # longest first: the first shape compiled is the largest
    outputs = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        length = bucket_for(int(lengths[rows].max()), buckets)
        padded = np.full(batch_size, -1, dtype=np.int64)
        padded[: len(rows)] = rows
        ids, mask = tokens.batch(padded, length, padding_side)
        ids, mask = jax.device_put((ids, mask), sharding)
        if outputs:  # one batch in flight while the next is prepared; the bar shows real progress
            outputs[-1].block_until_ready()
        outputs.append(_embed(graphdef, state, ids, mask)[: len(rows)])
    emb = jnp.concatenate(outputs)
    return jnp.take(emb, jnp.asarray(np.argsort(order)), axis=0)


def exact_topk(
    queries: jax.Array,
    docs: jax.Array,
    k: int,
    *,
    mesh: Mesh | None = None,
    doc_chunk: int = 4096,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by inner product for every query: ``(scores, doc_indices)``, best first."""
    mesh = mesh or make_mesh()
    n_docs, dim = docs.shape
    k = min(k, n_docs)
    per_device = -(-n_docs // mesh.size)
    doc_chunk = min(doc_chunk, per_device)
    per_device = round_up(per_device, doc_chunk)
    docs = jnp.pad(docs.astype(jnp.float32), ((0, per_device * mesh.size - n_docs), (0, 0)))
    docs = jax.device_put(docs, NamedSharding(mesh, P(BATCH_AXES)))
    search = _sharded_search(mesh, k, doc_chunk, n_docs)
    scores, indices = [], []
    for start in range(0, queries.shape[0], query_block):
        block = queries[start : start + query_block].astype(jnp.float32)
        s, i = search(jax.device_put(block, NamedSharding(mesh, P())), docs)
        scores.append(s)
        indices.append(i)
    return np.asarray(jnp.concatenate(scores)), np.asarray(jnp.concatenate(indices))


@functools.lru_cache(maxsize=32)
def _sharded_search(mesh: Mesh, k: int, doc_chunk: int, n_docs: int):
    def local(queries, docs):
        shard = jax.lax.axis_index(BATCH_AXES)
        n_local = docs.shape[0]
        chunks = docs.reshape(n_local // doc_chunk, doc_chunk, docs.shape[1])
        init = (
            jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((queries.shape[0], k), -1, jnp.int32),
        )

        def step(best, xs):
            chunk, c = xs
            ids = shard * n_local + c * doc_chunk + jnp.arange(doc_chunk, dtype=jnp.int32)
            s = jnp.where(ids[None, :] < n_docs, queries @ chunk.T, -jnp.inf)
            return _merge(best, (s, jnp.broadcast_to(ids, s.shape)), k), None

        best, _ = jax.lax.scan(step, init, (chunks, jnp.arange(chunks.shape[0], dtype=jnp.int32)))
        # Every device's candidates, in device order, then one last merge.
        s_all, i_all = (jax.lax.all_gather(x, BATCH_AXES, axis=1, tiled=True) for x in best)
        return _merge(init, (s_all, i_all), k)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(BATCH_AXES)), out_specs=P(), check_vma=False)
    return jax.jit(mapped)


def _merge(best, new, k):
    """Top-``k`` of the union of two candidate sets; earlier candidates win ties."""
    scores = jnp.concatenate([best[0], new[0]], axis=1)
    ids = jnp.concatenate([best[1], new[1]], axis=1)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(ids, pos, axis=1)
