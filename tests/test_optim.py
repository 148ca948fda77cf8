"""The optimizer and the train step's options: decay mask, frozen towers, per-tower learning
rates, the schedule, gradient accumulation, the online reference and objectives registered by
name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aesalign_jax import optim, sharding, train
from aesalign_jax.models import clip
from configs import default

import synthetic_batches

CFG = clip.preset('tiny', vision_layers=1, text_layers=1, vocab_size=64, eos_token_id=63)


@pytest.fixture(scope='module')
def params():
  return clip.init_params(CFG, seed=0)


def _opt(**kw):
  c = optim.default_config()
  c.warmup_steps, c.grad_clip_norm = 0, 0.0
  c.update(kw)
  return c


def _apply(c, params, grads, steps=10):
  tx, _ = optim.make_optimizer(c, steps, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_weight_decay_skips_norms_biases_and_scalars(params):
  c = _opt(lr=0.1, weight_decay=0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)   # Adam's step is 0: only decay moves weights
  new = _apply(c, params, zeros)
  blk = lambda p: p['text']['transformer']['blocks'][0]
  np.testing.assert_allclose(blk(new)['fc1']['kernel'], blk(params)['fc1']['kernel'] * (1 - 0.05),
                             rtol=1e-6)
  np.testing.assert_array_equal(blk(new)['fc1']['bias'], blk(params)['fc1']['bias'])
  np.testing.assert_array_equal(blk(new)['ln1']['scale'], blk(params)['ln1']['scale'])
  np.testing.assert_array_equal(new['logit_scale'], params['logit_scale'])


def test_frozen_tower_never_moves_and_tower_multipliers_scale_updates(params):
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.01, params)
  frozen = _apply(_opt(freeze='vision', weight_decay=0.0), params, grads)
  for a, b in zip(jax.tree.leaves(frozen['vision']), jax.tree.leaves(params['vision'])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(frozen['text']), jax.tree.leaves(params['text'])))
  full = _apply(_opt(weight_decay=0.0), params, grads)
  half = _apply(_opt(weight_decay=0.0, vision_lr_mult=0.5), params, grads)
  k = lambda p: np.asarray(p['vision']['proj']['kernel'])
  np.testing.assert_allclose(k(half) - k(params), 0.5 * (k(full) - k(params)), rtol=0, atol=5e-8)
  t = lambda p: np.asarray(p['text']['proj']['kernel'])
  np.testing.assert_allclose(t(half), t(full))


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  c = _opt(lr=1.0, warmup_steps=10, end_lr_ratio=0.1)
  lr = optim.schedule(c, 110)
  assert float(lr(0)) == 0.0
  assert abs(float(lr(5)) - 0.5) < 1e-6
  assert abs(float(lr(10)) - 1.0) < 1e-6
  assert abs(float(lr(60)) - (0.1 + 0.9 * 0.5)) < 1e-3   # cosine half way
  assert abs(float(lr(110)) - 0.1) < 1e-6


def _pairs(n, seed):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
          'ids': rng.integers(0, 62, (n, 16)).astype(np.int32),
          'eos_index': rng.integers(1, 16, (n,)).astype(np.int32)}


def test_gradient_accumulation_averages_micro_batch_gradients(params):
  c = default.get_config('smoke').pretrain
  c.optim.grad_clip_norm, c.label_smoothing = 0.0, 0.0
  batch = {'pairs': _pairs(8, 0)}
  tx, lr = optim.make_optimizer(c.optim, 10, params)
  c.grad_accum = 2
  step = jax.jit(train.make_train_step(CFG, c, 'pretrain', tx, lr))
  _, metrics = step(train.init_state(params, tx, 0), batch)
  loss_fn = train.make_loss_fn(CFG, c, 'pretrain')
  halves = [jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], batch) for i in range(2)]
  grads = [jax.grad(lambda p, b: loss_fn(p, b, None)[0])(params, h) for h in halves]
  losses = [float(loss_fn(params, h, None)[0]) for h in halves]
  mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  np.testing.assert_allclose(float(metrics['loss']), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['grad_norm']), float(optim.global_norm(mean_grad)),
                             rtol=1e-4)


def test_online_reference_starts_at_log2_and_ignores_stored_scores(params):
  c = default.get_config('smoke').align
  c.u, c.v, c.online_reference = 2, 2, True
  tx, lr = optim.make_optimizer(c.optim, 10, params)
  step = jax.jit(train.make_train_step(CFG, c, 'align', tx, lr))
  rng = np.random.default_rng(1)
  groups = {'images': rng.integers(0, 255, (2, 4, 32, 32, 3), dtype=np.uint8),
            'ids': rng.integers(0, 62, (2, 16)).astype(np.int32),
            'eos_index': np.array([5, 9], np.int32),
            'ref_scores': rng.normal(size=(2, 4)).astype(np.float32)}   # would not be log 2
  state = train.init_state(params, tx, 0, ref_params=params)
  _, metrics = step(state, {'pairs': _pairs(4, 2), 'groups': groups})
  np.testing.assert_allclose(float(metrics['dpo_loss']), np.log(2.0), rtol=1e-6)


def test_an_objective_registered_by_name_runs_in_the_step_and_the_loop(params, tmp_path):
  """A new loss is one register_objective call: make_train_step and fit look it up by kind."""
  def make_loss(cfg, c, shard, shards):
    contrastive = train.get_objective('pretrain').make_loss(cfg, c, shard, shards)

    def loss(p, batch, ref_params):
      value, metrics = contrastive(p, batch, ref_params)
      return 2.0 * value, dict(metrics, doubled=2.0 * value)
    return loss

  c = default.get_config('smoke').pretrain
  c.steps, c.batch_size, c.log_every, c.checkpoint_every = 2, 8, 1, 100
  c.async_checkpoints = False
  with pytest.raises(ValueError, match="unknown training kind 'doubled'"):
    train.make_loss_fn(CFG, c, 'doubled')
  train.register_objective('doubled', train.Objective(make_loss=make_loss))
  try:
    with pytest.raises(ValueError, match="already registered as 'doubled'"):
      train.register_objective('doubled', train.Objective(make_loss=make_loss))
    out = train.fit(kind='doubled', c=c, model_cfg=CFG, init_params=params,
                    iterators={'pairs': synthetic_batches.pairs_iterator(CFG, 8, seed=0)},
                    mesh=sharding.make_mesh({'data': -1}), rules=sharding.default_config().rules,
                    workdir=str(tmp_path))
  finally:
    del train.OBJECTIVES['doubled']
  first = next(synthetic_batches.pairs_iterator(CFG, 8, seed=0))
  pairs = {k: first[k] for k in train.DEVICE_KEYS['pairs']}
  plain, _ = train.make_loss_fn(CFG, c, 'pretrain')(params, {'pairs': pairs}, None)
  assert out.status == 'finished' and out.step == 2
  np.testing.assert_allclose(out.history[0]['loss'], 2 * float(plain), rtol=1e-5)
  assert out.history[0]['doubled'] == out.history[0]['loss']
