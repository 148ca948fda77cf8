"""Stage `eval`: PT, PT + rephrasing and the aligned model side by side on the evaluation
corpus (aesalign_jax/evaluation/report.py); writes workdir/eval/report.* and the figures.

The evaluation corpus is the corpus's held-out images when it has them (the embedded world's
eval split: each system embeds them), else the mine stage's corpus index (PT's embeddings
reused, not recomputed; the aligned model embeds the same rows into eval/aligned_index)."""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from aesalign_jax import embed, mining, multihost, retrieval, sharding
from aesalign_jax.aesthetics import lowlevel
from aesalign_jax.evaluation import common as evals_common
from aesalign_jax.evaluation import report as report_lib
from aesalign_jax.retrieval import index as retrieval_index
from aesalign_jax.stages import cache, context, corpus_index
from aesalign_jax.stages import mine as mine_stage

NEEDS = ('pretrain', 'aesthetic', 'align')
REPORTED_STAGES = ('tokenizer', 'pretrain', 'aesthetic', 'mine', 'align')


def run(ctx, inputs: dict) -> str:
  """The eval folder (report.json, report.md, PNGs)."""
  config = ctx.config
  pt_folder, aligned_folder = inputs['pretrain'], inputs['align']
  iap_weights = inputs['aesthetic']

  def run_eval(stage_dir):
    pt_model = context.load_model_folder(pt_folder, config.model)
    aligned_model = context.load_model_folder(aligned_folder, config.model)
    data = eval_corpus(ctx, stage_dir, pt_model, aligned_model, iap_weights)
    # Several processes: all evaluate, each embedding, rephrasing and judging its share;
    # process 0 writes the report. An on-disk corpus index is searched split over them too.
    across = multihost.count() > 1
    on_disk = any(isinstance(e, retrieval.IndexRows) for e in data.embeddings.values())
    searcher = retrieval.make_searcher(config.retrieval, sharding.local_mesh(ctx.mesh),
                                       across_processes=across and on_disk)
    report = report_lib.evaluate(config, pt_model, aligned_model, data, stage_dir,
                                 cache.stage_summaries(ctx.workdir, REPORTED_STAGES),
                                 searcher=searcher, across_processes=across)
    if multihost.is_writer():
      print(report_lib.markdown(report), flush=True)
    # What fell back, by stage (report.json's `fallbacks` has the counts).
    return {'report': os.path.join(stage_dir, 'report.md'),
            'degraded': report['degraded']['stages']}

  sections = {'pt': cache.fingerprint_file(pt_folder),
              'aligned': cache.fingerprint_file(aligned_folder),
              'evals': config.evals.to_dict(), 'judge': config.judge.to_dict(),
              'rephrase': config.rephrase.to_dict(), 'aesthetics': config.aesthetics.to_dict(),
              'iap': iap_weights and cache.fingerprint_file(iap_weights),
              'index': config.mine.embeddings_dir,
              'retrieval': cache.search_settings(config.retrieval),
              'numerics': [config.model.dtype, config.model.get('attention', 'auto')],
              **ctx.corpus.fingerprint()}
  if config.get('hpir_world') is not None:
    sections['hpir_world'] = config.hpir_world.to_dict()
  files = {f'{name}.{key}': cache.fingerprint_file(e[key]) for name, e in config.evals.items()
           for key in ('queries_path', 'path') if hasattr(e, 'get') and e.get(key)
           and e.get('enabled', True) and isinstance(e[key], str) and os.path.exists(e[key])}
  if files:   # the evals' own files (held-out queries, an HPIR file)
    sections['eval_files'] = files
  if iap_weights and config.aesthetics.iap.get('clip_folder'):
    sections['iap_clip'] = cache.fingerprint_file(config.aesthetics.iap.clip_folder)
  cache.cached_stage('eval', ctx.workdir, sections, run_eval)
  return os.path.join(ctx.workdir, 'eval')


def eval_corpus(ctx, stage_dir: str, pt_model, aligned_model,
                iap_weights) -> report_lib.EvalCorpus:
  """The corpus the systems are evaluated on, its scorers (ground truth where known, the
  low-level score, the IAP head on PT's embeddings or aesthetics.iap.clip_folder's) and the
  embeddings already computed (see the module docstring)."""
  config = ctx.config
  held_out = ctx.corpus.held_out
  if held_out is not None:
    corpus, embeddings, summary = held_out, {}, {}
    # The IAP head reads the PT model's embedding space.
    pt = embed.Embedder(*pt_model)
    if multihost.count() > 1:   # each process its share of the images (common.embed_chunks)
      corpus.embeddings = evals_common.embed_chunks(
          evals_common.System('PT', pt, across_processes=True), len(held_out), pt.batch_size,
          lambda rows: held_out.images(rows)[0])
    else:
      corpus.embeddings = pt.images(held_out.images(np.arange(len(held_out)))[0])
  else:
    corpus = corpus_index.indexed_corpus(ctx, pt_model[0], pt_model[1])
    embeddings = {'PT': corpus.embeddings, 'PT+rephrase': corpus.embeddings,
                  'aligned': aligned_index(ctx, stage_dir, corpus, aligned_model)}
    summary = {**corpus.summary, 'index_pt': config.mine.embeddings_dir or
               os.path.join(ctx.workdir, 'mine', 'index'),
               'index_aligned': os.path.join(stage_dir, 'aligned_index'),
               **_held_out_overlap(config, ctx.corpus)}
  scorers = {}
  if corpus.truth is not None:
    scorers['ground_truth'] = corpus.truth.aesthetic
  low = lowlevel.LowLevelScorer(config.aesthetics.lowlevel)
  scorers['lowlevel'] = lambda rows: corpus_index.score_loaded(low.score, corpus, rows)
  if iap_weights:
    scorers['iap'] = corpus_index.aesthetic_scores_fn(config.aesthetics, iap_weights, corpus)
  return report_lib.EvalCorpus(corpus=corpus, scorers=scorers, embeddings=embeddings,
                               queries=corpus.queries('eval'), summary=summary)


def aligned_index(ctx, stage_dir: str, corpus, aligned_model) -> retrieval_index.IndexRows:
  """The aligned model's embeddings of the corpus index's rows, built (over the mesh,
  resumable) under stage_dir/aligned_index; reused when already there (the search server
  reads eval/aligned_index, or builds serve/aligned_index when eval embedded held-out images
  instead)."""
  cfg, params, _ = aligned_model
  folder = os.path.join(stage_dir, 'aligned_index')
  ids = corpus.ids.astype(str)
  corpus_index.embed_into(ctx, cfg, params, lambda rows: corpus.images(rows)[0], ids, folder)
  aligned_emb = retrieval_index.open_index(folder)   # rows read on demand
  if aligned_emb.ids.astype(str).tolist() != ids.tolist():   # (embed_corpus keeps the order)
    raise ValueError(f'{folder}: the aligned index\'s ids are not the corpus rows\' ids')
  return aligned_emb


def _held_out_overlap(config, corpus) -> dict:
  """Counts (and warns about) eval queries that are also mining queries: the aligned model was
  trained on those, so they are not held out."""
  if not config.mine.queries_path:
    return {}
  mined = set(mine_stage.queries(config.mine, corpus))
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
