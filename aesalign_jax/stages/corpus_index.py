"""The reference model's view of the corpus: its index (image embeddings, built once, resumable
and shared by mining and evaluation) and the aesthetic scores of corpus rows."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from aesalign_jax import aesthetics, embed, mining
from aesalign_jax.aesthetics import iap
from aesalign_jax.models import hf
from aesalign_jax.retrieval import index as retrieval_index
from input_pipeline import corpus as corpus_lib
from input_pipeline import images as images_lib


def embed_batch_size(mesh, n: int) -> int:
  """Images per corpus-embedding call: ~512, a multiple of every device of the mesh (so of
  those the batch is split over), no larger than the corpus needs."""
  unit = 64 * mesh.size
  return unit * max(1, min(-(-512 // unit), -(-n // unit)))


def indexed_corpus(ctx, cfg, params) -> corpus_lib.SubsetCorpus:
  """The first config.mine.corpus_size rows of the corpus (0 = all) with the reference model's
  embeddings (`.embeddings`, [N, D] float32): config.mine.embeddings_dir (whose ids must be
  corpus ids; others are dropped and counted), else built under workdir/mine/index over the
  mesh. Images that fail to decode while the index is built are counted, named in
  workdir/mine/unreadable.jsonl (so a resumed build still knows them) and left out."""
  config, corpus = ctx.config, ctx.corpus
  size = config.mine.corpus_size
  n = len(corpus) if size <= 0 else min(len(corpus), size)
  corpus_ids = np.asarray(corpus.ids[:n]).astype(str)
  position = _unique_positions(corpus_ids, config.data)
  unreadable_log = os.path.join(ctx.workdir, 'mine', 'unreadable.jsonl')
  unreadable = {}   # id -> error

  def note(p, error):
    image_id = str(corpus_ids[p])
    if image_id not in unreadable:
      unreadable[image_id] = error
      if jax.process_index() == 0:
        with open(unreadable_log, 'a', encoding='utf-8') as f:
          f.write(json.dumps({'id': image_id, 'error': error}) + '\n')

  reader = corpus.reader(on_invalid=note)
  summary = {'corpus_records': n} if corpus.decodes_files else {}
  if config.mine.embeddings_dir:
    embeddings, ids, dropped = _stored_index(config.mine.embeddings_dir, cfg, position,
                                             corpus_ids)
    if corpus.decodes_files:
      summary['index_ids_not_in_corpus'] = dropped
  else:
    folder = os.path.join(ctx.workdir, 'mine', 'index')
    retrieval_index.embed_corpus(
        retrieval_index.image_embed_fn(cfg, params, mesh=ctx.mesh, rules=config.rules),
        lambda rows: reader(rows)[0], corpus_ids, folder,
        fingerprint=retrieval_index.fingerprint_params(params),
        batch_size=embed_batch_size(ctx.mesh, n), mesh=ctx.mesh, rules=config.rules)
    embeddings, ids = retrieval_index.load_index(folder, dtype=np.float32)
    ids = ids.astype(str)
    if os.path.exists(unreadable_log):   # found by an earlier, interrupted build
      with open(unreadable_log, encoding='utf-8') as f:
        for line in f:
          entry = json.loads(line)
          unreadable.setdefault(entry['id'], entry['error'])
    keep = np.asarray([i not in unreadable for i in ids.tolist()], bool)
    if unreadable:
      logging.warning('corpus: %d unreadable images left out of mining (%s), e.g. %s',
                      len(unreadable), unreadable_log, list(unreadable.values())[:5])
    embeddings, ids = embeddings[keep], ids[keep]
  if corpus.decodes_files:
    summary['corpus_unreadable'] = len(unreadable)
    summary['corpus_indexed'] = len(ids)
  rows = np.asarray([position[i] for i in ids.tolist()], np.int64)
  out = corpus_lib.SubsetCorpus(corpus, rows, summary, images=reader)
  out.embeddings = embeddings
  return out


def _unique_positions(ids: np.ndarray, data) -> dict[str, int]:
  """id -> row; refuses a corpus whose ids repeat (D_po records name images by id)."""
  position: dict[str, int] = {}
  for p, image_id in enumerate(ids.tolist()):
    if position.setdefault(image_id, p) != p:
      raise ValueError(f'corpus config.data.path={data.path!r}: id {image_id!r} names records '
                       f'{position[image_id]} and {p}; D_po records name images by id, so ids '
                       'must be unique')
  return position


def _stored_index(folder: str, cfg, position: dict, corpus_ids: np.ndarray):
  """(embeddings, ids, ids dropped) of an existing index, keeping the corpus's ids only."""
  embeddings, ids = retrieval_index.load_index(folder, dtype=np.float32)
  if embeddings.shape[1] != cfg.embed_dim:
    raise ValueError(f'config.mine.embeddings_dir={folder!r} holds {embeddings.shape[1]}-wide '
                     f'embeddings; the reference model makes {cfg.embed_dim}-wide ones (an '
                     'index of another model)')
  ids = ids.astype(str)
  known = np.asarray([i in position for i in ids.tolist()], bool)
  if not known.any():
    raise ValueError(f'config.mine.embeddings_dir={folder!r}: none of its {len(ids)} ids is a '
                     f'record id of the corpus config.data (ids such as '
                     f'{corpus_ids[:3].tolist()})')
  if not known.all():
    logging.warning('%s: %d of %d ids are not in the corpus and are left out, e.g. %s', folder,
                    int((~known).sum()), len(ids), ids[~known][:5].tolist())
  return embeddings[known], ids[known], int((~known).sum())


def score_loaded(score: Callable, corpus: corpus_lib.Corpus, rows) -> np.ndarray:
  """score(images) for rows whose image loads; NaN for the others (mining drops them)."""
  images, valid = corpus.images(np.asarray(rows))
  out = np.full(len(valid), np.nan)
  if valid.any():
    out[valid] = np.asarray(score(images[valid]), np.float64)
  return out


def aesthetic_scores_fn(aesthetics_config, iap_weights: Optional[str],
                        corpus: corpus_lib.SubsetCorpus) -> Callable:
  """Corpus rows -> aesthetic scores (NaN: an image that does not load), by the configured
  scorer: the IAP head on aesthetics.iap.clip_folder's image embeddings, or on the reference
  model's own (corpus.embeddings) when that is empty; or the low-level scorer."""
  if not iap_weights:
    scorer = aesthetics.make_scorer(aesthetics_config)
    return mining.RowScores(lambda rows: score_loaded(scorer.score, corpus, rows))
  head, activation = iap.load_params(iap_weights)
  width = int(head['dense_0.kernel'].shape[0])
  clip_folder = aesthetics_config.iap.get('clip_folder', '')
  if not clip_folder:
    if width != corpus.embeddings.shape[1]:
      raise ValueError(f'config.aesthetics.iap.weights={iap_weights!r} reads {width}-wide '
                       f'embeddings, the model being aligned makes '
                       f'{corpus.embeddings.shape[1]}-wide ones: set '
                       'config.aesthetics.iap.clip_folder to the CLIP the head was trained on')
    return lambda rows: np.asarray(iap.apply(head, corpus.embeddings[rows],
                                             activation=activation))
  iap_cfg, iap_params = hf.load_hf_folder(clip_folder)
  if iap_cfg.embed_dim != width:
    raise ValueError(f'config.aesthetics.iap.weights={iap_weights!r} reads {width}-wide '
                     f'embeddings, config.aesthetics.iap.clip_folder={clip_folder!r} makes '
                     f'{iap_cfg.embed_dim}-wide ones')
  iap_clip = embed.Embedder(iap_cfg, iap_params, None)
  predict = jax.jit(lambda e: iap.apply(head, e, activation=activation))

  def score(images):
    if images.shape[1:3] != (iap_cfg.image_size, iap_cfg.image_size):   # e.g. a 336 px CLIP
      images = np.stack([images_lib.resize_and_center_crop(im, iap_cfg.image_size)
                         for im in images])
    return np.asarray(predict(iap_clip.images(images)))

  return mining.RowScores(lambda rows: score_loaded(score, corpus, rows))
