"""Shared fixtures, each built once per session: the smoke run of main.py, and a tiny CLIP
pretrained on the embedded world."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()   # grain worker processes read absl flags


def pretrain_on_world(root, *, layers: int, steps: int, batch: int, warmup: int,
                      loss: str = 'infonce', log_every: int = 100, siglip: bool = False):
  """A tiny CLIP pretrained on 20k world images with a BPE trained on their captions."""
  from aesalign_jax import sharding, tokenizer, train
  from aesalign_jax.models import clip
  from configs import default
  from input_pipeline import pipeline, world as world_lib
  config = default.get_config('smoke')
  world = world_lib.World(config.world, num_train=20000, num_eval=2000)
  tok = tokenizer.train_bpe(world.captions(np.arange(5000)), vocab_size=400,
                            folder=str(root / 'tok'), context_length=16)
  cfg = clip.preset('tiny', vision_layers=layers, text_layers=layers, vocab_size=400,
                    eos_token_id=tok.eos_token_id)
  if siglip:
    cfg, _ = clip.with_siglip_bias(cfg)
  c = config.pretrain
  c.loss, c.steps, c.batch_size, c.log_every, c.checkpoint_every = loss, steps, batch, log_every, 1000
  c.optim.lr, c.optim.warmup_steps = 1e-3, warmup
  pairs = iter(pipeline.make_batched_source_pipeline(
      world.split_range('train'), world.batch, batch_size=batch, seed=0, tokenize=tok))
  init = clip.init_params(cfg)
  result = train.fit(kind='pretrain', c=c, model_cfg=cfg, init_params=init,
                     iterators={'pairs': pairs}, mesh=sharding.make_mesh(config.mesh),
                     rules=config.rules, workdir=str(root / 'pretrain'))
  return {'root': root, 'world': world, 'tok': tok, 'cfg': cfg, 'init': init, 'result': result,
          'params': jax.device_get(result.params)}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, workdir, config='configs/default.py:smoke', timeout=300):
  """main.py in a subprocess on the CPU (the smoke config unless `config` is given)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), f'--config={config}',
                         f'--workdir={workdir}', *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope='session')
def smoke_workdir(tmp_path_factory):
  """(workdir, its CompletedProcess): main.py --config=configs/default.py:smoke, every stage
  (about a minute), run once per session. Read it as it is; a test that writes into a run
  works on a copy (shutil.copytree keeps mtimes, so the copied stages stay done)."""
  workdir = tmp_path_factory.mktemp('smoke')
  first = run_main(workdir=workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  return workdir, first


@pytest.fixture(scope='session')
def pretrained_world_model(tmp_path_factory):
  """200 contrastive steps of a 2-layer tiny CLIP on 20k world images (about a minute)."""
  return pretrain_on_world(tmp_path_factory.mktemp('pretrained'), layers=2, steps=200,
                           batch=64, warmup=30)
