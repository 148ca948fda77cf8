"""Run in a subprocess with 8 fake CPU devices (tests/test_sharding.py): the contrastive loss and
its gradients on several meshes against one device, and how the weights are laid out.

Prints one JSON line per mesh.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
import jax  # noqa: E402
import numpy as np  # noqa: E402

from aesalign_jax import losses, sharding  # noqa: E402
from aesalign_jax.models import clip  # noqa: E402

MESHES = [{'data': 8, 'fsdp': 1, 'tensor': 1}, {'data': 2, 'fsdp': 4, 'tensor': 1},
          {'data': 2, 'fsdp': 2, 'tensor': 2}]


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = clip.preset('tiny', vision_layers=2, text_layers=2)
  params = clip.init_params(cfg, seed=0)
  rng = np.random.default_rng(0)
  batch = {'images': rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           'ids': rng.integers(3, cfg.vocab_size, size=(16, cfg.context_length)).astype(np.int32),
           'eos': rng.integers(2, cfg.context_length, size=(16,)).astype(np.int32)}

  def loss_fn(p, b):
    img, txt, scale = clip.bind(cfg, p)(b['images'], b['ids'], b['eos'])
    return losses.clip_infonce(img, txt, scale, label_smoothing=0.1)[0]

  grad_fn = jax.value_and_grad(loss_fn)
  ref_loss, ref_grads = jax.jit(grad_fn)(params, batch)
  rules = sharding.default_config().rules
  for mesh_cfg in MESHES:
    mesh = sharding.make_mesh(mesh_cfg)
    specs = sharding.param_specs(clip.logical_axes(cfg), params, mesh, rules)
    p_shard = sharding.named(mesh, specs)
    b_shard = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
    sharded_params = jax.device_put(params, p_shard)
    sharded_batch = jax.device_put(batch, b_shard)

    def step(p, b):
      with sharding.activation_rules(mesh, rules):
        return grad_fn(p, b)

    step = jax.jit(step, in_shardings=(p_shard, b_shard), out_shardings=(None, p_shard))
    loss, grads = step(sharded_params, sharded_batch)
    # Relative error per leaf; a leaf whose exact gradient is zero (the key bias: softmax is
    # shift-invariant) holds only rounding noise, so its scale is floored at 1e-4 of the
    # largest gradient anywhere.
    floor = 1e-4 * max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) /
                             max(float(np.max(np.abs(np.asarray(b)))), floor))
    leaf_err = max(jax.tree.leaves(jax.tree.map(rel, grads, ref_grads)))
    sq = lambda t: sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(t))
    norm_err = (sq(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), grads, ref_grads))
                / sq(ref_grads)) ** 0.5
    fc1 = sharded_params['vision']['transformer']['blocks'][0]['fc1']['kernel']
    per_device = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                                  for s in x.addressable_shards if s.device == jax.devices()[0])
    print(json.dumps({
        'mesh': mesh_cfg, 'loss': float(loss), 'ref_loss': float(ref_loss),
        'loss_rel_err': abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
        'grad_rel_err': norm_err,        # ||g - g_ref|| / ||g_ref|| over all parameters
        'grad_leaf_rel_err': leaf_err,   # worst single parameter, max-abs relative
        'fc1_spec': [str(a) for a in fc1.sharding.spec],
        'fc1_shard_shape': list(fc1.addressable_shards[0].data.shape),
        'grad_fc1_shard_shape': list(
            grads['vision']['transformer']['blocks'][0]['fc1']['kernel']
            .addressable_shards[0].data.shape),
        'param_bytes_device0': per_device(sharded_params),
        'param_bytes_total': sum(x.nbytes for x in jax.tree.leaves(params)),
    }), flush=True)


def align_step_on_meshes():
  """The whole align train step (ranked DPO + lambda * InfoNCE, optimizer) on 8 devices."""
  from aesalign_jax import optim, train
  from configs import default
  c = default.get_config('smoke').align
  c.u, c.v, c.groups_per_step, c.batch_size = 2, 2, 8, 16
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  params = clip.init_params(cfg, seed=1)
  rng = np.random.default_rng(1)
  batch = {
      'pairs': {'image': rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
                'ids': rng.integers(3, 1000, (16, 16)).astype(np.int32),
                'eos_index': rng.integers(2, 16, (16,)).astype(np.int32)},
      'groups': {'images': rng.integers(0, 255, (8, 4, 32, 32, 3), dtype=np.uint8),
                 'ids': rng.integers(3, 1000, (8, 16)).astype(np.int32),
                 'eos_index': rng.integers(2, 16, (8,)).astype(np.int32),
                 'ref_scores': rng.normal(0, 0.1, (8, 4)).astype(np.float32)}}
  opt, lr = optim.make_optimizer(c.optim, c.steps, params)
  step = train.make_train_step(cfg, c, 'align', opt, lr)
  state = train.init_state(params, opt, 0)
  _, ref_metrics = jax.jit(step)(state, batch)
  rules = sharding.default_config().rules
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  shardings = sharding.named(mesh, train.state_specs(jax.eval_shape(lambda: state), cfg, mesh,
                                                    rules))

  def sharded(s, b):
    with sharding.activation_rules(mesh, rules):
      return step(s, b)

  new_state, metrics = jax.jit(sharded, in_shardings=(shardings, None),
                               out_shardings=(shardings, None))(
      jax.device_put(state, shardings), train.to_global(batch, mesh, rules))
  adam = [s for s in jax.tree.leaves(new_state['opt_state'],
                                     is_leaf=lambda x: hasattr(x, 'mu')) if hasattr(s, 'mu')][0]
  mu_fc1 = adam.mu['vision']['transformer']['blocks'][0]['fc1']['kernel']
  print(json.dumps({
      'align': True,
      'loss': float(metrics['loss']), 'ref_loss': float(ref_metrics['loss']),
      'dpo_loss': float(metrics['dpo_loss']), 'ref_dpo_loss': float(ref_metrics['dpo_loss']),
      'mu_fc1_spec': [str(a) for a in mu_fc1.sharding.spec]}), flush=True)


if __name__ == '__main__':
  if sys.argv[1:] == ['align']:
    sys.exit(align_step_on_meshes())
  sys.exit(main())
