"""Checks a config before anything compiles; every error names the config key at fault."""

from __future__ import annotations

import os

import jax

from aesalign_jax import models, sharding, train


def validate(config, num_devices: int | None = None):
  """Raises ValueError naming the key for a config that cannot run; returns the ClipConfig."""
  cfg = models.clip_config(config.model)
  sharding.mesh_shape(config.mesh, jax.device_count() if num_devices is None else num_devices)
  sharding.check_rules(config.rules)
  tok = config.tokenizer
  if tok.folder and not os.path.isdir(tok.folder):
    raise ValueError(f'config.tokenizer.folder={tok.folder!r} is not a folder')
  if tok.context_length is not None and tok.context_length != cfg.context_length:
    raise ValueError(f'config.tokenizer.context_length={tok.context_length} differs from the '
                     f"model's context length {cfg.context_length} (config.model)")
  if not tok.folder and tok.vocab_size > cfg.vocab_size:
    raise ValueError(f'config.tokenizer.vocab_size={tok.vocab_size} exceeds the model '
                     f'vocabulary {cfg.vocab_size} (config.model.overrides.vocab_size)')
  if config.data.source == 'world' and config.world.image_size != cfg.image_size:
    raise ValueError(f'config.world.image_size={config.world.image_size} differs from the '
                     f'model image size {cfg.image_size} (config.model)')
  if config.align.dpo_path and not os.path.exists(config.align.dpo_path):
    raise ValueError(f'config.align.dpo_path={config.align.dpo_path!r} does not exist')
  train.validate(config.pretrain, 'pretrain')
  train.validate(config.align, 'align')
  for section in ('pretrain', 'align'):
    per_host = config[section].batch_size
    if per_host % jax.process_count():
      raise ValueError(f'config.{section}.batch_size={per_host} is not divisible by the '
                       f'{jax.process_count()} processes')
  return cfg
