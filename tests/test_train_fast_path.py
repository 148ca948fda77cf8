"""The fit loop's fast path: no implicit host transfers, an ahead-of-time compile logged with
its memory before step 1, batches read ahead without breaking exact resume, and bf16 compute
with rematerialisation over fp32 master weights."""

import json
import logging
import os
import signal

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from aesalign_jax import sharding, train
from aesalign_jax.models import clip

import synthetic_batches

CFG = clip.preset('tiny', vision_layers=1, text_layers=1, vocab_size=256, eos_token_id=255)
STEPS = 5
PREEMPT_AT = 3


def _config(**overrides):
  c = train.default_config('align')
  c.steps, c.batch_size, c.groups_per_step, c.u, c.v = STEPS, 16, 2, 2, 2
  c.log_every, c.checkpoint_every, c.async_checkpoints = 1, 100, False
  c.online_reference = True     # also the frozen-copy path of the reference model
  c.prefetch_to_device = 2      # two batches wait on device beyond the running step's
  c.optim.warmup_steps = 1
  c.update(overrides)
  return c


def _iterators():
  return {'pairs': synthetic_batches.pairs_iterator(CFG, 16, seed=0),
          'groups': synthetic_batches.groups_iterator(CFG, 2, 2, 2, seed=1)}


class _Messages(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _fit(workdir, params, model_cfg=CFG, iterators=None, on_log=None, **overrides):
  iterators = iterators or _iterators()
  with jax.transfer_guard('disallow'):    # any implicit host<->device transfer raises
    return train.fit(kind='align', c=_config(**overrides), model_cfg=model_cfg,
                     init_params=params, iterators=iterators,
                     mesh=sharding.make_mesh({'data': -1}), rules=sharding.default_config().rules,
                     workdir=str(workdir), on_log=on_log)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('fast_path')
  params = jax.device_get(clip.init_params(CFG, seed=0))   # host arrays, as a caller has them
  messages, verbosity = _Messages(), absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger('absl').addHandler(messages)
  lines_at_step1 = []
  try:
    straight = _fit(root / 'straight', params,
                    on_log=lambda step, _: step == 1 and lines_at_step1.extend(messages.lines))
    # Preempted: SIGTERM while step 2 is logged, so the loop stops after step 3, by then
    # with the batches of steps 4 and 5 already read ahead.
    iterators = _iterators()
    preempted = _fit(root / 'resumed', params, iterators=iterators, on_log=lambda step, _: (
        step == PREEMPT_AT - 1 and os.kill(os.getpid(), signal.SIGTERM)))
    live_position = iterators['pairs'].get_state()
    resumed = _fit(root / 'resumed', params)
    low = _fit(root / 'bf16', params, model_cfg=clip.ClipConfig(
        **{**CFG.__dict__, 'dtype': 'bfloat16', 'remat': True}))
  finally:
    logging.getLogger('absl').removeHandler(messages)
    absl_logging.set_verbosity(verbosity)
  saved = json.loads((root / 'resumed' / 'checkpoints' / str(PREEMPT_AT) / 'data_pairs' /
                      'process_0-of-1.json').read_text())
  return dict(straight=straight, preempted=preempted, resumed=resumed, low=low,
              messages=messages.lines, lines_at_step1=lines_at_step1,
              live_position=live_position, saved_position=saved)


def test_align_steps_run_with_implicit_host_transfers_disallowed(runs):
  r = runs['straight']
  assert r.status == 'finished' and r.step == STEPS
  losses = [h['loss'] for h in r.history]
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  assert r.history[-1]['num_pairs'] == 2 * 5   # the align step really ran (2 groups of 2x2)


def test_step_is_compiled_ahead_and_its_memory_logged_before_step_one(runs):
  compiled = [m for m in runs['lines_at_step1'] if 'train step compiled in' in m]
  assert len(compiled) == 1, runs['lines_at_step1']
  line = compiled[0]
  for part in ('memory per device', 'argument', 'output', 'temp', 'generated code'):
    assert part in line, line
  info = runs['straight'].compile_info
  assert info['compile_s'] > 0
  # The state (params + 2 Adam moments + the reference copy) is an argument: > 4x params.
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(runs['straight'].params))
  assert info['argument_size_in_bytes'] > 4 * param_bytes


def test_preemption_with_batches_read_ahead_saves_the_position_of_the_last_step(runs):
  assert runs['preempted'].status == 'preempted' and runs['preempted'].step == PREEMPT_AT
  assert runs['live_position']['next_index'] > PREEMPT_AT   # batches were read ahead...
  assert runs['saved_position']['next_index'] == PREEMPT_AT  # ...but not saved as consumed


def test_resumed_run_after_read_ahead_matches_the_straight_run_bitwise(runs):
  assert any('resumed from the checkpoint at step 3' in m for m in runs['messages'])
  straight, resumed = runs['straight'], runs['resumed']
  assert resumed.step == STEPS
  assert [h['loss'] for h in resumed.history] == [h['loss'] for h in straight.history][3:]
  flat = lambda t: jax.tree.leaves(jax.device_get(t))
  assert all(np.array_equal(a, b) for a, b in zip(flat(straight.params), flat(resumed.params)))


def test_bf16_compute_with_remat_keeps_fp32_master_weights_and_tracks_fp32(runs):
  low, ref = runs['low'], runs['straight']
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(low.params))
  low_loss = np.array([h['loss'] for h in low.history])
  ref_loss = np.array([h['loss'] for h in ref.history])
  assert np.all(np.isfinite(low_loss))
  assert not np.array_equal(low_loss, ref_loss)    # bf16 really computed something else...
  # ...close to fp32: bf16 rounds each value by up to 2^-9 (0.2%) relative and the loss
  # averages many of them; measured at most 8.4e-4 relative over these 5 steps. A broken
  # cast, a bf16 softmax or a remat that changed the math would be far off.
  np.testing.assert_allclose(low_loss, ref_loss, rtol=5e-3)


@pytest.mark.parametrize('key,value,match', [
    ('contrastive_impl', 'fast', 'contrastive_impl=.fast.: expected one of auto, dense, sharded'),
    ('prefetch_to_device', -1, 'prefetch_to_device=-1 must be >= 0'),
    ('contrastive_row_chunk', -2, 'contrastive_row_chunk=-2 must be >= 0'),
])
def test_validate_refuses_bad_speed_settings(key, value, match):
  c = train.default_config('pretrain')
  c[key] = value
  with pytest.raises(ValueError, match=match):
    train.validate(c, 'pretrain')


def test_validate_refuses_sharded_siglip():
  c = train.default_config('pretrain')
  c.loss, c.contrastive_impl = 'siglip', 'sharded'
  with pytest.raises(ValueError, match='contrastive_impl=sharded needs config.pretrain.loss'):
    train.validate(c, 'pretrain')
