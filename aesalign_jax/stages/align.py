"""Stage `align`: ranked-DPO fine-tuning of the PT model on D_po (config.align.dpo_path, else
the mine stage's), with the contrastive regulariser on the corpus's image-caption pairs."""

from __future__ import annotations

import os

import jax
from absl import logging

from aesalign_jax import train
from aesalign_jax.stages import cache, context
from input_pipeline import preference


def needs(config) -> tuple:
  return ('pretrain',) if config.align.dpo_path else ('pretrain', 'mine')


def run(ctx, inputs: dict) -> str:
  """The aligned model folder."""
  config, corpus, c = ctx.config, ctx.corpus, ctx.config.align
  start_folder = inputs['pretrain']
  path = c.dpo_path or inputs['mine']
  groups_source = preference.open_groups(path, expect_uv=(c.u, c.v))  # refuses before compiling
  out = os.path.join(ctx.workdir, 'align', 'model')

  def run_align(stage_dir):
    cfg, params, tok = context.load_model_folder(start_folder, config.model)
    processes = jax.process_count()
    pairs = corpus.pairs_pipeline(tok, batch_size=c.batch_size // processes,
                                  seed=config.seed + 1, data=config.data)
    check_groups_in_corpus(groups_source, set(corpus.ids.astype(str).tolist()), path)
    groups = preference.make_preference_pipeline(
        groups_source, corpus.image_lookup(), tok, batch_size=c.groups_per_step // processes,
        seed=config.seed, worker_count=config.data.worker_count)
    result = train.fit(kind='align', c=c, model_cfg=cfg, init_params=params,
                       iterators={'pairs': iter(pairs), 'groups': iter(groups)}, mesh=ctx.mesh,
                       rules=config.rules, workdir=stage_dir, seed=config.seed)
    last = context.save_trained('align', result, cfg, tok, out)
    summary = {'steps': result.step, 'groups': len(groups_source), 'model': out,
               **{k: float(last[k]) for k in ('loss', 'dpo_loss', 'contrastive_loss',
                                              'rewards/accuracies') if k in last}}
    if corpus.decodes_files:
      summary['groups_dropped'] = groups_source.stats()['skipped_at_read']
      summary['corpus'] = corpus.stats()
    return summary

  cache.cached_stage('align', ctx.workdir, {
      'align': c.to_dict(), 'start': cache.fingerprint_file(start_folder),
      'dpo': cache.fingerprint_file(path), **corpus.fingerprint()}, run_align)
  return out


def check_groups_in_corpus(groups_source, corpus_ids: set, path: str) -> None:
  """Refuses D_po whose groups all name images outside the corpus (the training stream would
  drop every group and never yield a batch); warns with the count when only some do."""
  outside = [r for r in range(len(groups_source))
             if not set(groups_source[r].image_ids) <= corpus_ids]
  if len(outside) == len(groups_source):
    raise ValueError(f'D_po file {path} (config.align.dpo_path or the mine stage): no group has '
                     'all its images in the corpus of config.data; was it mined from another '
                     'corpus?')
  if outside:
    logging.warning('%s: %d of %d groups name images outside the corpus; they are dropped',
                    path, len(outside), len(groups_source))
