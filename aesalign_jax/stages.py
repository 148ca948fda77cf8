"""The stages of the method (DESIGN.md data flow), each cached in the workdir.

A stage writes its outputs under workdir/<stage>/ and a `stage.json` with a fingerprint of the
config sections it read; a rerun with the same fingerprint skips it, a changed config redoes it.
`run(mode, config, workdir)` is what main.py calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Callable

import dataclasses
import functools
from typing import Optional

import jax
import numpy as np
from absl import logging

from aesalign_jax import aesthetics, checkpointing, embed, mining, models, rephrase, sharding
from aesalign_jax import train
from aesalign_jax.aesthetics import iap, lowlevel, world_iap
from aesalign_jax.retrieval import index as retrieval_index
from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax.models import clip, hf
from input_pipeline import images as images_lib
from input_pipeline import pipeline, preference
from input_pipeline import world as world_lib

# Stages in the order of the data flow (--mode=all runs them all).
ORDER = ('tokenizer', 'pretrain', 'mine', 'align', 'eval', 'export')


def _fingerprint(sections: dict) -> str:
  text = json.dumps(sections, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


_REPORTED: set = set()


def cached_stage(name: str, workdir: str, sections: dict, fn: Callable[[str], dict]) -> dict:
  """Runs fn(stage_dir) unless stage.json there has the same config fingerprint."""
  stage_dir = os.path.join(workdir, name)
  marker = os.path.join(stage_dir, 'stage.json')
  fingerprint = _fingerprint(sections)
  if os.path.exists(marker):
    with open(marker, encoding='utf-8') as f:
      done = json.load(f)
    if done.get('fingerprint') == fingerprint:
      if (marker, fingerprint) not in _REPORTED:   # later stages ask again for their inputs
        logging.info('stage %s: done before (%s), skipped', name, marker)
        _REPORTED.add((marker, fingerprint))
      return done['summary']
    logging.info('stage %s: config changed since the last run, redoing it', name)
  started = os.path.join(stage_dir, 'stage.started.json')
  if os.path.exists(started):
    with open(started, encoding='utf-8') as f:
      if json.load(f).get('fingerprint') != fingerprint:
        # Outputs and checkpoints of another config must not be resumed from.
        logging.info('stage %s: clearing %s (written with another config)', name, stage_dir)
        shutil.rmtree(stage_dir)
  os.makedirs(stage_dir, exist_ok=True)
  if not os.path.exists(started):
    with open(started, 'w', encoding='utf-8') as f:
      json.dump({'fingerprint': fingerprint}, f)
  start = time.time()
  logging.info('stage %s: started', name)
  summary = fn(stage_dir)
  summary['seconds'] = round(time.time() - start, 2)
  tmp = marker + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump({'fingerprint': fingerprint, 'summary': summary}, f, indent=2)
  os.replace(tmp, marker)   # the marker appears only once the stage's outputs are complete
  _REPORTED.add((marker, fingerprint))
  logging.info('stage %s: finished in %.1f s: %s', name, summary['seconds'], summary)
  return summary


def tokenizer_stage(config, workdir: str) -> str:
  """The tokenizer folder: config.tokenizer.folder, else a BPE trained on the world's captions."""
  tok = config.tokenizer
  if tok.folder:
    return tok.folder
  if real_data(config):
    raise ValueError(f'config.tokenizer.folder is empty: a tokenizer is trained only on the '
                     f'embedded world\'s captions, not on config.data.source='
                     f'{config.data.source!r}; name a tokenizer folder (the checkpoint\'s)')

  def train(stage_dir):
    world = world_lib.World(config.world)
    train_ids = world.split_indices('train')
    captions = world.captions(train_ids[:min(len(train_ids), 50_000)])
    trained = tokenizer_lib.train_bpe(captions, vocab_size=tok.vocab_size, folder=stage_dir,
                                      context_length=tok.context_length,
                                      min_frequency=tok.min_frequency)
    return {'vocab_size': trained.vocab_size, 'captions': len(captions),
            'context_length': trained.context_length}

  cached_stage('tokenizer', workdir, {'tokenizer': tok.to_dict(), 'world': config.world.to_dict()},
               train)
  return os.path.join(workdir, 'tokenizer')


def _model_with_tokenizer(config, tok) -> tuple:
  """The ClipConfig for config.model, with the vocabulary and end token of the tokenizer."""
  cfg = models.clip_config(config.model)
  if not config.model.hf_folder:
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f'the tokenizer has {tok.vocab_size} tokens, more than the model '
                       f'vocabulary {cfg.vocab_size} (config.model.overrides.vocab_size)')
    cfg = dataclasses.replace(cfg, eos_token_id=tok.eos_token_id)
  return cfg


def world_pairs_pipeline(config, world, tok, *, seed: int):
  """Image-caption batches from the world's training split, tokenised."""
  per_process = config.pretrain.batch_size // jax.process_count()
  return pipeline.make_batched_source_pipeline(
      world.split_range('train'), world.batch, batch_size=per_process, seed=seed,
      tokenize=tok, worker_count=config.data.worker_count)


def real_data(config) -> bool:
  """Whether the image-caption pairs and the mining corpus come from config.data (a folder,
  JSONL, CSV or tfds corpus) rather than the embedded world."""
  return config.data.source != 'world'


# The keys of config.data that decide which records a corpus source holds (its fingerprint);
# the others (workers, buffers) only change how fast they are read.
_CORPUS_KEYS = ('source', 'path', 'root', 'image_size', 'max_pixels', 'tfds_name',
                'tfds_split', 'tfds_data_dir', 'caption_key', 'label_key', 'caption_template')


def _corpus_sections(config) -> dict:
  """The config (and corpus file) a stage's data come from, for its fingerprint."""
  if not real_data(config):
    return {'world': config.world.to_dict()}
  data = {k: config.data[k] for k in _CORPUS_KEYS}
  if config.data.source in ('jsonl', 'csv'):
    data['file'] = _fingerprint_file(config.data.path)
  return {'data': data}


_SOURCES: dict = {}


def corpus_source(config):
  """The source config.data names (input_pipeline.pipeline.make_source), built once per
  process and corpus file: indexing a large JSON Lines file checks every image path."""
  key = json.dumps(_corpus_sections(config), sort_keys=True, default=str)
  if key not in _SOURCES:
    _SOURCES[key] = pipeline.make_source(config.data)
    logging.info('corpus: %s (%s)', _SOURCES[key], _SOURCES[key].stats())
  return _SOURCES[key]


def corpus_pairs_pipeline(config, source, tok, *, batch_size: int, seed: int):
  """Tokenised image-caption batches of `batch_size` (this process's share) from a corpus
  source: sharded over processes, shuffled, repeated, undecodable images dropped and counted
  (input_pipeline.pipeline.make_pipeline), read with config.data's workers and buffers."""
  kwargs = pipeline.pipeline_kwargs(config.data)
  # Training reads a stream that never ends, of full batches of uint8 images (the train step
  # normalises on device), whatever the data section says for other uses.
  kwargs.update(batch_size=batch_size, seed=seed, num_epochs=None, normalize=False,
                drop_remainder=True)
  return pipeline.make_pipeline(source, tokenize=tok, **kwargs)


def _with_numerics(cfg, model_config):
  """A checkpoint's ClipConfig with the compute dtype, remat and attention of config.model
  (a Hugging Face config.json holds shapes only)."""
  return dataclasses.replace(cfg, dtype=model_config.dtype, remat=bool(model_config.remat),
                             attention=model_config.get('attention', 'auto'))


def _save_trained(kind: str, result, cfg, tok, out: str) -> dict:
  """Writes a finished run's model (HF folder + tokenizer); returns its last logged metrics.
  A preempted run exits 0 instead, so the scheduler's restart resumes it."""
  if result.status == 'preempted':
    raise Preempted(f'{kind} preempted at step {result.step}; rerun to resume')
  if jax.process_index() == 0:
    hf.save_hf_folder(cfg, jax.device_get(result.params), out)
    tok.save(out)
  return result.history[-1] if result.history else {}


def pretrain_stage(config, workdir: str) -> str:
  """Contrastive pretraining (from scratch, or from config.model.hf_folder); returns the HF
  folder of the result, which every later stage starts from."""
  tok_folder = tokenizer_stage(config, workdir)
  out = os.path.join(workdir, 'pretrain', 'model')

  def run_pretrain(stage_dir):
    tok = tokenizer_lib.ClipTokenizer.from_folder(tok_folder)
    cfg = _model_with_tokenizer(config, tok)
    if config.pretrain.steps == 0:   # the checkpoint itself is the PT model
      if not config.model.hf_folder:
        raise ValueError('config.pretrain.steps=0 needs config.model.hf_folder (the model to '
                         'use as it is)')
      if jax.process_index() == 0:
        _, params = hf.load_hf_folder(config.model.hf_folder)
        hf.save_hf_folder(cfg, params, out)
        tok.save(out)
      return {'steps': 0, 'model': out, 'copied_from': config.model.hf_folder}
    _, params = models.load_or_init(config.model, config.seed)
    if not config.model.hf_folder:
      params = clip.init_params(cfg, config.seed)
    mesh = sharding.make_mesh(config.mesh)
    per_process = config.pretrain.batch_size // jax.process_count()
    if real_data(config):
      source = corpus_source(config)
      pairs = iter(corpus_pairs_pipeline(config, source, tok, batch_size=per_process,
                                         seed=config.seed))
    else:
      world = world_lib.World(config.world)
      pairs = iter(world_pairs_pipeline(config, world, tok, seed=config.seed))
    result = train.fit(kind='pretrain', c=config.pretrain, model_cfg=cfg, init_params=params,
                       iterators={'pairs': pairs}, mesh=mesh, rules=config.rules,
                       workdir=stage_dir, seed=config.seed)
    last = _save_trained('pretrain', result, cfg, tok, out)
    summary = {'steps': result.step, 'final_loss': float(last.get('loss', float('nan'))),
               'model': out}
    if real_data(config):
      summary['corpus'] = source.stats()
    return summary

  cached_stage('pretrain', workdir, {**{k: config[k].to_dict() for k in
                                        ('model', 'tokenizer', 'pretrain', 'mesh')},
                                     **_corpus_sections(config)}, run_pretrain)
  return out


def _load_model_folder(folder: str):
  cfg, params = hf.load_hf_folder(folder)
  return cfg, params, tokenizer_lib.ClipTokenizer.from_folder(folder)


def aesthetic_stage(config, workdir: str) -> Optional[str]:
  """The aesthetic model for re-ranking: config.aesthetics.iap.weights, or (world) an IAP head
  trained on simulated ratings over the pretrained model's embeddings; its report compares it
  with the low-level score. Returns the weights file (None for the low-level scorer)."""
  if config.aesthetics.kind == 'lowlevel':
    return None
  if config.aesthetics.iap.weights:
    return config.aesthetics.iap.weights
  if real_data(config):
    raise ValueError('config.aesthetics.iap.weights is empty: an IAP head is trained only on '
                     'the embedded world\'s simulated ratings; give trained weights (README '
                     '"Real runs") or set config.aesthetics.kind=lowlevel')
  model_folder = pretrain_stage(config, workdir)
  out = os.path.join(workdir, 'aesthetic', 'iap.safetensors')

  def run_iap(stage_dir):
    cfg, params, tok = _load_model_folder(model_folder)
    embedder = embed.Embedder(cfg, params, tok)
    world = world_lib.World(config.world)
    head, report = world_iap.train_world_iap(world, embedder.images, config.world_iap)
    iap.save_params(out, head)
    logging.info('IAP head on world ratings: Spearman vs ground truth %.3f (low-level score '
                 '%.3f) on %d held-out images', report['iap_spearman_vs_truth'],
                 report['lowlevel_spearman_vs_truth'], report['test_images'])
    return report

  cached_stage('aesthetic', workdir, {'model': _fingerprint_file(model_folder),
                                      'world_iap': config.world_iap.to_dict(),
                                      'world': config.world.to_dict()}, run_iap)
  return out


class WorldTruth:
  """Ground truth for corpus rows whose ids are world indices (mining summary)."""

  def __init__(self, world, ids):
    self.world, self.index = world, np.asarray([int(i) for i in ids])

  def aesthetic(self, rows):
    return self.world.aesthetic(self.index[rows])

  def relevant(self, query, rows):
    q = self._queries[query]
    return np.asarray(self.world.is_relevant(q, self.index[rows]))

  @functools.cached_property
  def _queries(self):
    return {q.text: q for q in self.world.queries}


def corpus_index(config, workdir: str, cfg, params) -> tuple[np.ndarray, np.ndarray]:
  """The reference model's corpus embeddings: config.mine.embeddings_dir, else built (and
  resumed shard by shard) under workdir/mine/index from the world's training images."""
  if config.mine.embeddings_dir:
    return retrieval_index.load_index(config.mine.embeddings_dir, dtype=np.float32)
  world = world_lib.World(config.world)
  rows = world.split_indices('train')[:config.mine.corpus_size]
  folder = os.path.join(workdir, 'mine', 'index')
  retrieval_index.embed_corpus(
      retrieval_index.image_embed_fn(cfg, params), lambda r: world.render_batch(rows[r]),
      rows.astype(str), folder, fingerprint=retrieval_index.fingerprint_params(params),
      batch_size=512)
  return retrieval_index.load_index(folder, dtype=np.float32)


@dataclasses.dataclass
class MiningCorpus:
  """What mining reads of its corpus. Row r of `embeddings` (the reference model's, [N, D])
  is the image `ids[r]`; images(rows) -> (uint8 [n, S, S, 3], valid bool [n]) loads rows'
  images (valid False: an image that fails to decode). truth: the world's ground truth, when
  the corpus and the queries are the world's; summary: counts for the stage summary."""
  embeddings: np.ndarray
  ids: np.ndarray
  images: Callable
  truth: Optional[WorldTruth] = None
  summary: dict = dataclasses.field(default_factory=dict)


def world_mining_corpus(config, workdir: str, cfg, params) -> MiningCorpus:
  world = world_lib.World(config.world)
  corpus, ids = corpus_index(config, workdir, cfg, params)
  images = lambda rows: (world.render_batch(ids[rows].astype(int)), np.ones(len(rows), bool))
  truth = None if config.mine.queries_path else WorldTruth(world, ids)
  return MiningCorpus(corpus, ids, images, truth)


def _embed_batch_size(mesh, n: int) -> int:
  """Images per corpus-embedding call: ~512, a multiple of every device of the mesh (so of
  those the batch is split over), no larger than the corpus needs."""
  unit = 64 * mesh.size
  return unit * max(1, min(-(-512 // unit), -(-n // unit)))


def real_mining_corpus(config, workdir: str, cfg, params) -> MiningCorpus:
  """The corpus of config.data as a MiningCorpus: its index is config.mine.embeddings_dir
  (whose ids must be the corpus record ids; others are dropped and counted) or built under
  workdir/mine/index over the mesh. Images that fail to decode while the index is built are
  counted, named in workdir/mine/unreadable.jsonl (so a resumed build still knows them) and
  left out of the corpus."""
  source = corpus_source(config)
  source_ids = np.asarray(pipeline.source_ids(source), dtype=str)
  position = {}
  for p, image_id in enumerate(source_ids.tolist()):
    if position.setdefault(image_id, p) != p:
      raise ValueError(f'corpus config.data.path={config.data.path!r}: id {image_id!r} names '
                       f'records {position[image_id]} and {p}; D_po records name images by id, '
                       'so ids must be unique')
  unreadable_log = os.path.join(workdir, 'mine', 'unreadable.jsonl')
  unreadable = {}   # id -> error

  def note(p, error):
    image_id = str(source_ids[p])
    if image_id not in unreadable:
      unreadable[image_id] = error
      if jax.process_index() == 0:
        with open(unreadable_log, 'a', encoding='utf-8') as f:
          f.write(json.dumps({'id': image_id, 'error': error}) + '\n')

  reader = pipeline.RecordImages(source, threads=config.data.read_threads, on_invalid=note)
  summary = {'corpus_records': len(source_ids)}
  if config.mine.embeddings_dir:
    embeddings, ids = retrieval_index.load_index(config.mine.embeddings_dir, dtype=np.float32)
    if embeddings.shape[1] != cfg.embed_dim:
      raise ValueError(f'config.mine.embeddings_dir={config.mine.embeddings_dir!r} holds '
                       f'{embeddings.shape[1]}-wide embeddings; the reference model makes '
                       f'{cfg.embed_dim}-wide ones (an index of another model)')
    ids = ids.astype(str)
    known = np.asarray([i in position for i in ids.tolist()], bool)
    if not known.any():
      raise ValueError(f'config.mine.embeddings_dir={config.mine.embeddings_dir!r}: none of its '
                       f'{len(ids)} ids is a record id of the corpus config.data '
                       f'({source!r}, ids such as {source_ids[:3].tolist()})')
    if not known.all():
      logging.warning('%s: %d of %d ids are not in the corpus and are left out, e.g. %s',
                      config.mine.embeddings_dir, int((~known).sum()), len(ids),
                      ids[~known][:5].tolist())
    summary['index_ids_not_in_corpus'] = int((~known).sum())
    embeddings, ids = embeddings[known], ids[known]
  else:
    folder = os.path.join(workdir, 'mine', 'index')
    mesh = sharding.make_mesh(config.mesh)
    retrieval_index.embed_corpus(
        retrieval_index.image_embed_fn(cfg, params, mesh=mesh, rules=config.rules),
        lambda rows: reader(rows)[0], source_ids, folder,
        fingerprint=retrieval_index.fingerprint_params(params),
        batch_size=_embed_batch_size(mesh, len(source_ids)), mesh=mesh, rules=config.rules)
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
  summary['corpus_unreadable'] = len(unreadable)
  summary['corpus_indexed'] = len(ids)
  positions = np.asarray([position[i] for i in ids.tolist()], np.int64)
  return MiningCorpus(embeddings, ids, lambda rows: reader(positions[np.asarray(rows)]),
                      summary=summary)


def _score_loaded(score: Callable, corpus: MiningCorpus, rows) -> np.ndarray:
  """score(images) for rows whose image loads; NaN for the others (mining drops them)."""
  images, valid = corpus.images(np.asarray(rows))
  out = np.full(len(valid), np.nan)
  if valid.any():
    out[valid] = np.asarray(score(images[valid]), np.float64)
  return out


def aesthetic_scores_fn(config, iap_weights: Optional[str], corpus: MiningCorpus) -> Callable:
  """Corpus rows -> aesthetic scores (NaN: an image that does not load), by the configured
  scorer: the IAP head on config.aesthetics.iap.clip_folder's image embeddings, or on the
  reference model's own (the corpus index) when that is empty; or the low-level scorer."""
  if not iap_weights:
    scorer = (aesthetics.make_scorer(config.aesthetics) if real_data(config)
              else lowlevel.LowLevelScorer())
    return mining.RowScores(lambda rows: _score_loaded(scorer.score, corpus, rows))
  head, activation = iap.load_params(iap_weights)
  width = int(head['dense_0.kernel'].shape[0])
  clip_folder = config.aesthetics.iap.get('clip_folder', '')
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

  return mining.RowScores(lambda rows: _score_loaded(score, corpus, rows))


def mining_queries(config) -> list[str]:
  """config.mine.queries_path's queries, else the world's mining queries; the first
  config.mine.max_queries of them when that is > 0."""
  if config.mine.queries_path:
    queries = mining.load_queries(config.mine.queries_path)
  else:
    queries = [q.text for q in world_lib.World(config.world).mining_queries]
  return queries[:config.mine.max_queries] if config.mine.max_queries > 0 else queries


def mine_stage(config, workdir: str) -> str:
  """Rephrase, retrieve, re-rank and write D_po (aesalign_jax/mining.py); returns its path."""
  model_folder = pretrain_stage(config, workdir)
  iap_weights = aesthetic_stage(config, workdir)
  out = os.path.join(workdir, 'mine', 'dpo.arrayrecord')
  u, v = config.align.u, config.align.v
  mining.validate(config.mine, u, v)

  def run_mine(stage_dir):
    cfg, params, tok = _load_model_folder(model_folder)
    cfg = _with_numerics(cfg, config.model)
    corpus = (real_mining_corpus if real_data(config) else world_mining_corpus)(
        config, workdir, cfg, params)
    queries = mining_queries(config)
    with rephrase.make_rephraser(config.rephrase,
                                 os.path.join(stage_dir, 'rephrase_cache.jsonl')) as rephraser:
      rephrased = rephraser.rephrase_batch(queries)
    embedder = embed.Embedder(cfg, params, tok)
    result = mining.mine(queries, rephrased.texts, text_embed=embedder.texts,
                         corpus=corpus.embeddings, ids=corpus.ids,
                         aesthetic_fn=aesthetic_scores_fn(config, iap_weights, corpus),
                         c=config.mine, u=u, v=v, truth=corpus.truth)
    preference.write_groups(out, result.groups)
    summary = {**result.summary, **corpus.summary, 'rephrase': rephrased.summary(),
               'dpo_path': out}
    with open(os.path.join(stage_dir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
    _print_mining_summary(summary)
    return summary

  sections = {'model': _fingerprint_file(model_folder),
              'iap': iap_weights and _fingerprint_file(iap_weights),
              'mine': config.mine.to_dict(), 'rephrase': config.rephrase.to_dict(),
              'uv': [u, v], **_corpus_sections(config)}
  if config.mine.queries_path:
    sections['queries'] = _fingerprint_file(config.mine.queries_path)
  if iap_weights and config.aesthetics.iap.get('clip_folder'):
    sections['iap_clip'] = _fingerprint_file(config.aesthetics.iap.clip_folder)
  if real_data(config):
    sections['aesthetics'] = config.aesthetics.to_dict()
    sections['numerics'] = [config.model.dtype, config.model.get('attention', 'auto')]
  cached_stage('mine', workdir, sections, run_mine)
  return out


def _print_mining_summary(s: dict) -> None:
  r = s['rephrase']
  lines = [f"mining: {s['queries']} queries, {r['fallbacks']} rephrase fallbacks, "
           f"{s['records']} records ({len(s['skipped'])} skipped), {s['pairs']} pairs, "
           f"{s['seconds']:.1f} s"]
  if 'corpus_records' in s:
    lines.append(f"  corpus: {s['corpus_indexed']} images indexed of {s['corpus_records']} "
                 f"records ({s['corpus_unreadable']} unreadable, left out); "
                 f"{s['unscorable_images']} retrieved images could not be scored")
  top = [k for k in s if k.endswith('_gt_aesthetic_original')]
  if top:
    n = top[0].split('_')[0]
    lines.append(f"  {n} ground-truth aesthetic: original queries "
                 f"{s[f'{n}_gt_aesthetic_original']:.3f}, rephrased "
                 f"{s[f'{n}_gt_aesthetic_rephrased']:.3f} (relevance "
                 f"{s[f'{n}_relevance_original']:.3f} -> {s[f'{n}_relevance_rephrased']:.3f})")
    lines.append(f"  mined images on topic: {s['mined_on_topic_fraction']:.3f} (row 0: "
                 f"{s['mined_row0_on_topic_fraction']:.3f}); pairs whose preferred image is "
                 f"truly more aesthetic: {s['pairs_preferred_truly_more_aesthetic']:.3f}")
  for line in lines:
    logging.info('%s', line)
    print(line, flush=True)


def dpo_path(config, workdir: str) -> str:
  """The D_po file: config.align.dpo_path, else the mine stage's output (mined if needed)."""
  return config.align.dpo_path or mine_stage(config, workdir)


def align_stage(config, workdir: str) -> str:
  """Ranked-DPO alignment of the pretrained model on D_po; returns the aligned HF folder."""
  start_folder = pretrain_stage(config, workdir)
  path = dpo_path(config, workdir)
  c = config.align
  groups_source = preference.open_groups(path, expect_uv=(c.u, c.v))  # refuses before compiling
  out = os.path.join(workdir, 'align', 'model')

  def run_align(stage_dir):
    cfg, params, tok = _load_model_folder(start_folder)
    cfg = _with_numerics(cfg, config.model)
    mesh = sharding.make_mesh(config.mesh)
    processes = jax.process_count()
    if real_data(config):
      source = corpus_source(config)
      pairs = iter(corpus_pairs_pipeline(config, source, tok,
                                         batch_size=c.batch_size // processes,
                                         seed=config.seed + 1))
      ids = pipeline.source_ids(source)
      _check_groups_in_corpus(groups_source, set(ids), path, config)
      lookup = preference.source_image_lookup(source, ids=ids)
      workers = config.data.worker_count   # decoding u*v images per group
    else:
      world = world_lib.World(config.world)
      pairs = iter(pipeline.make_batched_source_pipeline(
          world.split_range('train'), world.batch, batch_size=c.batch_size // processes,
          seed=config.seed + 1, tokenize=tok))
      lookup, workers = preference.world_image_lookup(world), 0
    groups = iter(preference.make_preference_pipeline(
        groups_source, lookup, tok, batch_size=c.groups_per_step // processes,
        seed=config.seed, worker_count=workers))
    result = train.fit(kind='align', c=c, model_cfg=cfg, init_params=params,
                       iterators={'pairs': pairs, 'groups': groups}, mesh=mesh,
                       rules=config.rules, workdir=stage_dir, seed=config.seed)
    last = _save_trained('align', result, cfg, tok, out)
    summary = {'steps': result.step, 'groups': len(groups_source), 'model': out,
               **{k: float(last[k]) for k in ('loss', 'dpo_loss', 'contrastive_loss',
                                              'rewards/accuracies') if k in last}}
    if real_data(config):
      summary['groups_dropped'] = groups_source.stats()['skipped_at_read']
      summary['corpus'] = source.stats()
    return summary

  cached_stage('align', workdir, {'align': c.to_dict(), 'start': _fingerprint_file(start_folder),
                                  'dpo': _fingerprint_file(path)}, run_align)
  return out


def _check_groups_in_corpus(groups_source, corpus_ids: set, path: str, config) -> None:
  """Refuses D_po whose groups all name images outside the corpus (the training stream would
  drop every group and never yield a batch); warns with the count when only some do."""
  outside = [r for r in range(len(groups_source))
             if not set(groups_source[r].image_ids) <= corpus_ids]
  if len(outside) == len(groups_source):
    raise ValueError(f'D_po file {path} (config.align.dpo_path or the mine stage): no group has '
                     f'all its images in the corpus config.data ({config.data.source} '
                     f'{config.data.path or config.data.tfds_name!r}); was it mined from '
                     'another corpus?')
  if outside:
    logging.warning('%s: %d of %d groups name images outside the corpus; they are dropped',
                    path, len(outside), len(groups_source))


def _fingerprint_file(path: str) -> str:
  """Changes when the file (or a folder's model.safetensors) changes: size and mtime."""
  target = path
  if os.path.isdir(path):   # a model folder: its weights (one file or a sharded index)
    target = next((os.path.join(path, name) for name in (hf.WEIGHTS_FILE, hf.INDEX_FILE)
                   if os.path.exists(os.path.join(path, name))),
                  os.path.join(path, hf.CONFIG_FILE))
  st = os.stat(target)
  return f'{target}:{st.st_size}:{st.st_mtime_ns}'


def eval_stage(config, workdir: str) -> str:
  """PT, PT+rephrase and aligned, evaluated side by side; writes workdir/eval/report.*.
  On the embedded world, or on the corpus of config.data (eval_corpus)."""
  pt_folder = pretrain_stage(config, workdir)
  aligned_folder = align_stage(config, workdir)
  iap_weights = aesthetic_stage(config, workdir)

  def run_eval(stage_dir):
    from aesalign_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
    pt_model, aligned_model = _load_model_folder(pt_folder), _load_model_folder(aligned_folder)
    if real_data(config):
      # The numerics the mine stage embedded the corpus with (bf16 on a real config).
      pt_model, aligned_model = ((_with_numerics(m[0], config.model), *m[1:])
                                 for m in (pt_model, aligned_model))
      corpus = eval_corpus(config, workdir, stage_dir, pt_model, aligned_model, iap_weights)
      report = report_lib.evaluate(config, None, pt_model, aligned_model, iap_weights,
                                   stage_dir, stage_summaries=_stage_summaries(workdir),
                                   corpus=corpus)
    else:
      world = world_lib.World(config.world)
      report = report_lib.evaluate(config, world, pt_model, aligned_model, iap_weights,
                                   stage_dir, stage_summaries=_stage_summaries(workdir))
    print(report_lib.markdown(report), flush=True)
    return {'report': os.path.join(stage_dir, 'report.md')}

  sections = {'pt': _fingerprint_file(pt_folder), 'aligned': _fingerprint_file(aligned_folder),
              'evals': config.evals.to_dict(), 'judge': config.judge.to_dict(),
              'hpir_world': config.hpir_world.to_dict(), 'rephrase': config.rephrase.to_dict()}
  files = {f'{name}.{key}': _fingerprint_file(e[key]) for name, e in config.evals.items()
           for key in ('queries_path', 'path') if hasattr(e, 'get') and e.get(key)
           and e.get('enabled', True) and isinstance(e[key], str) and os.path.exists(e[key])}
  if files:   # the evals' own files (held-out queries, an HPIR file)
    sections['eval_files'] = files
  if real_data(config):
    sections.update(_corpus_sections(config), aesthetics=config.aesthetics.to_dict(),
                    iap=iap_weights and _fingerprint_file(iap_weights),
                    index=config.mine.embeddings_dir,
                    numerics=[config.model.dtype, config.model.get('attention', 'auto')])
    if iap_weights and config.aesthetics.iap.get('clip_folder'):
      sections['iap_clip'] = _fingerprint_file(config.aesthetics.iap.clip_folder)
  cached_stage('eval', workdir, sections, run_eval)
  return os.path.join(workdir, 'eval')


def eval_corpus(config, workdir: str, stage_dir: str, pt_model, aligned_model,
                iap_weights: Optional[str]):
  """The corpus of config.data for the eval stage (evaluation.report.Corpus): its rows are the
  mine stage's corpus index (real_mining_corpus: PT's embeddings, reused, not recomputed; the
  images that failed to decode left out); the aligned model embeds the same rows into
  stage_dir/aligned_index (over the mesh, resumable). Scorers: the IAP head as mining scores
  it (on aesthetics.iap.clip_folder's embeddings, or PT's own) when there are weights, and the
  low-level score (aesthetics.lowlevel)."""
  from aesalign_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  pt_cfg, pt_params, _ = pt_model
  corpus = real_mining_corpus(config, workdir, pt_cfg, pt_params)
  cfg, params, _ = aligned_model
  folder = os.path.join(stage_dir, 'aligned_index')
  mesh = sharding.make_mesh(config.mesh)
  retrieval_index.embed_corpus(
      retrieval_index.image_embed_fn(cfg, params, mesh=mesh, rules=config.rules),
      lambda rows: corpus.images(rows)[0], corpus.ids, folder,
      fingerprint=retrieval_index.fingerprint_params(params),
      batch_size=_embed_batch_size(mesh, len(corpus.ids)), mesh=mesh, rules=config.rules)
  aligned_emb, aligned_ids = retrieval_index.load_index(folder, dtype=np.float32)
  if aligned_ids.astype(str).tolist() != corpus.ids.tolist():   # (embed_corpus keeps the order)
    raise ValueError(f'{folder}: the aligned index\'s ids are not the corpus rows\' ids')
  scorers = {}
  if iap_weights:
    scorers['iap'] = aesthetic_scores_fn(config, iap_weights, corpus)
  low = lowlevel.LowLevelScorer(config.aesthetics.lowlevel)
  scorers['lowlevel'] = mining.RowScores(lambda rows: _score_loaded(low.score, corpus, rows))
  summary = {**corpus.summary, 'index_pt': config.mine.embeddings_dir or
             os.path.join(workdir, 'mine', 'index'), 'index_aligned': folder}
  summary.update(_held_out_overlap(config))
  return report_lib.Corpus(ids=corpus.ids, images=lambda rows: corpus.images(rows)[0],
                           scorers=scorers, summary=summary,
                           embeddings={'PT': corpus.embeddings,
                                       'PT+rephrase': corpus.embeddings,
                                       'aligned': aligned_emb})


def _held_out_overlap(config) -> dict:
  """Counts (and warns about) eval queries that are also mining queries: the aligned model was
  trained on those, so they are not held out."""
  if not config.mine.queries_path:
    return {}
  mined = set(mining_queries(config))
  out = {}
  for name, e in config.evals.items():
    if (hasattr(e, 'get') and e.get('enabled', True) and e.get('type', name) == 'topk_quality'
        and e.get('queries_path')):
      both = [q for q in mining.load_queries(e.queries_path) if q in mined]
      out[f'{name}_queries_also_mined'] = len(both)
      if both:
        logging.warning('config.evals.%s.queries_path: %d queries are also mining queries '
                        '(config.mine.queries_path), so not held out; e.g. %s', name,
                        len(both), both[:3])
  return out


def _stage_summaries(workdir: str) -> dict:
  """The summaries the finished stages wrote (stage.json), by stage name, for the report."""
  out = {}
  for name in ('tokenizer', 'pretrain', 'aesthetic', 'mine', 'align'):
    marker = os.path.join(workdir, name, 'stage.json')
    if os.path.exists(marker):
      with open(marker, encoding='utf-8') as f:
        out[name] = json.load(f)['summary']
  return out


def export_stage(config, workdir: str) -> str:
  """The aligned model as a Hugging Face folder and an orbax parameter checkpoint."""
  source = align_stage(config, workdir)
  out = os.path.join(workdir, 'export')

  def run_export(stage_dir):
    cfg, params, tok = _load_model_folder(source)
    hf_dir = os.path.join(stage_dir, 'hf')
    hf.save_hf_folder(cfg, params, hf_dir)
    tok.save(hf_dir)
    checkpointing.save_params(os.path.join(stage_dir, 'params'), params)
    return {'hf_folder': hf_dir, 'params': os.path.join(stage_dir, 'params')}

  cached_stage('export', workdir, {'source': _fingerprint_file(source)}, run_export)
  return out


class Preempted(SystemExit):
  """A stage stopped by SIGTERM after saving; exit code 0 so schedulers restart it cleanly."""

  def __init__(self, message):
    logging.warning('%s', message)
    super().__init__(0)


def run(mode: str, config, workdir: str) -> None:
  built = {'tokenizer': tokenizer_stage, 'pretrain': pretrain_stage, 'mine': mine_stage,
           'align': align_stage, 'eval': eval_stage, 'export': export_stage}
  for stage in (ORDER if mode == 'all' else (mode,)):
    built[stage](config, workdir)   # each stage runs (or skips) the stages it depends on
