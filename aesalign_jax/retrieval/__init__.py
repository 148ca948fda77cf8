"""Retrieval: corpus embeddings on disk, top-K search on device, and a FAISS backend.

  index.py        embed_corpus (sharded batches -> shard files + manifest, resumable),
                  load_index / iter_shards, image_embed_fn, fingerprint_params
  search.py       topk / search_ids: exact (or approx_max_k) top-K in chunks, over a mesh
  faiss_index.py  FaissIndex (optional extra: pip install aesalign[faiss])
"""

import ml_collections

from aesalign_jax.retrieval.index import (  # noqa: F401
    IndexMismatchError, embed_corpus, fingerprint_params, image_embed_fn, iter_shards,
    load_index, read_manifest)
from aesalign_jax.retrieval.search import search_ids, topk  # noqa: F401


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the retrieval section (config.retrieval)."""
  c = ml_collections.ConfigDict()
  # Corpus rows per shard file of the embedding index (a resumed run redoes at most one).
  c.shard_size = 50_000
  # Images per embedding call (a multiple of the devices on the mesh's batch axes).
  c.batch_size = 256
  # Storage dtype of the embeddings: 'float32' or 'float16' (half the disk and transfer).
  c.dtype = 'float32'
  # 'device': topk() on the accelerators; 'faiss': a FaissIndex on the host (huge corpora).
  c.backend = 'device'
  # Corpus rows scored per device step, and queries per step: device memory for scores is
  # about query_chunk * chunk_size * 4 bytes.
  c.chunk_size = 65_536
  c.query_chunk = 1024
  # jax.lax.approx_max_k per chunk instead of exact top_k (a TPU speed-up; exact on CPU).
  c.approx = False
  c.recall_target = 0.95
  # FAISS index kind when backend='faiss': 'flat_ip' (exact), 'hnsw' or 'ivf_flat'.
  c.faiss_kind = 'flat_ip'
  return c
