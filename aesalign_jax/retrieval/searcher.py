"""The top-K searcher the `retrieval` config section chooses: on device, or a FAISS index.

    searcher = make_searcher(config.retrieval, mesh)
    sim, rows = searcher.topk(query_emb, corpus_emb, k)      # [Q, k] each, best first

backend 'device' is search.topk (chunked over the corpus, over the mesh's devices);
backend 'faiss' builds a FaissIndex (faiss_kind) over corpus_emb on the host, once per corpus
array: calls on the same array reuse it (the array must not be changed in place in between).

Ties: the exact backends (device, faiss 'flat_ip') rank equal scores by corpus row, lower row
first, and a tie on the k-th place keeps the lower rows (search.topk through lax.top_k, which
keeps the lower index; faiss by its own heap order, re-ranked here). So they return the same
rows on the same inputs, ties included; only two rows whose scores differ by float32 rounding
(the backends sum the inner products in different orders) may come back swapped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
from absl import logging

from aesalign_jax import multihost, sharding
from aesalign_jax.retrieval import faiss_index, search

BACKENDS = ('device', 'faiss')


def validate(c) -> None:
  """Refuses a retrieval section the searcher cannot run, naming the key."""
  if c.backend not in BACKENDS:
    raise ValueError(f'config.retrieval.backend={c.backend!r}; expected one of {BACKENDS}')
  if c.faiss_kind not in faiss_index.KINDS:
    raise ValueError(f'config.retrieval.faiss_kind={c.faiss_kind!r}; expected one of '
                     f'{faiss_index.KINDS}')
  for key in ('chunk_size', 'query_chunk'):
    value = c[key]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.retrieval.{key}={value!r} must be a positive integer')
  if not 0.0 < c.recall_target <= 1.0:
    raise ValueError(f'config.retrieval.recall_target={c.recall_target!r} must be in (0, 1]')
  if c.backend == 'faiss':
    try:
      faiss_index.load_faiss()
    except ImportError as e:
      raise ValueError(f"config.retrieval.backend='faiss' needs the faiss package: "
                       f'{faiss_index.INSTALL_HINT}') from e


@dataclasses.dataclass
class Searcher:
  """topk(query_emb [Q, D], corpus_emb [N, D], k) -> (similarity float32 [Q, k], rows int64
  [Q, k]), best first; see the module docstring for the backends and the tie rule. Made by
  make_searcher (the fields are the retrieval section's keys, defaults there)."""
  backend: str
  chunk_size: int
  query_chunk: int
  approx: bool
  recall_target: float
  faiss_kind: str
  mesh: Any = None
  # Several processes: every process calls topk with the same queries; each searches its
  # block of the corpus rows (multihost.share) on its own devices and the per-process top-k
  # lists are merged (exact: the best k of the union, lower row first on ties).
  across_processes: bool = False
  # backend 'faiss': (the corpus array it was built over, its FaissIndex).
  _index: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False)

  def topk(self, query_emb, corpus_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
    if self.across_processes and multihost.count() > 1:
      return self._merged_topk(query_emb, corpus_emb, k)
    return self._topk(query_emb, corpus_emb, k, self.mesh)

  def _topk(self, query_emb, corpus_emb, k: int, mesh) -> tuple[np.ndarray, np.ndarray]:
    if self.backend == 'device':
      return search.topk(query_emb, corpus_emb, k, chunk_size=self.chunk_size,
                         query_chunk=self.query_chunk, mesh=mesh, approx=self.approx,
                         recall_target=self.recall_target)
    return _ranked_by_row_on_ties(self._faiss_index(corpus_emb), np.asarray(query_emb), k)

  def _merged_topk(self, query_emb, corpus_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(corpus_emb)
    if not 1 <= k <= n:
      raise ValueError(f'topk: k={k} must be in [1, N={n}] (the corpus size)')
    start, stop = multihost.share(n)
    q = np.asarray(query_emb, np.float32)
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows = np.full((len(q), k), -1, np.int64)
    if stop > start:
      part = (corpus_emb.take(np.arange(start, stop)) if hasattr(corpus_emb, 'take')
              else corpus_emb[start:stop])
      mesh = None if self.mesh is None else sharding.local_mesh(self.mesh)
      local = min(k, stop - start)
      scores[:, :local], part_rows = self._topk(q, part, local, mesh)
      rows[:, :local] = part_rows + start
    return merge_topk(multihost.allgather_arrays(scores), multihost.allgather_arrays(rows), k)

  def _faiss_index(self, corpus_emb) -> faiss_index.FaissIndex:
    if self._index is None or self._index[0] is not corpus_emb:
      corpus = np.asarray(corpus_emb)
      built = faiss_index.FaissIndex.build(corpus, np.arange(len(corpus)), self.faiss_kind)
      logging.info('retrieval: FAISS %s index over %d rows', self.faiss_kind, len(corpus))
      self._index = (corpus_emb, built)
    return self._index[1]


def _ranked_by_row_on_ties(index: faiss_index.FaissIndex, queries: np.ndarray, k: int):
  """index.search_rows with equal scores re-ranked by row, lower first (faiss lists them
  highest row first; at a tie on the k-th place it already keeps the lower rows)."""
  scores, rows = index.search_rows(queries, k)
  order = np.lexsort((rows, -scores), axis=-1)   # by score, best first, then by row
  return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def merge_topk(scores: list, rows: list, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The best k of several top-k lists over disjoint rows ([Q, k_i] each): by score, then
  lower row first (the exact backends' tie rule), so the merge equals one search over all."""
  scores, rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
  order = np.lexsort((rows, -scores), axis=-1)[:, :k]
  return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def make_searcher(c, mesh=None, *, across_processes: bool = False) -> Searcher:
  """The searcher of a `retrieval` config section (validated); mesh: the device backend's;
  across_processes: split each search over the processes (every process calls topk)."""
  validate(c)
  return Searcher(backend=c.backend, chunk_size=c.chunk_size, query_chunk=c.query_chunk,
                  approx=c.approx, recall_target=c.recall_target, faiss_kind=c.faiss_kind,
                  mesh=mesh, across_processes=across_processes)
