"""Shared fixtures: a tiny CLIP pretrained on the embedded world, built once per session."""

import jax
import numpy as np
import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()   # grain worker processes read absl flags


@pytest.fixture(scope='session')
def pretrained_world_model(tmp_path_factory):
  """200 contrastive steps of a 2-layer tiny CLIP on 20k world images (about a minute)."""
  from aesalign_jax import sharding, tokenizer, train
  from aesalign_jax.models import clip
  from configs import default
  from input_pipeline import pipeline, world as world_lib
  root = tmp_path_factory.mktemp('pretrained')
  config = default.get_config('smoke')
  world = world_lib.World(config.world, num_train=20000, num_eval=2000)
  tok = tokenizer.train_bpe(world.captions(np.arange(5000)), vocab_size=400,
                            folder=str(root / 'tok'), context_length=16)
  cfg = clip.preset('tiny', vision_layers=2, text_layers=2, vocab_size=400,
                    eos_token_id=tok.eos_token_id)
  c = config.pretrain
  c.steps, c.batch_size, c.log_every, c.checkpoint_every = 200, 64, 100, 1000
  c.optim.lr, c.optim.warmup_steps = 1e-3, 30
  pairs = iter(pipeline.make_batched_source_pipeline(
      world.split_range('train'), world.batch, batch_size=64, seed=0, tokenize=tok))
  result = train.fit(kind='pretrain', c=c, model_cfg=cfg, init_params=clip.init_params(cfg),
                     iterators={'pairs': pairs}, mesh=sharding.make_mesh(config.mesh),
                     rules=config.rules, workdir=str(root / 'pretrain'))
  return {'root': root, 'world': world, 'tok': tok, 'cfg': cfg,
          'params': jax.device_get(result.params)}
