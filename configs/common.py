"""Config snippets shared by every experiment (big_vision style: one place, read in a minute).

Each experiment file (configs/default.py, ...) exposes get_config(arg) and builds its config from
these sections. `arg` is a comma-separated list: `smoke` shrinks everything for a quick run, and
`key=value` items set top-level switches, e.g. `--config=configs/default.py:smoke`.
Any field can also be overridden on the command line: `--config.model.preset=vit_b16`.
"""

import dataclasses

import ml_collections

from aesalign_jax import aesthetics, mining, rephrase, retrieval, search, sharding, stages
from aesalign_jax import tokenizer
from aesalign_jax import train
from aesalign_jax.aesthetics import world_iap
from aesalign_jax.evaluation import common as evals_common
from aesalign_jax.evaluation import hpir_world, judge
from aesalign_jax.models import clip
from input_pipeline import pipeline, world

MODES = stages.MODES


def parse_arg(arg: str | None) -> dict:
  """'smoke,res=64' -> {'smoke': True, 'res': '64'}."""
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    out[key.strip()] = value.strip() if value else True
  return out


def model_config() -> ml_collections.ConfigDict:
  """The CLIP to build: a preset trained from scratch, or a Hugging Face folder to start from."""
  c = ml_collections.ConfigDict()
  c.preset = 'tiny'        # tiny | vit_b32 | vit_b16 | vit_l14 (aesalign_jax/models/clip.py)
  c.hf_folder = ''         # a transformers CLIPModel folder; overrides preset when set
  c.dtype = 'float32'      # compute dtype: float32 | bfloat16 (parameters stay fp32)
  c.remat = False          # rematerialise transformer blocks (saves memory, costs compute)
  c.attention = 'auto'     # auto | einsum | fused (cuDNN on GPU); see ClipConfig
  # Shape overrides of the preset (None = the preset's value), e.g.
  # --config.model.overrides.vision_layers=2. Keys are the ClipConfig fields.
  c.overrides = ml_collections.ConfigDict({
      f.name: ml_collections.config_dict.placeholder(type(f.default))
      for f in dataclasses.fields(clip.ClipConfig) if f.name not in ('dtype', 'remat', 'attention')})
  return c


def distributed_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # auto: call jax.distributed.initialize when the launcher runs several processes (Cloud TPU
  # multi-host, SLURM, MPI, or JAX_COORDINATOR_ADDRESS set); on: always; off: never.
  c.initialize = 'auto'
  # An explicit launch (e.g. several processes on one machine, each with its own process_id):
  # host:port of process 0's coordinator, the number of processes and this one's id. Empty /
  # -1: jax finds them in the launcher's environment (Cloud TPU, SLURM, MPI).
  c.coordinator_address = ''
  c.num_processes = -1
  c.process_id = -1
  # CPU collectives across processes: '' (jax's default: none, one process only) | 'gloo' |
  # 'mpi'. A multi-process run on CPU needs one, else cross-process steps fail.
  c.cpu_collectives = ''
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.tokenizer = tokenizer.default_config()
  c.data = pipeline.default_config()
  shard = sharding.default_config()
  c.mesh = shard.mesh       # devices per axis (data, fsdp, tensor); -1 = the rest
  c.rules = shard.rules     # logical axis name -> mesh axes
  c.distributed = distributed_config()
  c.aesthetics = aesthetics.default_config()
  c.rephrase = rephrase.default_config()
  c.mine = mining.default_config()
  c.retrieval = retrieval.default_config()
  c.evals = evals_common.default_config()
  c.judge = judge.default_config()
  c.pretrain = train.default_config('pretrain')
  c.align = train.default_config('align')
  c.serve = search.default_config()   # --mode=serve and python -m aesalign_jax.search
  return c


def add_world(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The embedded world as the corpus (config.data.source='world'), and the sections only a
  world with ground truth reads: its generator, the IAP head trained on its simulated
  ratings, and the HPIR-format benchmark drawn from it."""
  c.data.source = 'world'
  c.world = world.default_config()
  c.world_iap = world_iap.default_config()
  c.hpir_world = hpir_world.default_config()
  return c
