"""Retrieval: corpus embeddings on disk, and top-K search on device or with FAISS.

  index.py        embed_corpus (sharded batches -> shard files + manifest, resumable),
                  load_index / iter_shards / open_index (rows read on demand),
                  image_embed_fn, fingerprint_params
  search.py       topk / search_ids: exact (or approx_max_k) top-K in chunks, over a mesh
  faiss_index.py  FaissIndex (optional extra: pip install aesalign[faiss])
  searcher.py     Searcher / make_searcher(config.retrieval, mesh): the backend the config
                  chooses, behind one topk(query_emb, corpus_emb, k); validate(config.retrieval)
"""

import ml_collections

from aesalign_jax.retrieval.index import (  # noqa: F401
    IndexMismatchError, IndexRows, embed_corpus, fingerprint_params, image_embed_fn,
    iter_shards, load_index, open_index, read_manifest)
from aesalign_jax.retrieval.search import search_ids, topk  # noqa: F401
from aesalign_jax.retrieval.searcher import (  # noqa: F401
    Searcher, make_searcher, merge_topk, validate)


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the retrieval section (config.retrieval): what make_searcher reads."""
  c = ml_collections.ConfigDict()
  # 'device': search.topk on the accelerators; 'faiss': a FaissIndex on the host (huge
  # corpora; pip install aesalign[faiss]).
  c.backend = 'device'
  # device: corpus rows scored per step, split over the mesh's devices.
  c.chunk_size = 65_536
  # device: queries per step; memory for scores is about query_chunk * chunk_size * 4 bytes.
  c.query_chunk = 1024
  # device: jax.lax.approx_max_k per chunk instead of exact top_k (a TPU speed-up; exact on
  # CPU). Off keeps device and faiss 'flat_ip' results the same.
  c.approx = False
  # device, approx=True: approx_max_k's expected recall.
  c.recall_target = 0.95
  # faiss: the index kind: 'flat_ip' (exact), 'hnsw' or 'ivf_flat' (approximate).
  c.faiss_kind = 'flat_ip'
  return c
