"""Hugging Face CLIP folders <-> our parameters, through safetensors only (never pickle).

A folder in the transformers.CLIPModel layout (config.json + model.safetensors, or sharded
model-0000x-of-0000y.safetensors with model.safetensors.index.json) becomes (ClipConfig, params)
and back. Torch Linear weights are [out, in] and our kernels [in, out]; the patch conv is
[out, in, kh, kw] in torch and [kh, kw, in, out] here. Both maps are transposes, so
import(export(p)) == p exactly.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

import numpy as np
import safetensors
import safetensors.numpy

from aesalign_jax.models.clip import ClipConfig, abstract_params

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


class CheckpointError(ValueError):
  """A checkpoint folder, file or tensor that cannot be used; the message names which."""


def _tower_pairs(tower: str, layers: int) -> Iterator[tuple[tuple, str, str]]:
  """(our path, HF key, kind) for one tower; kind says how to convert the tensor."""
  hf = f'{tower}_model'
  for i in range(layers):
    ours = (tower, 'transformer', 'blocks', i)
    theirs = f'{hf}.encoder.layers.{i}'
    for a, b in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('out', 'out_proj')):
      yield ours + ('attn', a, 'kernel'), f'{theirs}.self_attn.{b}.weight', 'linear'
      yield ours + ('attn', a, 'bias'), f'{theirs}.self_attn.{b}.bias', 'copy'
    for a, b in (('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')):
      yield ours + (a, 'kernel'), f'{theirs}.{b}.weight', 'linear'
      yield ours + (a, 'bias'), f'{theirs}.{b}.bias', 'copy'
    for a, b in (('ln1', 'layer_norm1'), ('ln2', 'layer_norm2')):
      yield ours + (a, 'scale'), f'{theirs}.{b}.weight', 'copy'
      yield ours + (a, 'bias'), f'{theirs}.{b}.bias', 'copy'


def param_map(cfg: ClipConfig) -> list[tuple[tuple, str, str]]:
  """Every parameter: (path in our nested dict, transformers state-dict key, conversion)."""
  v, t = 'vision_model', 'text_model'
  pairs = [
      (('vision', 'patch_embed'), f'{v}.embeddings.patch_embedding.weight', 'conv'),
      (('vision', 'class_embedding'), f'{v}.embeddings.class_embedding', 'copy'),
      (('vision', 'pos_embedding'), f'{v}.embeddings.position_embedding.weight', 'copy'),
      (('vision', 'pre_ln', 'scale'), f'{v}.pre_layrnorm.weight', 'copy'),  # sic, transformers
      (('vision', 'pre_ln', 'bias'), f'{v}.pre_layrnorm.bias', 'copy'),
      (('vision', 'post_ln', 'scale'), f'{v}.post_layernorm.weight', 'copy'),
      (('vision', 'post_ln', 'bias'), f'{v}.post_layernorm.bias', 'copy'),
      (('vision', 'proj', 'kernel'), 'visual_projection.weight', 'linear'),
      (('text', 'token_embedding'), f'{t}.embeddings.token_embedding.weight', 'copy'),
      (('text', 'pos_embedding'), f'{t}.embeddings.position_embedding.weight', 'copy'),
      (('text', 'final_ln', 'scale'), f'{t}.final_layer_norm.weight', 'copy'),
      (('text', 'final_ln', 'bias'), f'{t}.final_layer_norm.bias', 'copy'),
      (('text', 'proj', 'kernel'), 'text_projection.weight', 'linear'),
      (('logit_scale',), 'logit_scale', 'copy'),
  ]
  if cfg.logit_bias_init is not None:
    # SigLIP's learned bias, under transformers' SiglipModel name. transformers.CLIPModel
    # skips it as an unexpected key (with a warning): CLIP's logits have no bias, and a
    # constant shift of every similarity changes no ranking.
    pairs.append((('logit_bias',), 'logit_bias', 'copy'))
  for i in range(len(cfg.stem_channels)):
    # The hybrid's conv stem: keys of our own beside transformers' (see config_to_hf).
    stem = f'{v}.embeddings.stem.{i}'
    pairs += [(('vision', 'stem', i, 'kernel'), f'{stem}.weight', 'conv'),
              (('vision', 'stem', i, 'norm', 'scale'), f'{stem}.norm.weight', 'copy'),
              (('vision', 'stem', i, 'norm', 'bias'), f'{stem}.norm.bias', 'copy')]
  pairs += _tower_pairs('vision', cfg.vision_layers)
  pairs += _tower_pairs('text', cfg.text_layers)
  return pairs


def _to_ours(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'linear':
    return np.ascontiguousarray(x.T)
  if kind == 'conv':
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return x


def _to_theirs(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'linear':
    return np.ascontiguousarray(x.T)
  if kind == 'conv':
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return np.asarray(x)   # not ascontiguousarray: it would turn the scalar logit_scale 1-D


# ---------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ClipConfig:
  """ClipConfig from a transformers CLIPConfig dict; errors name the file and key."""
  if hf.get('model_type') != 'clip':
    raise CheckpointError(f'{source}: key "model_type" is {hf.get("model_type")!r}, expected '
                          '"clip" (a transformers CLIPModel checkpoint)')
  try:
    tc, vc = hf['text_config'], hf['vision_config']
  except KeyError as e:
    raise CheckpointError(f'{source}: missing key {e.args[0]!r}') from None

  def get(section, name, key, default=None):
    value = section.get(key, default)
    if value is None:
      raise CheckpointError(f'{source}: missing key "{name}.{key}"')
    return value

  if vc.get('num_channels', 3) != 3:
    raise CheckpointError(f'{source}: key "vision_config.num_channels" must be 3')
  eps_v, eps_t = vc.get('layer_norm_eps', 1e-5), tc.get('layer_norm_eps', 1e-5)
  if eps_v != eps_t:
    raise CheckpointError(f'{source}: text and vision layer_norm_eps differ ({eps_t}, {eps_v})')
  return ClipConfig(
      image_size=get(vc, 'vision_config', 'image_size', 224),
      patch_size=get(vc, 'vision_config', 'patch_size', 32),
      vision_width=get(vc, 'vision_config', 'hidden_size', 768),
      vision_layers=get(vc, 'vision_config', 'num_hidden_layers', 12),
      vision_heads=get(vc, 'vision_config', 'num_attention_heads', 12),
      vision_mlp=get(vc, 'vision_config', 'intermediate_size', 3072),
      vision_act=get(vc, 'vision_config', 'hidden_act', 'quick_gelu'),
      vocab_size=get(tc, 'text_config', 'vocab_size', 49408),
      context_length=get(tc, 'text_config', 'max_position_embeddings', 77),
      text_width=get(tc, 'text_config', 'hidden_size', 512),
      text_layers=get(tc, 'text_config', 'num_hidden_layers', 12),
      text_heads=get(tc, 'text_config', 'num_attention_heads', 8),
      text_mlp=get(tc, 'text_config', 'intermediate_size', 2048),
      text_act=get(tc, 'text_config', 'hidden_act', 'quick_gelu'),
      embed_dim=hf.get('projection_dim', 512),
      layer_norm_eps=eps_v,
      logit_scale_init=hf.get('logit_scale_init_value', math.log(1 / 0.07)),
      eos_token_id=get(tc, 'text_config', 'eos_token_id', 49407),
      vision_stem=vc.get('vision_stem', 'patch'),
      logit_bias_init=hf.get('logit_bias_init_value'),
  )


def config_to_hf(cfg: ClipConfig) -> dict:
  """A transformers CLIPConfig dict (what save_pretrained writes to config.json).

  A conv-stem (hybrid) model adds `vision_config.vision_stem = "conv"` and its stem tensors:
  this project loads the folder, transformers.CLIPModel does not (it has no conv stem, and
  refuses the 1x1 patch embedding's shape).
  """
  hf = {
      'architectures': ['CLIPModel'],
      'model_type': 'clip',
      'projection_dim': cfg.embed_dim,
      'logit_scale_init_value': cfg.logit_scale_init,
      'torch_dtype': 'float32',
      'text_config': {
          'model_type': 'clip_text_model', 'vocab_size': cfg.vocab_size,
          'hidden_size': cfg.text_width, 'intermediate_size': cfg.text_mlp,
          'num_hidden_layers': cfg.text_layers, 'num_attention_heads': cfg.text_heads,
          'max_position_embeddings': cfg.context_length, 'hidden_act': cfg.text_act,
          'layer_norm_eps': cfg.layer_norm_eps, 'projection_dim': cfg.embed_dim,
          'eos_token_id': cfg.eos_token_id,
          # CLIP's start token sits just below its end token (OpenAI's 49406/49407, and the
          # last two ids of our trained BPE); transformers warns on an out-of-vocabulary default.
          'bos_token_id': cfg.eos_token_id - 1,
      },
      'vision_config': {
          'model_type': 'clip_vision_model', 'image_size': cfg.image_size,
          'patch_size': cfg.patch_size, 'num_channels': 3, 'hidden_size': cfg.vision_width,
          'intermediate_size': cfg.vision_mlp, 'num_hidden_layers': cfg.vision_layers,
          'num_attention_heads': cfg.vision_heads, 'hidden_act': cfg.vision_act,
          'layer_norm_eps': cfg.layer_norm_eps, 'projection_dim': cfg.embed_dim,
      },
  }
  if cfg.logit_bias_init is not None:
    hf['logit_bias_init_value'] = cfg.logit_bias_init
  if cfg.vision_stem != 'patch':
    hf['vision_config']['vision_stem'] = cfg.vision_stem
  return hf


# ---------------------------------------------------------------------------------- import


def _weight_files(folder: str) -> list[str]:
  index = os.path.join(folder, INDEX_FILE)
  if os.path.exists(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(folder, s) for s in shards]
  single = os.path.join(folder, WEIGHTS_FILE)
  if os.path.exists(single):
    return [single]
  pickled = [n for n in ('pytorch_model.bin', 'model.pt') if os.path.exists(os.path.join(folder, n))]
  hint = (f' (found {pickled[0]}: pickled weights are never loaded; convert it to safetensors '
          'with transformers first)' if pickled else '')
  raise CheckpointError(f'{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}')


def _read_tensors(files: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  tensors, origin = {}, {}
  for path in files:
    try:
      with safetensors.safe_open(path, framework='numpy') as f:
        for key in f.keys():
          tensors[key] = f.get_tensor(key)
          origin[key] = path
    except CheckpointError:
      raise
    except Exception as e:  # truncated or corrupt file: safetensors raises several types
      raise CheckpointError(f'{path}: cannot read safetensors file ({type(e).__name__}: {e})') from e
  return tensors, origin


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load_hf_folder(folder: str) -> tuple[ClipConfig, dict]:
  """(ClipConfig, params as nested dict of fp32 numpy arrays) from a transformers CLIP folder."""
  config_path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isdir(folder):
    raise CheckpointError(f'{folder}: not a folder')
  if not os.path.exists(config_path):
    raise CheckpointError(f'{folder}: no {CONFIG_FILE}')
  try:
    with open(config_path, encoding='utf-8') as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{config_path}: not valid JSON ({e})') from e
  cfg = config_from_hf(hf_config, config_path)
  tensors, origin = _read_tensors(_weight_files(folder))
  shapes = abstract_params(cfg)
  params: dict = {}
  for ours, theirs, kind in param_map(cfg):
    if theirs not in tensors:
      raise CheckpointError(f'{folder}: tensor {theirs!r} missing from the weights')
    value = _to_ours(tensors[theirs], kind).astype(np.float32)
    want = tuple(_get(shapes, ours).shape)
    if value.shape != want:
      raise CheckpointError(f'{origin[theirs]}: tensor {theirs!r} has shape '
                            f'{tuple(tensors[theirs].shape)}, config.json implies '
                            f'{_to_theirs(np.empty(want), kind).shape}')
    _set(params, ours, value)
  return cfg, params


# ---------------------------------------------------------------------------------- export


def save_hf_folder(cfg: ClipConfig, params: dict, folder: str) -> None:
  """Writes config.json and model.safetensors that transformers.CLIPModel.from_pretrained loads.

  The weights file is written to a temporary name and renamed, so a crash never leaves a
  half-written model.safetensors behind.
  """
  os.makedirs(folder, exist_ok=True)
  tensors = {theirs: _to_theirs(np.asarray(_get(params, ours), np.float32), kind)
             for ours, theirs, kind in param_map(cfg)}
  tmp = os.path.join(folder, WEIGHTS_FILE + '.tmp')
  safetensors.numpy.save_file(tensors, tmp, metadata={'format': 'pt'})
  os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
  with open(os.path.join(folder, CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(config_to_hf(cfg), f, indent=2)
