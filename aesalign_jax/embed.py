"""Batched, jitted embedding of images and texts with one model (for scoring and retrieval).

    embedder = Embedder(cfg, params, tokenizer)
    img = embedder.images(uint8 [N, S, S, 3])     # float32 [N, D], unit vectors
    txt = embedder.texts(['a red circle', ...])    # float32 [M, D]
    scores = embedder.group_scores(texts, images_per_group)   # [G, N] cosine similarities
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from aesalign_jax.models import clip
from aesalign_jax.retrieval import index


class Embedder:

  def __init__(self, cfg: clip.ClipConfig, params, tokenizer, *, batch_size: int = 256):
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.batch_size = batch_size
    self._image_fn = index.image_embed_fn(cfg, params)
    text_fn = jax.jit(lambda p, ids, eos: clip.bind(cfg, p).encode_text(ids, eos))
    self._text_fn = lambda ids, eos: text_fn(params, ids, eos)

  def _batched(self, fn, n: int, *arrays) -> np.ndarray:
    out = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      pad = self.batch_size - len(chunk[0])   # one compiled shape for every batch
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      out.append(np.asarray(fn(*chunk))[:self.batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, self.cfg.embed_dim), np.float32)

  def images(self, images_uint8: np.ndarray) -> np.ndarray:
    return self._batched(self._image_fn, len(images_uint8), np.asarray(images_uint8))

  def texts(self, texts: Sequence[str]) -> np.ndarray:
    tok = self.tokenizer(list(texts))
    return self._batched(self._text_fn, len(texts), np.asarray(tok['ids'], np.int32),
                         np.asarray(tok['eos_index'], np.int32))

  def group_scores(self, texts: Sequence[str], images_per_group: np.ndarray) -> np.ndarray:
    """Cosine similarity of text g to each of its images: images uint8 [G, N, S, S, 3]."""
    g, n = images_per_group.shape[:2]
    img = self.images(images_per_group.reshape((g * n,) + images_per_group.shape[2:]))
    return np.einsum('gd,gnd->gn', self.texts(texts), img.reshape(g, n, -1))
