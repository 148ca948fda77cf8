"""Stage `pretrain`: contrastive CLIP training on the corpus's image-caption pairs, from
scratch or from config.model.hf_folder. Its output, a Hugging Face folder, is the PT model
every later stage starts from."""

from __future__ import annotations

import os

import jax

from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax import train
from aesalign_jax.models import clip, hf
from aesalign_jax.stages import cache, context

NEEDS = ('tokenizer',)


def run(ctx, inputs: dict) -> str:
  """The PT model folder."""
  config, corpus = ctx.config, ctx.corpus
  tok_folder = inputs['tokenizer']
  out = os.path.join(ctx.workdir, 'pretrain', 'model')

  def run_pretrain(stage_dir):
    tok = tokenizer_lib.ClipTokenizer.from_folder(tok_folder)
    cfg = context.model_with_tokenizer(config.model, tok)
    if config.pretrain.steps == 0:   # the checkpoint itself is the PT model
      return _copy_checkpoint(config.model.hf_folder, cfg, tok, out)
    if config.model.hf_folder:
      _, params = hf.load_hf_folder(config.model.hf_folder)
    else:
      params = None
    if config.pretrain.loss == 'siglip':
      cfg, params = clip.with_siglip_bias(cfg, params)
    if params is None:
      params = clip.init_params(cfg, config.seed)
    pairs = corpus.pairs_pipeline(tok, batch_size=config.pretrain.batch_size //
                                  jax.process_count(), seed=config.seed, data=config.data)
    result = train.fit(kind='pretrain', c=config.pretrain, model_cfg=cfg, init_params=params,
                       iterators={'pairs': iter(pairs)}, mesh=ctx.mesh, rules=config.rules,
                       workdir=stage_dir, seed=config.seed)
    last = context.save_trained('pretrain', result, cfg, tok, out)
    summary = {'steps': result.step, 'final_loss': float(last.get('loss', float('nan'))),
               'model': out}
    if corpus.stats():
      summary['corpus'] = corpus.stats()
    return summary

  sections = {k: config[k].to_dict() for k in ('model', 'tokenizer', 'pretrain', 'mesh')}
  cache.cached_stage('pretrain', ctx.workdir, {**sections, **corpus.fingerprint()},
                     run_pretrain)
  return out


def _copy_checkpoint(folder: str, cfg, tok, out: str) -> dict:
  if not folder:
    raise ValueError('config.pretrain.steps=0 needs config.model.hf_folder (the model to use '
                     'as it is)')
  if jax.process_index() == 0:
    _, params = hf.load_hf_folder(folder)
    hf.save_hf_folder(cfg, params, out)
    tok.save(out)
  return {'steps': 0, 'model': out, 'copied_from': folder}
