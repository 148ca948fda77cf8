"""Run in a subprocess (tests/test_real_configs.py): python real_config_shapes.py N:VARIANT...

With 32 fake CPU devices, builds for each configs/real.py variant, on a mesh over the first N
devices, the model config (shapes from its preset: configs.real.shape_only), the mesh, the
optimizer and the full sharded train state of both training stages under jax.eval_shape: no
weights, no data, no FLOPs. Prints one JSON line per variant.
"""

import json
import math
import os
import sys

MAX_DEVICES = 32   # a v5e-32 slice
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={MAX_DEVICES}')
import jax  # noqa: E402
import numpy as np  # noqa: E402

from aesalign_jax import config_checks, mining, optim, sharding, train  # noqa: E402
from aesalign_jax.models import clip  # noqa: E402
from configs import real  # noqa: E402

LARGE = 1 << 20   # kernels of at least this many elements must not stay whole on a device


def _bytes(x, per_device: bool) -> int:
  shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
  return math.prod(shape) * np.dtype(x.dtype).itemsize


def sharded_state(config, cfg, kind: str, mesh) -> dict:
  """The train state of `kind` as ShapeDtypeStructs carrying their NamedShardings."""
  c = config[kind]
  params = clip.abstract_params(cfg)
  optimizer, _ = optim.make_optimizer(c.optim, c.steps, params)
  init = lambda p: train.init_state(p, optimizer, config.seed)
  specs = train.state_specs(jax.eval_shape(init, params), cfg, mesh, config.rules)
  return jax.eval_shape(jax.jit(init, out_shardings=sharding.named(mesh, specs)), params)


def describe(variant: str, devices: int) -> dict:
  config = real.shape_only(real.get_config(variant))
  cfg = config_checks.validate(config, num_devices=devices, check_inputs=False)
  mining.validate(config.mine, config.align.u, config.align.v)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  out = {'variant': variant, 'mesh': dict(mesh.shape), 'dtype': cfg.dtype, 'remat': cfg.remat,
         'param_count': sum(math.prod(x.shape) for x in
                            jax.tree.leaves(clip.abstract_params(cfg)))}
  for kind in ('pretrain', 'align'):
    state = sharded_state(config, cfg, kind, mesh)
    fc1 = lambda tree: tree['vision']['transformer']['blocks'][0]['fc1']['kernel']
    adam = [s for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda s: hasattr(s, 'mu'))
            if hasattr(s, 'mu')][0]
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    tokens = state['params']['text']['token_embedding']
    out[kind] = {
        'param_dtypes': sorted({str(x.dtype) for x in jax.tree.leaves(state['params'])}),
        'fc1_shape': list(fc1(state['params']).shape),
        'fc1_shard': list(fc1(state['params']).sharding.shard_shape(fc1(state['params']).shape)),
        'fc1_mu_shard': list(fc1(adam.mu).sharding.shard_shape(fc1(adam.mu).shape)),
        'token_embedding_shape': list(tokens.shape),
        'token_embedding_shard': list(tokens.sharding.shard_shape(tokens.shape)),
        'whole_large_leaves': [jax.tree_util.keystr(p) for p, x in leaves
                               if math.prod(x.shape) >= LARGE
                               and x.sharding.shard_shape(x.shape) == x.shape],
        'state_bytes': sum(_bytes(x, False) for x in jax.tree.leaves(state)),
        'state_bytes_per_device': sum(_bytes(x, True) for x in jax.tree.leaves(state)),
    }
  return out


if __name__ == '__main__':
  for item in sys.argv[1:]:
    n, _, variant = item.partition(':')
    print(json.dumps(describe(variant, int(n))), flush=True)
