"""Checks a config before anything compiles; every error names the config key at fault."""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re

import jax

from aesalign_jax import models, retrieval, search, sharding, train
from aesalign_jax.models import hf

PLACEHOLDER = '/path/to/'   # how configs/real.py marks a path the user must set


CPU_COLLECTIVES = ('', 'gloo', 'mpi')


def check_distributed(c) -> None:
  """Refuses a `distributed` section jax.distributed.initialize cannot use, naming the key."""
  if c.initialize not in ('auto', 'on', 'off'):
    raise ValueError(f'config.distributed.initialize={c.initialize!r}: expected auto, on or off')
  if c.cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f'config.distributed.cpu_collectives={c.cpu_collectives!r}: expected one '
                     f'of {CPU_COLLECTIVES}')
  explicit = (bool(c.coordinator_address), c.num_processes != -1, c.process_id != -1)
  if any(explicit) and not all(explicit):
    raise ValueError('config.distributed.coordinator_address, num_processes and process_id '
                     'are given together or not at all (got '
                     f'{c.coordinator_address!r}, {c.num_processes}, {c.process_id})')
  if not any(explicit):
    return
  host, _, port = c.coordinator_address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'config.distributed.coordinator_address={c.coordinator_address!r}: '
                     'expected host:port, e.g. 127.0.0.1:12345')
  if c.num_processes < 1:
    raise ValueError(f'config.distributed.num_processes={c.num_processes} must be >= 1')
  if not 0 <= c.process_id < c.num_processes:
    raise ValueError(f'config.distributed.process_id={c.process_id} must be in [0, '
                     f'num_processes={c.num_processes})')
  if c.initialize == 'off':
    raise ValueError("config.distributed.initialize='off' with a coordinator_address: set "
                     "initialize to 'auto' (or 'on') to launch several processes")


def validate(config, num_devices: int | None = None, *, check_inputs: bool = True):
  """Raises ValueError naming the key for a config that cannot run; returns the ClipConfig.

  check_inputs: also check that every file and folder the run reads exists (all missing ones
  in one error) and that the stages can read the sources the config names. False checks the
  shapes, mesh and numbers only, e.g. a real-run config on a machine without its files.
  """
  if check_inputs:
    check_input_paths(config)
  if config.get('distributed') is not None:
    check_distributed(config.distributed)
  if config.pretrain.steps < 0:
    raise ValueError(f'config.pretrain.steps={config.pretrain.steps} must be >= 0 (0: the '
                     'model.hf_folder checkpoint is the pretrained model as it is)')
  if config.pretrain.steps == 0 and not config.model.hf_folder:
    raise ValueError('config.pretrain.steps=0 uses config.model.hf_folder as the pretrained '
                     'model, but config.model.hf_folder is empty')
  cfg = models.clip_config(config.model)
  n = jax.device_count() if num_devices is None else num_devices
  mesh = sharding.mesh_shape(config.mesh, n)
  rules = sharding.check_rules(config.rules)
  processes = jax.process_count()
  for key in ('pretrain.batch_size', 'align.batch_size', 'align.groups_per_step'):
    section, field = key.split('.')
    value = config[section][field]
    if processes > 1 and value % processes:
      raise ValueError(f'config.{key}={value} is not a multiple of the {processes} processes '
                       '(each reads an equal block of every batch)')
  tok = config.tokenizer
  if tok.context_length is not None and tok.context_length != cfg.context_length:
    raise ValueError(f'config.tokenizer.context_length={tok.context_length} differs from the '
                     f"model's context length {cfg.context_length} (config.model)")
  if not tok.folder and config.data.source != 'world':
    raise ValueError(f'config.tokenizer.folder is empty: with config.data.source='
                     f'{config.data.source!r} name a tokenizer folder (the checkpoint\'s); a '
                     'tokenizer is trained only on the embedded world\'s captions')
  if not tok.folder and tok.vocab_size > cfg.vocab_size:
    raise ValueError(f'config.tokenizer.vocab_size={tok.vocab_size} exceeds the model '
                     f'vocabulary {cfg.vocab_size} (config.model.overrides.vocab_size)')
  if config.data.source == 'world' and config.world.image_size != cfg.image_size:
    raise ValueError(f'config.world.image_size={config.world.image_size} differs from the '
                     f'model image size {cfg.image_size} (config.model)')
  if config.data.source != 'world' and config.data.image_size != cfg.image_size:
    raise ValueError(f'config.data.image_size={config.data.image_size} differs from the '
                     f'model image size {cfg.image_size} (config.model)')
  iap = config.aesthetics.iap
  if (config.aesthetics.kind == 'iap' and iap.weights and not iap.get('clip_folder')
      and iap.embed_dim != cfg.embed_dim):
    raise ValueError(f'config.aesthetics.iap.embed_dim={iap.embed_dim} differs from the '
                     f"model's embedding width {cfg.embed_dim}: without "
                     'config.aesthetics.iap.clip_folder the head scores the model\'s own image '
                     'embeddings')
  batches = ['align.batch_size', 'align.groups_per_step']
  if config.pretrain.steps:   # 0: no pretraining runs, its section is not read
    train.validate(config.pretrain, 'pretrain')
    batches.insert(0, 'pretrain.batch_size')
  train.validate(config.align, 'align')
  retrieval.validate(config.retrieval)
  if config.get('serve') is not None:
    search.validate(config.serve)
  if check_inputs and config.aesthetics.kind == 'iap' and iap.weights and iap.get('clip_folder'):
    width = _checkpoint_embed_dim(iap.clip_folder)   # (check_input_paths: the folder exists)
    if width != iap.embed_dim:
      raise ValueError(f'config.aesthetics.iap.embed_dim={iap.embed_dim} differs from the '
                       f'embedding width {width} of config.aesthetics.iap.clip_folder='
                       f'{iap.clip_folder!r}')
  # Batches are split over the mesh axes that 'batch' maps to (data x fsdp by default).
  shards = math.prod(mesh[a] for a in rules.get('batch', ()))
  for key in batches:
    section, field = key.split('.')
    value = config[section][field]
    if value % jax.process_count():
      raise ValueError(f'config.{key}={value} is not divisible by the '
                       f'{jax.process_count()} processes')
    if value % shards:
      raise ValueError(f'config.{key}={value} is not divisible by the {shards} devices the '
                       f'batch is split over (config.mesh {mesh}, rule for "batch")')
  if check_inputs:
    check_stages_read(config)
  return cfg


def _checkpoint_embed_dim(folder: str) -> int:
  """The image embedding width of a Hugging Face CLIP folder, from its config.json."""
  path = os.path.join(folder, hf.CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f'config.aesthetics.iap.clip_folder={folder!r}: no {hf.CONFIG_FILE}')
  with open(path, encoding='utf-8') as f:
    return hf.config_from_hf(json.load(f), path).embed_dim


def _path_problem(key: str, value, kind: str) -> str | None:
  """None if `value` is an existing file/folder (kind 'file' | 'dir' | 'any'), else why not."""
  if not value:
    return f'config.{key} is empty'
  ok = {'file': os.path.isfile, 'dir': os.path.isdir, 'any': os.path.exists}[kind](value)
  if ok:
    return None
  what = {'file': 'no such file', 'dir': 'no such folder', 'any': 'does not exist'}[kind]
  hint = f' (a placeholder: set --config.{key})' if str(value).startswith(PLACEHOLDER) else ''
  return f'config.{key}={value!r}: {what}{hint}'


def _data_paths(prefix: str, d) -> list:
  """(key, value, kind) for an input_pipeline data section (config.data or an eval's data)."""
  out = []
  if d.source in ('jsonl', 'csv'):
    out.append((f'{prefix}.path', d.path, 'file'))
  elif d.source == 'folder':
    out.append((f'{prefix}.path', d.path, 'dir'))
  if d.source in ('jsonl', 'csv') and d.get('root'):
    out.append((f'{prefix}.root', d.root, 'dir'))
  if d.source == 'tfds' and d.get('tfds_data_dir'):
    out.append((f'{prefix}.tfds_data_dir', d.tfds_data_dir, 'dir'))
  return out


def input_paths(config) -> list:
  """(key, value, kind) of every file or folder this config makes the run read."""
  paths = []
  if config.model.hf_folder:
    paths.append(('model.hf_folder', config.model.hf_folder, 'dir'))
  if config.tokenizer.folder:
    paths.append(('tokenizer.folder', config.tokenizer.folder, 'dir'))
  if config.data.source != 'world':
    paths += _data_paths('data', config.data)
  if config.mine.get('queries_path'):
    paths.append(('mine.queries_path', config.mine.queries_path, 'file'))
  if config.mine.embeddings_dir:
    paths.append(('mine.embeddings_dir', config.mine.embeddings_dir, 'dir'))
  a = config.aesthetics
  if a.kind == 'iap' and a.iap.weights:
    paths.append(('aesthetics.iap.weights', a.iap.weights, 'file'))
  if a.kind == 'iap' and a.iap.get('clip_folder'):
    paths.append(('aesthetics.iap.clip_folder', a.iap.clip_folder, 'dir'))
  r = config.rephrase
  if r.backend == 'hf':
    paths.append(('rephrase.model', r.model, 'dir'))
  if r.backend == 'lexicon' and str(r.vocabulary).endswith('.json'):
    paths.append(('rephrase.vocabulary', r.vocabulary, 'file'))
  if config.align.dpo_path:
    paths.append(('align.dpo_path', config.align.dpo_path, 'any'))
  for name, e in config.evals.items():
    if not hasattr(e, 'get') or not e.get('enabled', True):
      continue   # (a malformed section is refused by make_evaluators, naming it)
    if e.get('source') == 'data':
      paths += _data_paths(f'evals.{name}.data', e.data)
    if e.get('task') == 'tfds' and e.get('tfds_data_dir'):
      paths.append((f'evals.{name}.tfds_data_dir', e.tfds_data_dir, 'dir'))
    if isinstance(e.get('class_names'), str) and e.class_names:
      paths.append((f'evals.{name}.class_names', e.class_names, 'file'))
    if e.get('queries_path'):
      paths.append((f'evals.{name}.queries_path', e.queries_path, 'file'))
    if e.get('type', name) == 'hpir' and e.get('path'):
      paths.append((f'evals.{name}.path', e.path, 'file'))
  return paths


def check_input_paths(config) -> None:
  """Refuses a config naming inputs that are not there: one error listing every such key."""
  problems = [p for p in (_path_problem(*entry) for entry in input_paths(config)) if p]
  if config.rephrase.backend == 'openai' and not config.rephrase.model:
    problems.append('config.rephrase.model is empty (the openai backend needs the model name '
                    'the endpoint serves)')
  if problems:
    raise ValueError('missing inputs:\n  ' + '\n  '.join(problems))


def check_stages_read(config) -> None:
  """Refuses what the stages cannot do with the inputs named: what needs ground truth (the
  embedded world is the one corpus with it) on a corpus without it."""
  problems = []
  real = config.data.source != 'world'
  a = config.aesthetics
  if real and a.kind == 'iap' and not a.iap.weights:
    problems.append('config.aesthetics.iap.weights is empty: an IAP head is trained only on '
                    'the embedded world\'s simulated ratings; give trained weights (README '
                    '"Real runs") or set config.aesthetics.kind=lowlevel')
  for name, e in config.evals.items():
    if not hasattr(e, 'get') or not e.get('enabled', True):
      continue
    kind = e.get('type', name)
    key = f'config.evals.{name}'
    if kind == 'retrieval' and e.get('source') not in ('corpus', 'data'):
      problems.append(f"{key}.source={e.get('source')!r}: expected 'corpus' or 'data'")
    if kind == 'topk_quality' and real and not e.get('queries_path'):
      problems.append(f'{key}.queries_path is empty: top-k quality on the corpus needs the '
                      'held-out queries (a text file, one a line, or JSON Lines {"query"})')
    if real and kind == 'zeroshot' and str(e.get('task')).startswith('world'):
      problems.append(f'{key} evaluates on the embedded world, not on real data: give it a '
                      "data set (zero-shot task 'tfds') or disable it "
                      f'(--{key[len("config."):]}.enabled=False)')
  if real and config.judge.kind == 'world':
    problems.append("config.judge.kind='world' judges by the embedded world's ground truth, "
                    "which real data do not have: set it to 'scorer' or 'openai'")
  if problems:
    raise ValueError('inputs the stages cannot read (aesalign_jax/stages/):\n  '
                     + '\n  '.join(problems))


def unknown_override(argv) -> str | None:
  """What is wrong with the first --config.a.b override in a command line (main.py's argv)
  naming no key of the --config file, e.g. "--config.pretrain.stepz=5: config.pretrain.stepz is
  not a config key (did you mean config.pretrain.steps?)"; None when every override names
  one, or when the config file cannot be read (then absl's own error stands).

  ml_collections raises a bare KeyError or AttributeError for such an override while it parses
  the flags; main.py asks this to refuse it like every other bad config."""
  config_arg = None
  for i, arg in enumerate(argv):
    if re.fullmatch(r'--?config', arg) and i + 1 < len(argv):
      config_arg = argv[i + 1]
    elif arg.startswith(('--config=', '-config=')):
      config_arg = arg.split('=', 1)[1]
  try:
    config = _load_config_file(config_arg)
  except Exception:   # pylint: disable=broad-except
    return None
  for arg in argv:
    match = re.match(r'--?(?:no)?config\.([^=]+)', arg)
    if not match or '[' in match.group(1):   # (an index into a list field: not walked)
      continue
    node, walked = config, []
    for field in match.group(1).split('.'):
      fields = list(node.keys()) if hasattr(node, 'keys') else []
      if field not in fields:
        close = difflib.get_close_matches(field, fields, n=1)
        hint = f' (did you mean config.{".".join(walked + close)}?)' if close else ''
        return f'{arg}: config.{".".join(walked + [field])} is not a config key{hint}'
      walked.append(field)
      node = node[field]
  return None


def _load_config_file(config_arg: str):
  """get_config(arg) of 'file.py:arg' (get_config() without ':'), as --config loads it."""
  path, *arg = config_arg.split(':', 1)
  spec = importlib.util.spec_from_file_location('config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)
