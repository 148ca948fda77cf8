"""The stage cache: a stage's outputs under workdir/<stage>/, redone only when its inputs change.

A stage writes `stage.json` with a fingerprint of the config sections (and input files) it
read once its outputs are complete; a rerun with the same fingerprint skips it, a changed one
redoes it. `stage.started.json` marks a stage in progress: a resumed stage with the same
fingerprint continues from its checkpoints, one with another fingerprint is cleared first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Callable

from absl import logging

from aesalign_jax import multihost
from aesalign_jax.models import hf

MARKER = 'stage.json'
STARTED = 'stage.started.json'


def fingerprint(sections: dict) -> str:
  text = json.dumps(sections, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_file(path: str) -> str:
  """Changes when the file changes: its content (sha256); for a model folder, its weights'
  size and mtime (gigabytes: too slow to hash on every run). Not the path: a workdir copied
  with its mtimes (shutil.copytree) is still done."""
  if os.path.isdir(path):   # a model folder: its weights (one file or a sharded index)
    target = next((os.path.join(path, name) for name in (hf.WEIGHTS_FILE, hf.INDEX_FILE)
                   if os.path.exists(os.path.join(path, name))),
                  os.path.join(path, hf.CONFIG_FILE))
    st = os.stat(target)
    return f'{os.path.basename(target)}:{st.st_size}:{st.st_mtime_ns}'
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return f'sha256:{digest.hexdigest()[:16]}'


def search_settings(retrieval_config) -> dict:
  """The retrieval section as far as it changes results: exact search (device without
  approx_max_k, or FAISS flat_ip) returns the same rows on either backend."""
  c = retrieval_config
  exact = (c.backend == 'device' and not c.approx) or (
      c.backend == 'faiss' and c.faiss_kind == 'flat_ip')
  return {'exact': True} if exact else c.to_dict()


def cached_stage(name: str, workdir: str, sections: dict, fn: Callable[[str], dict]) -> dict:
  """Runs fn(stage_dir) -> summary unless stage.json there has the same fingerprint; returns
  the summary (the stored one when skipped)."""
  stage_dir = os.path.join(workdir, name)
  marker = os.path.join(stage_dir, MARKER)
  key = fingerprint(sections)
  if os.path.exists(marker):
    with open(marker, encoding='utf-8') as f:
      done = json.load(f)
    if done.get('fingerprint') == key:
      logging.info('stage %s: done before (%s), skipped', name, marker)
      return done['summary']
    logging.info('stage %s: config changed since the last run, redoing it', name)
  started = os.path.join(stage_dir, STARTED)
  # Several processes: every one runs fn (each its share of the work); process 0 alone
  # clears, marks and writes the summary, the others wait for it at the barriers.
  if multihost.is_writer():
    if os.path.exists(started):
      with open(started, encoding='utf-8') as f:
        if json.load(f).get('fingerprint') != key:
          # Outputs and checkpoints of another config must not be resumed from.
          logging.info('stage %s: clearing %s (written with another config)', name, stage_dir)
          shutil.rmtree(stage_dir)
    os.makedirs(stage_dir, exist_ok=True)
    if not os.path.exists(started):
      with open(started, 'w', encoding='utf-8') as f:
        json.dump({'fingerprint': key}, f)
  multihost.barrier(f'stage {name}: started')
  start = time.time()
  logging.info('stage %s: started', name)
  summary = fn(stage_dir)
  summary['seconds'] = round(time.time() - start, 2)
  multihost.barrier(f'stage {name}: outputs written')
  if multihost.is_writer():
    tmp = marker + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'fingerprint': key, 'summary': summary}, f, indent=2)
    os.replace(tmp, marker)   # the marker appears only once the stage's outputs are complete
  multihost.barrier(f'stage {name}: marked')
  logging.info('stage %s: finished in %.1f s: %s', name, summary['seconds'], summary)
  return summary


def stage_summaries(workdir: str, names) -> dict:
  """The summaries the finished stages wrote (stage.json), by stage name, for the report."""
  out = {}
  for name in names:
    marker = os.path.join(workdir, name, MARKER)
    if os.path.exists(marker):
      with open(marker, encoding='utf-8') as f:
        out[name] = json.load(f)['summary']
  return out
