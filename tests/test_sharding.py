"""Sharded contrastive loss on 8 fake CPU devices matches one device; weights really shard."""

import json

import jax
import pytest
from workers import run_worker

from aesalign_jax import sharding
from aesalign_jax.models import clip



@pytest.fixture(scope='module')
def mesh_results():
  return {json.dumps(r['mesh'], sort_keys=True): r for r in run_worker('sharded_contrastive.py')}


def _result(results, **mesh):
  return results[json.dumps({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh}, sort_keys=True)]


@pytest.mark.parametrize('mesh', [dict(data=8), dict(data=2, fsdp=4),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_sharded_loss_and_grads_match_one_device(mesh_results, mesh):
  r = _result(mesh_results, **mesh)
  assert r['loss_rel_err'] < 1e-5, r
  assert r['grad_rel_err'] < 1e-5, r
  # Each parameter on its own too (looser: a small leaf sums 8 partial gradients in fp32).
  assert r['grad_leaf_rel_err'] < 1e-4, r


def test_data_parallel_replicates_weights(mesh_results):
  r = _result(mesh_results, data=8)
  assert r['fc1_shard_shape'] == [128, 512]
  assert r['param_bytes_device0'] == r['param_bytes_total']


def test_fsdp_shards_embed_dimension_and_cuts_bytes_per_device(mesh_results):
  r = _result(mesh_results, data=2, fsdp=4)
  assert r['fc1_spec'][0] == 'fsdp'
  assert r['fc1_shard_shape'] == [32, 512]
  assert r['grad_fc1_shard_shape'] == [32, 512]   # gradients come back sharded like weights
  assert r['param_bytes_device0'] < 0.3 * r['param_bytes_total']


def test_tensor_axis_shards_mlp_dimension(mesh_results):
  r = _result(mesh_results, data=2, fsdp=2, tensor=2)
  assert r['fc1_spec'] == ['fsdp', 'tensor']
  assert r['fc1_shard_shape'] == [64, 256]
  assert r['param_bytes_device0'] < 0.3 * r['param_bytes_total']


def test_mesh_shape_resolves_minus_one_and_refuses_bad_products():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == \
      {'data': 4, 'fsdp': 2, 'tensor': 1}
  with pytest.raises(ValueError, match='config.mesh.*product 6 != 8'):
    sharding.mesh_shape({'data': 3, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='not divisible'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='unknown axes'):
    sharding.mesh_shape({'data': -1, 'model': 2}, 8)


def test_logical_rules_never_reuse_a_mesh_axis():
  rules = [('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor')]
  assert sharding.logical_to_spec(('batch', 'embed'), rules) == \
      jax.sharding.PartitionSpec(('data', 'fsdp'), None)
  assert sharding.logical_to_spec(('embed', 'mlp'), rules) == \
      jax.sharding.PartitionSpec('fsdp', 'tensor')
  with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
    sharding.logical_to_spec(('embed',), [('embed', 'model')])


def test_every_parameter_has_logical_axes_of_its_rank():
  cfg = clip.preset('tiny')
  axes, shapes = clip.logical_axes(cfg), clip.abstract_params(cfg)
  pairs = jax.tree.leaves(jax.tree.map(lambda a, s: (len(a), len(s.shape)), axes, shapes,
                                       is_leaf=lambda a: isinstance(a, tuple)),
                          is_leaf=lambda a: isinstance(a, tuple))
  assert pairs and all(a == s for a, s in pairs)


def test_sharded_align_step_matches_one_device():
  r = run_worker('sharded_contrastive.py', 'align')[-1]
  assert abs(r['loss'] - r['ref_loss']) <= 1e-5 * abs(r['ref_loss']), r
  assert abs(r['dpo_loss'] - r['ref_dpo_loss']) <= 1e-5 * abs(r['ref_dpo_loss']), r
  assert r['mu_fc1_spec'] == ['fsdp', 'tensor']   # Adam moments shard like their weights
