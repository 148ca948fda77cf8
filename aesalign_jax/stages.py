"""The stages of the method (DESIGN.md data flow), each cached in the workdir.

A stage writes its outputs under workdir/<stage>/ and a `stage.json` with a fingerprint of the
config sections it read; a rerun with the same fingerprint skips it, a changed config redoes it.
`run(mode, config, workdir)` is what main.py calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable

from absl import logging

from aesalign_jax import tokenizer as tokenizer_lib
from input_pipeline import world as world_lib

# Stages in the order of the data flow; later issues fill in the ones not built yet.
ORDER = ('tokenizer', 'pretrain', 'mine', 'align', 'eval', 'export')


def _fingerprint(sections: dict) -> str:
  text = json.dumps(sections, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_stage(name: str, workdir: str, sections: dict, fn: Callable[[str], dict]) -> dict:
  """Runs fn(stage_dir) unless stage.json there has the same config fingerprint."""
  stage_dir = os.path.join(workdir, name)
  marker = os.path.join(stage_dir, 'stage.json')
  fingerprint = _fingerprint(sections)
  if os.path.exists(marker):
    with open(marker, encoding='utf-8') as f:
      done = json.load(f)
    if done.get('fingerprint') == fingerprint:
      logging.info('stage %s: done before (%s), skipped', name, marker)
      return done['summary']
    logging.info('stage %s: config changed since the last run, redoing it', name)
  os.makedirs(stage_dir, exist_ok=True)
  start = time.time()
  logging.info('stage %s: started', name)
  summary = fn(stage_dir)
  summary['seconds'] = round(time.time() - start, 2)
  tmp = marker + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump({'fingerprint': fingerprint, 'summary': summary}, f, indent=2)
  os.replace(tmp, marker)   # the marker appears only once the stage's outputs are complete
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


class NotBuiltError(NotImplementedError):
  """A mode whose stage is not implemented yet."""


def run(mode: str, config, workdir: str) -> None:
  built = {'tokenizer': tokenizer_stage}
  wanted = ORDER if mode == 'all' else (mode,)
  missing = [s for s in wanted if s not in built]
  if mode != 'all' and missing:
    raise NotBuiltError(f'--mode={mode}: this stage is not built yet (built: {sorted(built)})')
  for stage in wanted:
    if stage in built:
      built[stage](config, workdir)
  if missing:
    logging.warning('--mode=all ran the stages built so far (%s); not built yet: %s',
                    ', '.join(s for s in wanted if s in built), ', '.join(missing))
