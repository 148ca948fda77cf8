"""Exact (or approximate) top-K inner-product search on device, in chunks over the corpus.

    scores, rows = topk(queries, corpus, k=100, chunk_size=65536)          # [Q, k] each
    scores, ids = search_ids(queries, corpus, ids, k=100)                   # ids[rows]

Scores are inner products q . c (cosine similarities when both sides are unit vectors, as the
model's embeddings are). The corpus (numpy on the host, or a jax array) is read `chunk_size`
rows at a time, so a corpus far larger than one matmul (or than device memory, when it is a
numpy array) is searched with one compiled step: each chunk's scores go through
jax.lax.top_k (or jax.lax.approx_max_k, approx=True, fast on TPU) and merge into a running
top-k (concatenate, top_k again). The last chunk is padded and its padding scored -inf.

With a mesh, each chunk's rows are split over all of the mesh's devices: every device scores
its slice and keeps its own top-k (shard_map), and only those k candidates per device are
gathered for the merge, never the [Q, chunk] score matrix.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_PRECISIONS = {'default': jax.lax.Precision.DEFAULT, 'high': jax.lax.Precision.HIGH,
               'highest': jax.lax.Precision.HIGHEST}


def _chunk_candidates(q, chunk, rows, valid_from, valid_to, *, kc, approx, recall_target,
                      precision):
  """Top-kc of q against one slice of corpus rows: (scores [Q, kc], global rows [Q, kc]).

  rows [C] are the global corpus rows of the slice; those outside [valid_from, valid_to)
  (padding, or rows another chunk already covered) score -inf.
  """
  scores = jnp.dot(q, chunk.astype(q.dtype).T, precision=precision,
                   preferred_element_type=jnp.float32)
  valid = (rows >= valid_from) & (rows < valid_to)
  scores = jnp.where(valid[None, :], scores, -jnp.inf)
  if approx:
    top, pos = jax.lax.approx_max_k(scores, kc, recall_target=recall_target)
  else:
    top, pos = jax.lax.top_k(scores, kc)
  return top, rows[pos]


@functools.lru_cache(maxsize=32)
def _step_fn(mesh: Optional[Mesh], chunk_size: int, k: int, approx: bool, recall_target: float,
             precision: str):
  """The jitted step: (running scores, running rows, queries, chunk, row0, lo, hi) -> running."""
  ndev = 1 if mesh is None else mesh.size
  kc = min(k, chunk_size // ndev)
  local = functools.partial(_chunk_candidates, kc=kc, approx=approx,
                            recall_target=recall_target, precision=_PRECISIONS[precision])
  if mesh is not None:
    axes = tuple(mesh.axis_names)
    # Per device: its rows' top-kc; out_specs concatenates them: [Q, ndev * kc] candidates.
    local = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(), P(axes), P(axes), P(), P()),
                          out_specs=(P(None, axes), P(None, axes)))

  def step(run_scores, run_rows, q, chunk, row0, lo, hi):
    rows = row0 + jnp.arange(chunk_size, dtype=jnp.int32)
    cand_scores, cand_rows = local(q, chunk, rows, lo, hi)
    scores = jnp.concatenate([run_scores, cand_scores], axis=1)
    all_rows = jnp.concatenate([run_rows, cand_rows], axis=1)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(all_rows, pos, axis=1)

  if mesh is None:
    return jax.jit(step, donate_argnums=(0, 1))
  rep = NamedSharding(mesh, P())
  rows_sharded = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  return jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(rep, rep, rep, rows_sharded, rep, rep, rep),
                 out_shardings=(rep, rep))


def _chunks(corpus, n: int, chunk_size: int):
  """Yields (chunk [chunk_size, D], row0, valid_from): static-shape slices of the corpus.

  A numpy corpus is sliced on the host and its last chunk zero-padded (the transfer is per
  chunk, so it never has to fit on device whole). A jax corpus is sliced on device; its last
  chunk starts early (at n - chunk_size) instead of being padded, and the rows it shares with
  the previous chunk are masked by valid_from, so no padded copy of the corpus is made.
  """
  on_device = isinstance(corpus, jax.Array)
  if on_device and n < chunk_size:   # small: one padded copy is cheap
    corpus = jnp.pad(corpus, ((0, chunk_size - n), (0, 0)))
    yield corpus, 0, 0
    return
  for start in range(0, n, chunk_size):
    if on_device:
      row0 = min(start, n - chunk_size)
      yield jax.lax.dynamic_slice_in_dim(corpus, row0, chunk_size), row0, start
    else:
      chunk = np.asarray(corpus[start:start + chunk_size])
      if len(chunk) < chunk_size:
        chunk = np.concatenate(
            [chunk, np.zeros((chunk_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      yield chunk, start, start


def topk(queries, corpus, k: int, *, chunk_size: int = 65536, query_chunk: int = 1024,
         mesh: Optional[Mesh] = None, approx: bool = False, recall_target: float = 0.95,
         precision: str = 'highest') -> tuple[np.ndarray, np.ndarray]:
  """The k corpus rows with the highest inner product with each query.

  Args:
    queries: [Q, D] float (numpy or jax).
    corpus: [N, D] float (numpy or jax; float16 is fine, scores are float32).
    k: results per query, 1 <= k <= N.
    chunk_size: at most this many corpus rows are scored per step (the corpus is cut into
      equal chunks, each a multiple of the mesh's device count); device memory for scores is
      about query_chunk * chunk_size * 4 bytes.
    query_chunk: queries scored per step (the last block is padded).
    mesh: split each chunk's rows over all devices of this mesh; None = the default device.
    approx: per-chunk jax.lax.approx_max_k instead of exact top_k (fast on TPU; exact
      elsewhere, where XLA falls back to a sort); the merge is always exact.
    recall_target: approx_max_k's expected recall.
    precision: matmul precision: 'highest' keeps float32 scores exact on TPU and GPU (whose
      defaults are one bf16 pass and TF32); 'default' is faster there, and ranks near-ties
      less exactly.

  Returns:
    (scores float32 [Q, k], rows int64 [Q, k]), best first; rows index the corpus.
  """
  q = jnp.asarray(queries).astype(jnp.float32)
  if q.ndim != 2 or corpus.ndim != 2 or q.shape[1] != corpus.shape[1]:
    raise ValueError(f'topk: queries {tuple(q.shape)} and corpus {tuple(corpus.shape)} must be '
                     f'[Q, D] and [N, D] with the same D')
  n, num_q = int(corpus.shape[0]), int(q.shape[0])
  if not 1 <= k <= n:
    raise ValueError(f'topk: k={k} must be in [1, N={n}] (the corpus size)')
  if n >= 2**31:
    raise ValueError(f'topk: the corpus has {n} rows; int32 row indices hold at most 2**31 - 1')
  if precision not in _PRECISIONS:
    raise ValueError(f'topk: precision={precision!r}; expected one of {sorted(_PRECISIONS)}')
  ndev = 1 if mesh is None else mesh.size
  # Equal chunks of at most chunk_size rows (so the padded tail is small), each a multiple of
  # the device count (every device scores as many rows).
  num_chunks = -(-n // max(1, min(int(chunk_size), n)))
  chunk_size = -(-n // num_chunks)
  chunk_size = -(-chunk_size // ndev) * ndev
  query_chunk = max(1, min(int(query_chunk), num_q))
  step = _step_fn(mesh, chunk_size, k, bool(approx), float(recall_target), precision)

  blocks = []
  for start in range(0, num_q, query_chunk):
    block = q[start:start + query_chunk]
    if block.shape[0] < query_chunk:   # one compiled shape for every block
      block = jnp.pad(block, ((0, query_chunk - block.shape[0]), (0, 0)))
    blocks.append(block)
  if mesh is not None:
    rep = NamedSharding(mesh, P())
    blocks = [jax.device_put(b, rep) for b in blocks]
    chunk_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  running = [(jnp.full((query_chunk, k), -jnp.inf, jnp.float32),
              jnp.full((query_chunk, k), -1, jnp.int32)) for _ in blocks]
  if mesh is not None:
    running = [jax.device_put(r, rep) for r in running]
  hi = np.int32(n)
  for chunk, row0, valid_from in _chunks(corpus, n, chunk_size):
    # This chunk was read (from host memory or an on-disk index) while the last one was being
    # scored; wait for that before sending this one. Without the wait, asynchronous dispatch
    # queues every chunk's transfer at once and the host holds the whole corpus (measured:
    # 1M x 128 from disk, peak RSS 1046 MiB; with it, two chunks).
    jax.block_until_ready(running)
    if mesh is not None:
      chunk = jax.device_put(chunk, chunk_sharding)
    else:
      chunk = jnp.asarray(chunk)
    row0, lo = np.int32(row0), np.int32(valid_from)
    running = [step(s, r, b, chunk, row0, lo, hi) for (s, r), b in zip(running, blocks)]
  scores = np.concatenate([np.asarray(s) for s, _ in running])[:num_q]
  rows = np.concatenate([np.asarray(r) for _, r in running])[:num_q].astype(np.int64)
  return scores, rows


def search_ids(queries, corpus, ids: Sequence, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """topk(queries, corpus, k, **kwargs) with corpus rows mapped to ids: (scores, ids [Q, k])."""
  ids = np.asarray(ids)
  if len(ids) != corpus.shape[0]:
    raise ValueError(f'search_ids: {len(ids)} ids for a corpus of {corpus.shape[0]} rows')
  scores, rows = topk(queries, corpus, k, **kwargs)
  return scores, ids[rows]
