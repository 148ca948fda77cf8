"""Stage `aesthetic`: the aesthetic model that re-ranks mined candidates. Given weights
(config.aesthetics.iap.weights) are used as they are; a corpus with ground truth (the embedded
world) trains an IAP head on simulated ratings over the PT model's embeddings, and its report
compares it with the low-level score; kind 'lowlevel' needs no model."""

from __future__ import annotations

import os
from typing import Optional

from absl import logging

from aesalign_jax import embed, multihost
from aesalign_jax.aesthetics import iap, world_iap
from aesalign_jax.stages import cache, context

NEEDS = ('pretrain',)


def run(ctx, inputs: dict) -> Optional[str]:
  """The IAP weights file, or None for the low-level scorer."""
  config = ctx.config
  if config.aesthetics.kind == 'lowlevel':
    return None
  if config.aesthetics.iap.weights:
    return config.aesthetics.iap.weights
  simulator = getattr(ctx.corpus.truth, 'world', None)
  if simulator is None:
    raise ValueError('config.aesthetics.iap.weights is empty: an IAP head is trained only on '
                     'simulated ratings of a corpus with ground truth (the embedded world); '
                     'give trained weights (README "Real runs") or set '
                     'config.aesthetics.kind=lowlevel')
  model_folder = inputs['pretrain']
  out = os.path.join(ctx.workdir, 'aesthetic', 'iap.safetensors')

  def run_iap(stage_dir):
    del stage_dir
    if not multihost.is_writer():   # a small head: one process trains it, the others wait
      return {}
    cfg, params, tok = context.load_model_folder(model_folder)
    embedder = embed.Embedder(cfg, params, tok)
    head, report = world_iap.train_world_iap(simulator, embedder.images, config.world_iap)
    iap.save_params(out, head)
    logging.info('IAP head on world ratings: Spearman vs ground truth %.3f (low-level score '
                 '%.3f) on %d held-out images', report['iap_spearman_vs_truth'],
                 report['lowlevel_spearman_vs_truth'], report['test_images'])
    return report

  cache.cached_stage('aesthetic', ctx.workdir, {'model': cache.fingerprint_file(model_folder),
                                                'world_iap': config.world_iap.to_dict(),
                                                **ctx.corpus.fingerprint()}, run_iap)
  return out
