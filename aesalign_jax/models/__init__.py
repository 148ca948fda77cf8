"""CLIP models: the Flax architecture (clip.py) and Hugging Face folders (hf.py)."""

from __future__ import annotations

import json
import os

from aesalign_jax.models import clip, hf


def clip_config(model_cfg) -> clip.ClipConfig:
  """ClipConfig from config.model: a Hugging Face folder's config.json, else preset + overrides.

  Reads only config.json, so it is cheap enough to validate a config before anything runs.
  """
  if model_cfg.hf_folder:
    path = os.path.join(model_cfg.hf_folder, hf.CONFIG_FILE)
    if not os.path.exists(path):
      raise ValueError(f'config.model.hf_folder={model_cfg.hf_folder!r}: no {hf.CONFIG_FILE}')
    with open(path, encoding='utf-8') as f:
      base = hf.config_from_hf(json.load(f), path)
    fields = {k: getattr(base, k) for k in clip.ClipConfig.__dataclass_fields__}
  else:
    fields = dict(clip.PRESETS.get(model_cfg.preset, {}))
    if model_cfg.preset not in clip.PRESETS:
      raise ValueError(f'config.model.preset={model_cfg.preset!r}: expected one of '
                       f'{sorted(clip.PRESETS)}')
  overrides = {k: v for k, v in dict(model_cfg.get('overrides') or {}).items() if v is not None}
  if model_cfg.hf_folder and overrides:
    raise ValueError('config.model.overrides cannot change the shapes of a Hugging Face '
                     f'checkpoint ({sorted(overrides)} set with config.model.hf_folder)')
  fields.update(overrides, dtype=model_cfg.dtype, remat=bool(model_cfg.remat),
                attention=model_cfg.get('attention', 'auto'))
  try:
    return clip.ClipConfig(**fields)
  except ValueError as e:
    raise ValueError(f'config.{e}') from None


def load_or_init(model_cfg, seed: int = 0):
  """(ClipConfig, params): weights from config.model.hf_folder, else a random init."""
  cfg = clip_config(model_cfg)
  if model_cfg.hf_folder:
    _, params = hf.load_hf_folder(model_cfg.hf_folder)
    return cfg, params
  return cfg, clip.init_params(cfg, seed)
