"""Run in a subprocess with 8 fake CPU devices (tests/test_fit_multidevice.py): align steps of a
ViT-B/32-shaped CLIP through train.fit on a data=2, fsdp=4 mesh and on one device, from the
same start and data. Prints one JSON object.

The model keeps ViT-B/32's patch 32, head size 64, quick_gelu and layer layout, shrunk to
width 128, 2 layers per tower, 64x64 images (4 patches + the class token) and a 1k vocabulary,
so that two runs fit in well under a minute on 2 CPU cores.
"""

import json
import os
import sys
import tempfile

# LLVM at -O0: compiling is most of these short runs' time (-35%), and both programs compared
# are compiled alike.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from aesalign_jax import sharding, train  # noqa: E402
from aesalign_jax.models import clip  # noqa: E402

import synthetic_batches  # noqa: E402

CFG = clip.preset('vit_b32', image_size=64, vision_width=128, vision_layers=2, vision_heads=2,
                  vision_mlp=512, text_width=128, text_layers=2, text_heads=2, text_mlp=512,
                  embed_dim=128, vocab_size=1024, context_length=16, eos_token_id=1023)
STEPS, U, V, GROUPS, PAIRS = 4, 2, 2, 8, 16


def run(mesh, workdir, params):
  c = train.default_config('align')
  c.steps, c.batch_size, c.groups_per_step, c.u, c.v = STEPS, PAIRS, GROUPS, U, V
  c.log_every, c.checkpoint_every, c.async_checkpoints = 1, 100, False
  c.optim.lr, c.optim.warmup_steps = 1e-3, 1
  rules = sharding.default_config().rules
  iterators = {'pairs': synthetic_batches.pairs_iterator(CFG, PAIRS, seed=0),
               'groups': synthetic_batches.groups_iterator(CFG, GROUPS, U, V, seed=1)}
  result = train.fit(kind='align', c=c, model_cfg=CFG, init_params=params, iterators=iterators,
                     mesh=mesh, rules=rules, workdir=workdir)
  specs = sharding.param_specs(clip.logical_axes(CFG), params, mesh, rules)
  return result, specs, train.contrastive_sharding(c, mesh, rules) is not None


def main():
  assert jax.device_count() == 8, jax.devices()
  params = jax.device_get(clip.init_params(CFG, seed=0))
  root = tempfile.mkdtemp()
  mesh8 = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  mesh1 = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  r8, specs8, sharded8 = run(mesh8, os.path.join(root, 'mesh8'), params)
  r1, _, sharded1 = run(mesh1, os.path.join(root, 'mesh1'), params)

  leaves8 = jax.tree_util.tree_flatten_with_path(r8.params)[0]
  spec_leaves = jax.tree.leaves(specs8, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  mismatched = [jax.tree_util.keystr(p) for (p, x), s in zip(leaves8, spec_leaves)
                if x.sharding.spec != s or x.sharding.mesh != mesh8]
  p8, p1, p0 = (jax.tree.leaves(jax.device_get(t)) for t in (r8.params, r1.params, params))
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(p8, p1))
  update = max(float(np.max(np.abs(b - z))) for b, z in zip(p1, p0))
  fc1 = r8.params['vision']['transformer']['blocks'][0]['fc1']['kernel']
  print(json.dumps({
      'losses8': [h['loss'] for h in r8.history], 'losses1': [h['loss'] for h in r1.history],
      'dpo8': [h['dpo_loss'] for h in r8.history], 'dpo1': [h['dpo_loss'] for h in r1.history],
      'steps': [r8.step, r1.step], 'sharded_loss_used': [sharded8, sharded1],
      'mismatched_specs': mismatched, 'num_leaves': len(leaves8),
      'fc1_spec': [str(a) for a in fc1.sharding.spec],
      'fc1_shard_shape': list(fc1.addressable_shards[0].data.shape),
      'param_diff_max': diff,       # largest |p_mesh - p_one_device| of any parameter
      'param_update_max': update,   # largest change of any parameter over the run
      'compile_s': [r8.compile_info['compile_s'], r1.compile_info['compile_s']],
  }), flush=True)


if __name__ == '__main__':
  sys.exit(main())
