"""What every stage shares: the config, the workdir, the mesh and the corpus, built once; and
the model-folder helpers (a stage hands the next one a Hugging Face folder)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from absl import logging

from aesalign_jax import models
from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax.models import hf
from aesalign_jax.stages import cache
from input_pipeline import corpus as corpus_lib


@dataclasses.dataclass
class Context:
  """One run: config, workdir, the device mesh, and the stage outputs computed so far."""
  config: object
  workdir: str
  mesh: object
  outputs: dict = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def corpus(self) -> corpus_lib.Corpus:
    """The training and mining corpus (config.data; 'world' = the embedded world)."""
    return corpus_lib.open_corpus(self.config.data, world=self.config.get('world'),
                                  file_fingerprint=cache.fingerprint_file)


class Preempted(SystemExit):
  """A stage stopped by SIGTERM after saving; exit code 0 so schedulers restart it cleanly."""

  def __init__(self, message):
    logging.warning('%s', message)
    super().__init__(0)


def model_with_tokenizer(model_config, tok):
  """The ClipConfig for config.model, with the vocabulary and end token of the tokenizer."""
  cfg = models.clip_config(model_config)
  if not model_config.hf_folder:
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f'the tokenizer has {tok.vocab_size} tokens, more than the model '
                       f'vocabulary {cfg.vocab_size} (config.model.overrides.vocab_size)')
    cfg = dataclasses.replace(cfg, eos_token_id=tok.eos_token_id)
  return cfg


def with_numerics(cfg, model_config):
  """A checkpoint's ClipConfig with the compute dtype, remat and attention of config.model
  (a Hugging Face config.json holds shapes only)."""
  return dataclasses.replace(cfg, dtype=model_config.dtype, remat=bool(model_config.remat),
                             attention=model_config.get('attention', 'auto'))


def load_model_folder(folder: str, model_config: Optional[object] = None):
  """(ClipConfig, params, tokenizer) of a model folder; with model_config, the numerics of
  config.model."""
  cfg, params = hf.load_hf_folder(folder)
  if model_config is not None:
    cfg = with_numerics(cfg, model_config)
  return cfg, params, tokenizer_lib.ClipTokenizer.from_folder(folder)


def save_trained(kind: str, result, cfg, tok, out: str) -> dict:
  """Writes a finished run's model (HF folder + tokenizer); returns its last logged metrics.
  A preempted run exits 0 instead, so the scheduler's restart resumes it."""
  if result.status == 'preempted':
    raise Preempted(f'{kind} preempted at step {result.step}; rerun to resume')
  if jax.process_index() == 0:
    hf.save_hf_folder(cfg, jax.device_get(result.params), out)
    tok.save(out)
  return result.history[-1] if result.history else {}
