"""Stage `tokenizer`: config.tokenizer.folder, else a byte-level BPE trained on the corpus's
captions (the embedded world's, by default)."""

from __future__ import annotations

import os

import numpy as np

from aesalign_jax import multihost
from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax.stages import cache

NEEDS = ()
MAX_CAPTIONS = 50_000


def run(ctx, inputs: dict) -> str:
  """The tokenizer folder."""
  del inputs
  tok = ctx.config.tokenizer
  if tok.folder:
    return tok.folder
  corpus = ctx.corpus

  def train(stage_dir):
    if not multihost.is_writer():   # one process trains it; the others read its folder
      return {}
    captions = corpus.captions(np.arange(min(len(corpus), MAX_CAPTIONS)))
    trained = tokenizer_lib.train_bpe(captions, vocab_size=tok.vocab_size, folder=stage_dir,
                                      context_length=tok.context_length,
                                      min_frequency=tok.min_frequency)
    return {'vocab_size': trained.vocab_size, 'captions': len(captions),
            'context_length': trained.context_length}

  cache.cached_stage('tokenizer', ctx.workdir, {'tokenizer': tok.to_dict(),
                                                **corpus.fingerprint()}, train)
  return os.path.join(ctx.workdir, 'tokenizer')
