"""A FAISS inner-product index over corpus embeddings, for corpora that do not fit on device.

    index = FaissIndex.build(embeddings, ids, kind='flat_ip')     # or .from_shards(index_dir)
    scores, found_ids = index.search(queries, k=100)               # [Q, k] each, best first
    index.save(folder); index = FaissIndex.load(folder)

Kinds: 'flat_ip' (exact, IndexFlatIP), 'hnsw' (graph, approximate, no training) and
'ivf_flat' (inverted lists trained on the corpus, approximate; `nprobe` lists searched).
Saved as faiss.write_index's own format plus ids.npz and faiss.json: no pickle.

faiss is an optional dependency (`pip install aesalign[faiss]`, which brings faiss-cpu); it is
imported only when an index is built or loaded.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from aesalign_jax.retrieval import index as index_lib

KINDS = ('flat_ip', 'hnsw', 'ivf_flat')
INSTALL_HINT = 'pip install aesalign[faiss]'
_INDEX_FILE, _IDS_FILE, _META_FILE = 'faiss.index', 'ids.npz', 'faiss.json'


def load_faiss():
  """The faiss module; ImportError naming the pip extra when it is not installed."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('the FAISS retrieval backend needs the faiss package: '
                      f'{INSTALL_HINT}  (or: pip install faiss-cpu)') from e
  return faiss


def _new_index(faiss, kind: str, dim: int, count: int, *, hnsw_m: int, ivf_lists: Optional[int]):
  if kind == 'flat_ip':
    return faiss.IndexFlatIP(dim)
  if kind == 'hnsw':
    return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
  if kind == 'ivf_flat':
    lists = ivf_lists or max(1, int(4 * np.sqrt(count)))   # faiss's usual rule of thumb
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
  raise ValueError(f'FAISS index kind={kind!r}; expected one of {KINDS}')


class FaissIndex:
  """A faiss index plus the corpus ids of its rows."""

  def __init__(self, index, ids: np.ndarray, kind: str):
    self.index, self.ids, self.kind = index, ids, kind

  def __len__(self) -> int:
    return int(self.index.ntotal)

  @classmethod
  def build(cls, embeddings, ids, kind: str = 'flat_ip', *, hnsw_m: int = 32,
            ivf_lists: Optional[int] = None, nprobe: int = 16) -> 'FaissIndex':
    """An index of embeddings [N, D] (inner product) with ids [N] (integers or strings)."""
    faiss = load_faiss()
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    ids = index_lib.as_ids(ids)
    if embeddings.ndim != 2 or len(embeddings) != len(ids):
      raise ValueError(f'FaissIndex.build: embeddings {embeddings.shape} and {len(ids)} ids: '
                       f'expected [N, D] and [N]')
    index = _new_index(faiss, kind, embeddings.shape[1], len(embeddings), hnsw_m=hnsw_m,
                       ivf_lists=ivf_lists)
    if not index.is_trained:
      index.train(embeddings)
    if kind == 'ivf_flat':
      index.nprobe = nprobe
    index.add(embeddings)
    return cls(index, ids, kind)

  @classmethod
  def from_shards(cls, index_dir: str, kind: str = 'flat_ip', **kwargs) -> 'FaissIndex':
    """An index of an embed_corpus folder (flat and hnsw are filled shard by shard)."""
    if kind == 'ivf_flat':   # training needs the vectors at once
      embeddings, ids = index_lib.load_index(index_dir, np.float32)
      return cls.build(embeddings, ids, kind, **kwargs)
    faiss, index, all_ids = load_faiss(), None, []
    for emb, ids, _ in index_lib.iter_shards(index_dir):
      if index is None:
        index = _new_index(faiss, kind, emb.shape[1], 0, hnsw_m=kwargs.get('hnsw_m', 32),
                           ivf_lists=None)
      index.add(np.ascontiguousarray(emb, np.float32))
      all_ids.append(ids)
    return cls(index, np.concatenate(all_ids), kind)

  def search_rows(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [Q, k], rows int64 [Q, k]); a slot an approximate index could not fill
    has row -1 and score -inf."""
    if not 1 <= k <= len(self):
      raise ValueError(f'FaissIndex.search: k={k} must be in [1, {len(self)}] (the index size)')
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.index.d:
      raise ValueError(f'FaissIndex.search: queries {queries.shape}, expected [Q, {self.index.d}]')
    scores, rows = self.index.search(queries, k)
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    return scores, rows.astype(np.int64)

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]), best first; unfilled slots: id -1 (or '') and -inf."""
    scores, rows = self.search_rows(queries, k)
    found = self.ids[np.maximum(rows, 0)]
    found[rows < 0] = -1 if self.ids.dtype.kind == 'i' else ''
    return scores, found

  def save(self, folder: str):
    """faiss.index (faiss's format), ids.npz and faiss.json, each written atomically."""
    faiss = load_faiss()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _INDEX_FILE)
    tmp = f'{path}.tmp{os.getpid()}'
    faiss.write_index(self.index, tmp)
    os.replace(tmp, path)
    index_lib.atomic_write(os.path.join(folder, _IDS_FILE), lambda f: np.savez(f, ids=self.ids))
    meta = json.dumps({'kind': self.kind, 'dim': int(self.index.d), 'count': len(self)})
    index_lib.atomic_write(os.path.join(folder, _META_FILE), lambda f: f.write(meta), mode='w')

  @classmethod
  def load(cls, folder: str) -> 'FaissIndex':
    faiss = load_faiss()
    meta_path = os.path.join(folder, _META_FILE)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f'no FAISS index in {folder} (no {_META_FILE})')
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    index = faiss.read_index(os.path.join(folder, _INDEX_FILE))
    with np.load(os.path.join(folder, _IDS_FILE), allow_pickle=False) as z:
      ids = z['ids']
    if index.ntotal != len(ids) or index.ntotal != meta['count']:
      raise ValueError(f'FAISS index in {folder}: {index.ntotal} vectors, {len(ids)} ids, '
                       f'{_META_FILE} says {meta["count"]}')
    return cls(index, ids, meta['kind'])
