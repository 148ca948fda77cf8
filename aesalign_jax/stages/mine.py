"""Stage `mine`: rephrase, retrieve, re-rank and write D_po (aesalign_jax/mining.py does the
computation; this stage wires the reference model, the corpus index, the rephraser and the
aesthetic model to it)."""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging

from aesalign_jax import embed, mining, multihost, rephrase, retrieval
from aesalign_jax.stages import cache, context, corpus_index
from input_pipeline import preference

NEEDS = ('pretrain', 'aesthetic')


def queries(mine_config, corpus) -> list[str]:
  """mine.queries_path's queries, else the corpus's own mining queries (the world's); the
  first mine.max_queries of them when that is > 0."""
  if mine_config.queries_path:
    out = mining.load_queries(mine_config.queries_path)
  else:
    out = corpus.queries('mining')
    if not out:
      raise ValueError('config.mine.queries_path is empty and the corpus has no mining queries '
                       'of its own: give a queries file (one query a line)')
  return out[:mine_config.max_queries] if mine_config.max_queries > 0 else out


def run(ctx, inputs: dict) -> str:
  """The D_po file."""
  config = ctx.config
  model_folder, iap_weights = inputs['pretrain'], inputs['aesthetic']
  out = os.path.join(ctx.workdir, 'mine', 'dpo.arrayrecord')
  u, v = config.align.u, config.align.v
  mining.validate(config.mine, u, v)

  def run_mine(stage_dir):
    cfg, params, tok = context.load_model_folder(model_folder, config.model)
    corpus = corpus_index.indexed_corpus(ctx, cfg, params)
    mine_queries = queries(config.mine, ctx.corpus)
    rephrased = rephrase_shared(config.rephrase, mine_queries, stage_dir)
    embedder = embed.Embedder(cfg, params, tok)
    result = mining.mine(
        mine_queries, rephrased.texts, text_embed=embedder.texts, corpus=corpus.embeddings,
        ids=corpus.ids.astype(str), c=config.mine, u=u, v=v,
        aesthetic_fn=corpus_index.aesthetic_scores_fn(config.aesthetics, iap_weights, corpus),
        truth=None if config.mine.queries_path else corpus.truth,
        searcher=retrieval.make_searcher(config.retrieval, ctx.mesh, across_processes=True))
    summary = {**result.summary, **corpus.summary, 'rephrase': rephrased.summary(),
               'dpo_path': out}
    if multihost.is_writer():   # one D_po file, in query order whatever the process count
      preference.write_groups(out, result.groups)
      with open(os.path.join(stage_dir, 'summary.json'), 'w', encoding='utf-8') as f:
        json.dump(summary, f, indent=2)
      print_summary(summary)
    return summary

  sections = {'model': cache.fingerprint_file(model_folder),
              'iap': iap_weights and cache.fingerprint_file(iap_weights),
              'mine': config.mine.to_dict(), 'rephrase': config.rephrase.to_dict(),
              'retrieval': cache.search_settings(config.retrieval),
              'aesthetics': config.aesthetics.to_dict(),
              'numerics': [config.model.dtype, config.model.get('attention', 'auto')],
              'uv': [u, v], **ctx.corpus.fingerprint()}
  if config.mine.queries_path:
    sections['queries'] = cache.fingerprint_file(config.mine.queries_path)
  if iap_weights and config.aesthetics.iap.get('clip_folder'):
    sections['iap_clip'] = cache.fingerprint_file(config.aesthetics.iap.clip_folder)
  cache.cached_stage('mine', ctx.workdir, sections, run_mine)
  return out


def rephrase_shared(rephrase_config, all_queries: list[str], stage_dir: str):
  """Every query's rephrasing (a RephraseResult), each query sent to the rephraser once in
  the whole run: each process rephrases its block of the queries (multihost.share) through
  its own cache file, and the blocks are gathered in query order."""
  start, stop = multihost.share(len(all_queries))
  name = ('rephrase_cache.jsonl' if multihost.count() == 1 else
          f'rephrase_cache.process{multihost.index()}-of-{multihost.count()}.jsonl')
  with rephrase.make_rephraser(rephrase_config, os.path.join(stage_dir, name)) as rephraser:
    part = rephraser.rephrase_batch(all_queries[start:stop])
  if multihost.count() == 1:
    return part
  return rephrase.concat_results([rephrase.RephraseResult(**r) for r in
                                  multihost.allgather(dataclasses.asdict(part))])


def print_summary(s: dict) -> None:
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
  if r['fallbacks']:   # e.g. an LLM endpoint down: D_po was mined with the plain queries
    first = r['fallback_list'][0]
    lines.append(f"  WARNING: {r['fallbacks']} of {r['queries']} rephrasings fell back to the "
                 f"original query (rate {r['fallbacks'] / r['queries']:.3f}; the report "
                 f"counts them); first: {first['query']!r} ({first['reason']})")
  for line in lines:
    logging.info('%s', line)
    print(line, flush=True)
