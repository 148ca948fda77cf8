"""Sharded InfoNCE (each device scores its own rows against all gathered columns) equals the
dense CLIP InfoNCE on one device: loss, gradients and metrics, on 8 fake CPU devices."""


import jax
import numpy as np
import pytest
from workers import run_worker

from aesalign_jax import losses, sharding, train



@pytest.fixture(scope='module')
def cases():
  return run_worker('contrastive_sharded_worker.py')


def _case(cases, kind, mesh, row_chunk=0):
  found = [c for c in cases if c['case'] == kind and c['mesh'] == mesh
           and c.get('row_chunk', 0) == row_chunk]
  assert len(found) == 1, cases
  return found[0]


@pytest.mark.parametrize('mesh,row_chunk', [({'data': 8}, 0), ({'data': 2, 'fsdp': 4}, 0),
                                            ({'data': 2, 'fsdp': 4}, 2)])
def test_sharded_infonce_loss_grads_and_metrics_match_one_device(cases, mesh, row_chunk):
  r = _case(cases, 'embeddings', mesh, row_chunk)
  assert r['loss_rel_err'] < 1e-5, r
  for name, err in r['grad_rel_err'].items():   # image and text embeddings, logit scale
    assert err < 1e-5, (name, r)
  for name, err in r['aux_rel_err'].items():
    assert err < 1e-5, (name, r)
  assert r['aux_rel_err']['i2t_accuracy'] == r['aux_rel_err']['t2i_accuracy'] == 0.0


@pytest.mark.parametrize('mesh,row_chunk', [({'data': 8}, 0), ({'data': 2, 'fsdp': 4}, 2)])
def test_no_device_holds_the_global_similarity_matrix(cases, mesh, row_chunk):
  r = _case(cases, 'embeddings', mesh, row_chunk)
  assert not r['square_in_sharded_hlo']          # no f32[32,32] in the per-device program
  assert r['local_block_in_sharded_hlo']         # its own rows x all columns: [32/8 or chunk, 32]


def test_embedding_gradients_are_reduce_scattered_back_to_their_rows(cases):
  r = _case(cases, 'embeddings', {'data': 2, 'fsdp': 4})
  assert r['img_grad_spec'] == ["('data', 'fsdp')", 'None']
  assert r['backward_reduce_scatters'] == 2   # one per gathered tower (image, text)


@pytest.mark.parametrize('mesh', [{'data': 8}, {'data': 2, 'fsdp': 4}])
def test_pretrain_loss_through_the_model_matches_one_device(cases, mesh):
  r = _case(cases, 'model', mesh)
  assert r['loss_rel_err'] < 1e-5, r
  assert r['grad_rel_err'] < 1e-5, r   # ||g - g_ref|| / ||g_ref|| over all parameters


def test_auto_picks_sharded_only_with_several_devices_on_the_batch_axes():
  c = train.default_config('pretrain')
  rules = sharding.default_config().rules
  one = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  assert train.contrastive_sharding(c, one, rules) is None           # auto, 1 device: dense
  assert train.contrastive_sharding(c, None, rules) is None          # no mesh: dense
  c.contrastive_impl = 'sharded'
  forced = train.contrastive_sharding(c, one, rules)
  assert forced.batch_axes == ('data', 'fsdp') and forced.mesh is one
  c.contrastive_impl, c.loss = 'auto', 'siglip'
  assert train.contrastive_sharding(c, one, rules) is None           # SigLIP: always dense
  c.contrastive_impl, c.loss = 'sharded', 'infonce'
  with pytest.raises(ValueError, match='needs the mesh'):
    train.contrastive_sharding(c, None, rules)


def test_sharded_infonce_on_one_device_equals_dense_and_refuses_bad_chunks():
  mesh = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  rng = np.random.default_rng(3)
  img, txt = rng.normal(size=(2, 8, 4)).astype(np.float32)
  dense, _ = losses.clip_infonce(img, txt, 5.0, label_smoothing=0.2)
  sharded, _ = losses.clip_infonce_sharded(img, txt, 5.0, mesh=mesh, batch_axes='data',
                                           label_smoothing=0.2, row_chunk=4)
  np.testing.assert_allclose(sharded, dense, rtol=1e-6)
  with pytest.raises(ValueError, match='row_chunk=3 does not divide the 8 rows per device'):
    losses.clip_infonce_sharded(img, txt, 5.0, mesh=mesh, batch_axes='data', row_chunk=3)
  with pytest.raises(ValueError, match="batch_axes 'model' must name axes of the mesh"):
    losses.clip_infonce_sharded(img, txt, 5.0, mesh=mesh, batch_axes='model')
