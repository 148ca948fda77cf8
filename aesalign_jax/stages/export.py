"""Stage `export`: the aligned model as a Hugging Face folder and an orbax parameter
checkpoint."""

from __future__ import annotations

import os

from absl import logging

from aesalign_jax import checkpointing, multihost
from aesalign_jax.models import hf
from aesalign_jax.stages import cache, context

NEEDS = ('align',)


def run(ctx, inputs: dict) -> str:
  """The export folder (hf/ and params/)."""
  source = inputs['align']
  out = os.path.join(ctx.workdir, 'export')

  def run_export(stage_dir):
    cfg, params, tok = context.load_model_folder(source)
    hf_dir = os.path.join(stage_dir, 'hf')
    if multihost.is_writer():
      hf.save_hf_folder(cfg, params, hf_dir)
      tok.save(hf_dir)
    # orbax: every process calls it (it synchronises them); the primary process writes.
    checkpointing.save_params(os.path.join(stage_dir, 'params'), params)
    summary = {'hf_folder': hf_dir, 'params': os.path.join(stage_dir, 'params')}
    if 'logit_bias' in params:
      # A CLIP folder has no logit bias; the tensor stays beside CLIP's own under SigLIP's
      # name, which transformers.CLIPModel skips. No retrieval ranking depends on it.
      summary['logit_bias'] = (f'{float(params["logit_bias"]):.4f}, written as tensor '
                               '"logit_bias" (transformers.CLIPModel ignores it)')
      logging.info('export: SigLIP logit bias %s', summary['logit_bias'])
    if cfg.vision_stem != 'patch':
      summary['vision_stem'] = (f'{cfg.vision_stem}: a hybrid ViT this project loads; '
                                'transformers.CLIPModel cannot')
      logging.warning('export: %s', summary['vision_stem'])
    return summary

  cache.cached_stage('export', ctx.workdir, {'source': cache.fingerprint_file(source)},
                     run_export)
  return out
