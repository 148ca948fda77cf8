"""Run in a subprocess with 8 fake CPU devices (tests/test_contrastive_sharded.py): the sharded
InfoNCE (losses.clip_infonce_sharded) against the dense one on one device, on several meshes,
on embeddings and through the model's pretrain loss. Prints one JSON line per case.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from aesalign_jax import losses, sharding, train  # noqa: E402
from aesalign_jax.models import clip  # noqa: E402

B, D, EPS = 32, 16, 0.1
BATCH_AXES = ('data', 'fsdp')
MESHES = [{'data': 8}, {'data': 2, 'fsdp': 4}]


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _dense(img, txt, scale):
  return losses.clip_infonce(img, txt, scale, label_smoothing=EPS)


def embeddings_case(mesh_cfg, row_chunk, data, ref):
  mesh = sharding.make_mesh(mesh_cfg)
  rows = NamedSharding(mesh, P(BATCH_AXES, None))
  img, txt = (jax.device_put(data[k], rows) for k in ('img', 'txt'))
  scale = jax.device_put(data['scale'], NamedSharding(mesh, P()))

  def sharded(i, t, s):
    return losses.clip_infonce_sharded(i, t, s, mesh=mesh, batch_axes=BATCH_AXES,
                                       label_smoothing=EPS, row_chunk=row_chunk)

  fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))
  (loss, aux), grads = fn(img, txt, scale)
  (ref_loss, ref_aux), ref_grads = ref
  hlo = fn.lower(img, txt, scale).compile().as_text()
  dense_hlo = jax.jit(jax.value_and_grad(_dense, argnums=(0, 1, 2), has_aux=True)).lower(
      img, txt, scale).compile().as_text()
  square = f'f32[{B},{B}]'
  backward = str(jax.make_jaxpr(jax.grad(lambda i, t, s: sharded(i, t, s)[0],
                                         argnums=(0, 1)))(img, txt, scale))
  return {'case': 'embeddings', 'mesh': mesh_cfg, 'row_chunk': row_chunk,
          'loss_rel_err': _rel(loss, ref_loss),
          'grad_rel_err': {n: _rel(g, r) for n, g, r in zip(('img', 'txt', 'scale'), grads,
                                                            ref_grads)},
          'aux_rel_err': {k: _rel(aux[k], ref_aux[k]) for k in ref_aux},
          'img_grad_spec': [str(a) for a in grads[0].sharding.spec],
          # all_gather's transpose: each device's rows collect every device's use of them.
          'backward_reduce_scatters': backward.count('reduce_scatter'),
          'square_in_sharded_hlo': square in hlo,
          'square_in_dense_hlo': square in dense_hlo,
          'local_block_in_sharded_hlo': f'f32[{B // 8 if row_chunk == 0 else row_chunk},{B}]'
                                        in hlo}


def model_case(mesh_cfg, cfg, params, batch, ref):
  """The pretrain loss of train.make_loss_fn, sharded over the mesh vs dense on one device."""
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.default_config().rules
  c = train.default_config('pretrain')
  c.label_smoothing, c.contrastive_impl = EPS, 'auto'
  assert train.contrastive_sharding(c, mesh, rules) is not None
  loss_fn = train.make_loss_fn(cfg, c, 'pretrain', mesh, rules)
  p_shard = sharding.named(mesh, sharding.param_specs(clip.logical_axes(cfg), params, mesh,
                                                      rules))

  def fn(p, b):
    with sharding.activation_rules(mesh, rules):
      return jax.value_and_grad(loss_fn, has_aux=True)(p, b, None)

  (loss, _), grads = jax.jit(fn, out_shardings=(None, p_shard))(
      jax.device_put(params, p_shard), train.to_global(batch, mesh, rules))
  (ref_loss, _), ref_grads = ref
  sq = lambda t: sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                     for x in jax.tree.leaves(t))
  diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      grads, ref_grads)
  return {'case': 'model', 'mesh': mesh_cfg, 'loss_rel_err': _rel(loss, ref_loss),
          'grad_rel_err': (sq(diff) / sq(ref_grads)) ** 0.5}


def main():
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  data = {'img': rng.normal(size=(B, D)).astype(np.float32),
          'txt': rng.normal(size=(B, D)).astype(np.float32),
          'scale': np.float32(9.5)}
  with jax.default_device(jax.devices()[0]):
    ref = jax.jit(jax.value_and_grad(_dense, argnums=(0, 1, 2), has_aux=True))(
        data['img'], data['txt'], data['scale'])
  for mesh_cfg in MESHES:
    print(json.dumps(embeddings_case(mesh_cfg, 0, data, ref)), flush=True)
  print(json.dumps(embeddings_case(MESHES[1], 2, data, ref)), flush=True)

  cfg = clip.preset('tiny', vision_layers=1, text_layers=1, vocab_size=256, eos_token_id=255)
  params = jax.device_get(clip.init_params(cfg, seed=0))
  batch = {'pairs': {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                     'ids': rng.integers(3, 250, (16, cfg.context_length)).astype(np.int32),
                     'eos_index': rng.integers(2, cfg.context_length, (16,)).astype(np.int32)}}
  c = train.default_config('pretrain')
  c.label_smoothing = EPS
  dense_fn = train.make_loss_fn(cfg, c, 'pretrain')   # no mesh: the dense loss
  with jax.default_device(jax.devices()[0]):
    ref = jax.jit(jax.value_and_grad(dense_fn, has_aux=True))(params, batch, None)
  for mesh_cfg in MESHES:
    print(json.dumps(model_case(mesh_cfg, cfg, params, batch, ref)), flush=True)


if __name__ == '__main__':
  sys.exit(main())
