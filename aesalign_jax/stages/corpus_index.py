"""The reference model's view of the corpus: its index (image embeddings, built once, resumable
and shared by mining and evaluation) and the aesthetic scores of corpus rows."""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from aesalign_jax import aesthetics, embed, mining, multihost, sharding
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


def index_shard_size(batch: int, n: int) -> int:
  """Rows per index shard: about n / 16 (so that several processes each get shards to embed),
  at most ~50,000, a multiple of `batch` (so the embedding batches, and with them every
  embedding's bits, are the same however the shards are cut). Depends on n only, not on the
  number of processes: an index is resumable by a run with another process count."""
  return batch * max(1, min(50_000 // batch, -(-n // (16 * batch))))


def embed_into(ctx, cfg, params, images, ids, folder: str) -> None:
  """Builds (or finishes) the index of `ids` under `folder` over the mesh; with several
  processes each embeds its own shards on its own devices (retrieval.embed_corpus), with the
  same per-device batches as one process over the whole mesh."""
  config, processes = ctx.config, jax.process_count()
  batch = embed_batch_size(ctx.mesh, len(ids))
  mesh = sharding.local_mesh(ctx.mesh)
  retrieval_index.embed_corpus(
      retrieval_index.image_embed_fn(cfg, params, mesh=mesh, rules=config.rules),
      images, ids, folder, fingerprint=retrieval_index.fingerprint_params(params),
      shard_size=index_shard_size(batch, len(ids)), batch_size=batch // processes, mesh=mesh,
      rules=config.rules)


def indexed_corpus(ctx, cfg, params, *, build: bool = True) -> corpus_lib.SubsetCorpus:
  """The first config.mine.corpus_size rows of the corpus (0 = all) with the reference model's
  embeddings (`.embeddings`, [N, D] float32, a retrieval.IndexRows: rows are read from the
  index files when indexed, so no process holds the whole matrix): config.mine.embeddings_dir
  (whose ids must be corpus ids; others are dropped and counted), else built under
  workdir/mine/index over the mesh (on several processes, each its own shards). Images that fail to decode while the index is built are counted, named in
  workdir/mine/unreadable.jsonl (so a resumed build still knows them) and left out.
  build=False reads a finished run's index as it is and writes nothing (the search server):
  ValueError when it is missing, incomplete or was built by another model."""
  config, corpus = ctx.config, ctx.corpus
  size = config.mine.corpus_size
  n = len(corpus) if size <= 0 else min(len(corpus), size)
  corpus_ids = np.asarray(corpus.ids[:n]).astype(str)
  position = _unique_positions(corpus_ids, config.data)
  unreadable_log = os.path.join(ctx.workdir, 'mine', 'unreadable.jsonl')
  # Several processes: each logs what its own shards met, process i > 0 to its own file.
  own_log = (unreadable_log if jax.process_index() == 0 else
             unreadable_log.replace('.jsonl', f'.process{jax.process_index()}.jsonl'))
  unreadable = {}   # id -> error

  def note(p, error):
    image_id = str(corpus_ids[p])
    if image_id not in unreadable:
      unreadable[image_id] = error
      if build:
        with open(own_log, 'a', encoding='utf-8') as f:
          f.write(json.dumps({'id': image_id, 'error': error}) + '\n')

  reader = corpus.reader(on_invalid=note if build else None)
  summary = {'corpus_records': n} if corpus.decodes_files else {}
  if config.mine.embeddings_dir:
    embeddings, ids, dropped = _stored_index(config.mine.embeddings_dir, cfg, position,
                                             corpus_ids)
    if corpus.decodes_files:
      summary['index_ids_not_in_corpus'] = dropped
  else:
    folder = os.path.join(ctx.workdir, 'mine', 'index')
    if build:
      embed_into(ctx, cfg, params, lambda rows: reader(rows)[0], corpus_ids, folder)
    else:
      check_index_of(folder, params, 'the mine stage (--mode=mine)')
    embeddings = retrieval_index.open_index(folder)   # rows read on demand, never all
    ids = embeddings.ids.astype(str)
    for image_id, error in multihost.concat_shares(sorted(unreadable.items())):
      unreadable.setdefault(image_id, error)   # those another process's shards met
    logs = sorted(glob.glob(unreadable_log.replace('.jsonl', '*.jsonl')))
    for log in logs:   # found by an earlier, interrupted build (by any process)
      with open(log, encoding='utf-8') as f:
        for line in f:
          entry = json.loads(line)
          unreadable.setdefault(entry['id'], entry['error'])
    keep = np.asarray([i not in unreadable for i in ids.tolist()], bool)
    if unreadable:
      logging.warning('corpus: %d unreadable images left out of mining (%s), e.g. %s',
                      len(unreadable), unreadable_log, list(unreadable.values())[:5])
      embeddings, ids = embeddings.take(keep), ids[keep]
  if corpus.decodes_files:
    summary['corpus_unreadable'] = len(unreadable)
    summary['corpus_indexed'] = len(ids)
  rows = np.asarray([position[i] for i in ids.tolist()], np.int64)
  out = corpus_lib.SubsetCorpus(corpus, rows, summary, images=reader)
  out.embeddings = embeddings
  return out


def check_index_of(folder: str, params, stage: str) -> None:
  """Refuses (ValueError) an index folder that is missing, incomplete, or whose manifest names
  another model than `params` (fingerprint_params), naming the stage that writes it."""
  try:
    manifest = retrieval_index.read_manifest(folder)
  except retrieval_index.IndexMismatchError as e:
    raise ValueError(f'{e}; rerun {stage}') from e
  if manifest is None or not manifest.get('complete'):
    raise ValueError(f'no finished corpus index in {folder}: run {stage} first')
  if manifest.get('fingerprint') != retrieval_index.fingerprint_params(params):
    raise ValueError(f'the corpus index {folder} was built by another model than the one in '
                     f'this workdir: rerun {stage}')


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
  embeddings = retrieval_index.open_index(folder)
  ids = embeddings.ids
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
  if known.all():
    return embeddings, ids, 0
  return embeddings.take(known), ids[known], int((~known).sum())


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
