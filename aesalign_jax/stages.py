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

from aesalign_jax import checkpointing, embed, mining, models, rephrase, sharding, train
from aesalign_jax.aesthetics import iap, lowlevel, world_iap
from aesalign_jax.retrieval import index as retrieval_index
from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax.models import clip, hf
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
    _, params = models.load_or_init(config.model, config.seed)
    if not config.model.hf_folder:
      params = clip.init_params(cfg, config.seed)
    world = world_lib.World(config.world)
    mesh = sharding.make_mesh(config.mesh)
    pairs = iter(world_pairs_pipeline(config, world, tok, seed=config.seed))
    result = train.fit(kind='pretrain', c=config.pretrain, model_cfg=cfg, init_params=params,
                       iterators={'pairs': pairs}, mesh=mesh, rules=config.rules,
                       workdir=stage_dir, seed=config.seed)
    last = _save_trained('pretrain', result, cfg, tok, out)
    return {'steps': result.step, 'final_loss': float(last.get('loss', float('nan'))),
            'model': out}

  cached_stage('pretrain', workdir, {k: config[k].to_dict() for k in
                                     ('model', 'tokenizer', 'world', 'pretrain', 'mesh')},
               run_pretrain)
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


def mine_stage(config, workdir: str) -> str:
  """Rephrase, retrieve, re-rank and write D_po (aesalign_jax/mining.py); returns its path."""
  model_folder = pretrain_stage(config, workdir)
  iap_weights = aesthetic_stage(config, workdir)
  out = os.path.join(workdir, 'mine', 'dpo.arrayrecord')
  u, v = config.align.u, config.align.v
  mining.validate(config.mine, u, v)

  def run_mine(stage_dir):
    cfg, params, tok = _load_model_folder(model_folder)
    world = world_lib.World(config.world)
    corpus, ids = corpus_index(config, workdir, cfg, params)
    queries = [q.text for q in world.mining_queries]
    if config.mine.max_queries > 0:
      queries = queries[:config.mine.max_queries]
    with rephrase.make_rephraser(config.rephrase,
                                 os.path.join(stage_dir, 'rephrase_cache.jsonl')) as rephraser:
      rephrased = rephraser.rephrase_batch(queries)
    if iap_weights:
      head, activation = iap.load_params(iap_weights)
      aesthetic_fn = lambda rows: np.asarray(iap.apply(head, corpus[rows],
                                                       activation=activation))
    else:
      scorer = lowlevel.LowLevelScorer()
      aesthetic_fn = lambda rows: scorer.score(world.render_batch(ids[rows].astype(int)))
    embedder = embed.Embedder(cfg, params, tok)
    result = mining.mine(queries, rephrased.texts, text_embed=embedder.texts, corpus=corpus,
                         ids=ids, aesthetic_fn=aesthetic_fn, c=config.mine, u=u, v=v,
                         truth=WorldTruth(world, ids))
    preference.write_groups(out, result.groups)
    summary = {**result.summary, 'rephrase': rephrased.summary(), 'dpo_path': out}
    with open(os.path.join(stage_dir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
    _print_mining_summary(summary)
    return summary

  cached_stage('mine', workdir, {'model': _fingerprint_file(model_folder),
                                 'iap': iap_weights and _fingerprint_file(iap_weights),
                                 'mine': config.mine.to_dict(), 'rephrase': config.rephrase.to_dict(),
                                 'uv': [u, v], 'world': config.world.to_dict()}, run_mine)
  return out


def _print_mining_summary(s: dict) -> None:
  r = s['rephrase']
  lines = [f"mining: {s['queries']} queries, {r['fallbacks']} rephrase fallbacks, "
           f"{s['records']} records ({len(s['skipped'])} skipped), {s['pairs']} pairs, "
           f"{s['seconds']:.1f} s"]
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
    world = world_lib.World(config.world)
    mesh = sharding.make_mesh(config.mesh)
    processes = jax.process_count()
    pairs = iter(pipeline.make_batched_source_pipeline(
        world.split_range('train'), world.batch, batch_size=c.batch_size // processes,
        seed=config.seed + 1, tokenize=tok))
    groups = iter(preference.make_preference_pipeline(
        groups_source, preference.world_image_lookup(world), tok,
        batch_size=c.groups_per_step // processes, seed=config.seed))
    result = train.fit(kind='align', c=c, model_cfg=cfg, init_params=params,
                       iterators={'pairs': pairs, 'groups': groups}, mesh=mesh,
                       rules=config.rules, workdir=stage_dir, seed=config.seed)
    last = _save_trained('align', result, cfg, tok, out)
    return {'steps': result.step, 'groups': len(groups_source), 'model': out,
            **{k: float(last[k]) for k in ('loss', 'dpo_loss', 'contrastive_loss',
                                           'rewards/accuracies') if k in last}}

  cached_stage('align', workdir, {'align': c.to_dict(), 'start': _fingerprint_file(start_folder),
                                  'dpo': _fingerprint_file(path)}, run_align)
  return out


def _fingerprint_file(path: str) -> str:
  """Changes when the file (or a folder's model.safetensors) changes: size and mtime."""
  target = os.path.join(path, hf.WEIGHTS_FILE) if os.path.isdir(path) else path
  st = os.stat(target)
  return f'{target}:{st.st_size}:{st.st_mtime_ns}'


def eval_stage(config, workdir: str) -> str:
  """PT, PT+rephrase and aligned, evaluated side by side; writes workdir/eval/report.*."""
  pt_folder = pretrain_stage(config, workdir)
  aligned_folder = align_stage(config, workdir)
  iap_weights = aesthetic_stage(config, workdir)

  def run_eval(stage_dir):
    from aesalign_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
    world = world_lib.World(config.world)
    report = report_lib.evaluate(config, world, _load_model_folder(pt_folder),
                                 _load_model_folder(aligned_folder), iap_weights, stage_dir)
    print(report_lib.markdown(report), flush=True)
    return {'report': os.path.join(stage_dir, 'report.md')}

  cached_stage('eval', workdir, {'pt': _fingerprint_file(pt_folder),
                                 'aligned': _fingerprint_file(aligned_folder),
                                 'evals': config.evals.to_dict(), 'judge': config.judge.to_dict(),
                                 'hpir_world': config.hpir_world.to_dict(),
                                 'rephrase': config.rephrase.to_dict()}, run_eval)
  return os.path.join(workdir, 'eval')


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
