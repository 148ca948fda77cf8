"""Checkpoints: bitwise round trips, interval and keep-N, exact data resume, crash safety,
sharded restore, standalone parameter export."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aesalign_jax import checkpointing
from input_pipeline import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params():
  rng = np.random.default_rng(0)
  # Integer keys, as the CLIP block indices (orbax stores every key as a string).
  return {'blocks': {i: {'kernel': jnp.asarray(rng.standard_normal((4, 3), np.float32)),
                         'bias': jnp.asarray(rng.standard_normal((3,), np.float32))}
                     for i in range(3)},
          'logit_scale': jnp.asarray(2.5, jnp.float32)}


def _state(seed=0):
  params = _params()
  opt = optax.adamw(1e-2)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda p: p * 0.5 + seed, params)
  updates, opt_state = opt.update(grads, opt_state, params)   # non-trivial mu, nu, count
  return {'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
          'step': jnp.asarray(7 + seed, jnp.int32),
          'rng': jax.random.key_data(jax.random.key(seed + 3)),
          'typed_rng': jax.random.key(seed + 11)}


def _abstract(tree, sharding=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding
                                                     or x.sharding), tree)


def _assert_bitwise_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _pipeline():
  records = [{'image': np.full((2, 2, 3), i, np.uint8), 'caption': f'caption {i}', 'id': i}
             for i in range(23)]
  return pipeline.make_pipeline(records, batch_size=4, seed=5, read_threads=1,
                                prefetch_buffer_size=2, shard_index=0, shard_count=1)


def _ckpt(directory, **kw):
  return checkpointing.Checkpointer(directory, **{'save_interval_steps': 1, 'max_to_keep': 3,
                                                  **kw})


def test_round_trip_is_bitwise_with_int_keys_optax_state_step_and_rng(tmp_path):
  state = _state()
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  target = NamedSharding(mesh, P())
  with _ckpt(tmp_path) as ckpt:
    assert ckpt.save(7, state)
    ckpt.wait_until_finished()
    step, restored = ckpt.restore(_abstract(state, target))
  assert step == 7
  _assert_bitwise_equal(restored, state)   # same tree: int keys, optax namedtuples
  assert sorted(restored['params']['blocks']) == [0, 1, 2]
  assert type(restored['opt_state'][0]).__name__ == 'ScaleByAdamState'
  assert all(x.sharding == target for x in jax.tree.leaves(restored))
  # The restored optimizer state is usable as is.
  optax.adamw(1e-2).update(restored['params'], restored['opt_state'], restored['params'])


def test_save_respects_interval_unless_forced_and_keeps_newest_n(tmp_path):
  state = {'w': jnp.ones(2)}
  with _ckpt(tmp_path, save_interval_steps=3, max_to_keep=2, async_save=False) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.save(s, state)]
    assert saved == [3, 6, 9]           # not the first step offered: only the interval
    assert ckpt.save(10, state, force=True)
    assert not ckpt.save(10, state, force=True)   # a saved step is never written twice
    assert not ckpt.save(4, state, force=True)    # nor an older one
    assert ckpt.all_steps() == [9, 10]
  assert sorted(os.listdir(tmp_path)) == ['10', '9']


def _committed(directory):
  """Steps on disk for good: orbax writes into '<step>.orbax-checkpoint-tmp...' first."""
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_a_save_starts_only_once_the_previous_one_is_committed_and_says_so(
    tmp_path, monkeypatch, caplog):
  # What was on disk when each orbax save began: the previous step must be, so a kill in
  # the middle of a save never loses more than one interval.
  import orbax.checkpoint as ocp
  on_disk_at_start, orbax_save = {}, ocp.CheckpointManager.save
  def save(self, step, *args, **kw):
    on_disk_at_start[step] = _committed(tmp_path)
    return orbax_save(self, step, *args, **kw)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  state = {'w': jnp.ones((1024, 1024))}   # 4 MB: still being written when save() returns
  with caplog.at_level(logging.INFO):
    with _ckpt(tmp_path, save_interval_steps=10, max_to_keep=None) as ckpt:
      for step in (10, 20, 30):
        assert ckpt.save(step, state)
      assert on_disk_at_start == {10: [], 20: [10], 30: [10, 20]}
      for step in (10, 20):
        assert f'checkpoint: step {step} committed in {tmp_path}' in caplog.text
  assert 'checkpoint: step 30 committed' in caplog.text   # by close()
  assert _committed(tmp_path) == [10, 20, 30]


def test_poll_logs_a_commit_once_the_step_is_on_disk_without_waiting(tmp_path, caplog):
  with caplog.at_level(logging.INFO), _ckpt(tmp_path) as ckpt:
    ckpt.poll()   # nothing saved yet: nothing to say
    assert ckpt.save(5, {'w': jnp.ones((512, 512))})
    deadline = time.monotonic() + 60
    while 'step 5 committed' not in caplog.text and time.monotonic() < deadline:
      ckpt.poll()
      time.sleep(0.01)
    assert 'checkpoint: step 5 committed' in caplog.text
    assert _committed(tmp_path) == [5]   # said only once it is there
  assert caplog.text.count('step 5 committed') == 1   # close() does not say it again


def test_new_checkpointer_resumes_from_latest_step_of_earlier_run(tmp_path):
  with _ckpt(tmp_path) as ckpt:
    assert ckpt.restore(_abstract(_state())) is None   # empty directory: start fresh
    ckpt.save(1, _state(0))
    ckpt.save(2, _state(1))
  with _ckpt(tmp_path) as again:
    assert again.latest_step() == 2
    step, restored = again.restore(_abstract(_state()))
    assert step == 2
    _assert_bitwise_equal(restored, _state(1))
    step, older = again.restore(_abstract(_state()), step=1)
    _assert_bitwise_equal(older, _state(0))
    with pytest.raises(ValueError, match=r'step 5 not found.*\[1, 2\]'):
      again.restore(_abstract(_state()), step=5)


def test_grain_iterator_resumes_exactly_although_it_advances_during_async_save(tmp_path):
  it = iter(_pipeline())
  for _ in range(3):
    next(it)
  with _ckpt(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(3, {'w': jnp.ones(2)}, {'pairs': it})
    expected = [next(it) for _ in range(8)]   # crosses an epoch boundary (23 records / 4)
    ckpt.wait_until_finished()
  fresh = iter(_pipeline())
  with _ckpt(tmp_path) as ckpt:
    step, _ = ckpt.restore({'w': jax.ShapeDtypeStruct((2,), jnp.float32)}, {'pairs': fresh})
  assert step == 3
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got['id'], want['id'])
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['caption'], want['caption'])


def test_restore_names_an_iterator_the_checkpoint_lacks(tmp_path):
  with _ckpt(tmp_path) as ckpt:
    ckpt.save(1, {'w': jnp.ones(2)}, {'pairs': iter(_pipeline())})
    ckpt.wait_until_finished()
    with pytest.raises(ValueError, match=r"data_dpo.*data_pairs"):
      ckpt.restore({'w': jax.ShapeDtypeStruct((2,), jnp.float32)},
                   {'pairs': iter(_pipeline()), 'dpo': iter(_pipeline())})


def test_async_save_owns_its_copy_so_the_state_may_be_donated_right_after(tmp_path):
  state = _state()
  expected = jax.tree.map(np.asarray, jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x, state))
  abstract = _abstract(state)
  with _ckpt(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(1, state)
    for x in jax.tree.leaves(state):   # what donation to the next train step does
      x.delete()
    ckpt.wait_until_finished()
    _, restored = ckpt.restore(abstract)
  restored['typed_rng'] = jax.random.key_data(restored['typed_rng'])
  _assert_bitwise_equal(restored, expected)


def test_incomplete_tmp_step_is_ignored_and_cleaned_up(tmp_path):
  with _ckpt(tmp_path) as ckpt:
    ckpt.save(1, {'w': jnp.ones(2)})
  partial = tmp_path / '2.orbax-checkpoint-tmp-1234' / 'state'
  partial.mkdir(parents=True)
  (partial / 'garbage').write_bytes(b'\0' * 10)
  with _ckpt(tmp_path) as again:
    assert again.latest_step() == 1
    step, restored = again.restore({'w': jax.ShapeDtypeStruct((2,), jnp.float32)})
  assert step == 1 and np.array_equal(restored['w'], np.ones(2))
  assert not partial.parent.exists()


def _run_child(mode, directory, extra_env=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **(extra_env or {}))
  return subprocess.run([sys.executable, os.path.abspath(__file__), mode, str(directory)],
                        capture_output=True, text=True, env=env, timeout=300)


def test_kill_during_async_save_leaves_last_complete_checkpoint_loadable(tmp_path):
  out = _run_child('kill_mid_save', tmp_path)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert 'saving step 2' in out.stdout
  # The kill really hit mid-save: step 2 is a half-written tmp directory.
  assert [p for p in os.listdir(tmp_path) if p.startswith('2.orbax-checkpoint-tmp')]
  with _ckpt(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    step, restored = ckpt.restore({'w': jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert step == 1 and np.array_equal(restored['w'], np.arange(4, dtype=np.float32))
    assert ckpt.save(2, {'w': jnp.zeros(4)})   # the run goes on and re-saves step 2
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]


def test_restore_onto_sharded_target_on_4_devices(tmp_path):
  out = _run_child('sharded', tmp_path,
                   {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['num_devices'] == 4
  assert r['values_equal']
  assert r['kernel_spec'] == [None, 'fsdp'] and r['kernel_shard'] == [8, 3]
  assert r['bias_spec'] == [['data', 'fsdp']] and r['bias_shard'] == [2]
  assert r['block_keys'] == [0, 1]


def test_save_params_then_load_params_round_trip(tmp_path):
  params = _params()
  checkpointing.save_params(tmp_path / 'params', params)
  host = checkpointing.load_params(tmp_path / 'params')
  _assert_bitwise_equal(host, params)   # int keys back, without a target
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  on_device = checkpointing.load_params(tmp_path / 'params', _abstract(params))
  _assert_bitwise_equal(on_device, params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_device))
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    checkpointing.load_params(tmp_path / 'nothing_here')


# Child processes (run as `python tests/test_checkpointing.py MODE DIR`).

def _child_kill_mid_save(directory):
  ckpt = checkpointing.Checkpointer(directory, save_interval_steps=1, max_to_keep=3)
  ckpt.save(1, {'w': jnp.arange(4, dtype=jnp.float32)})
  ckpt.wait_until_finished()
  big = np.random.default_rng(0).standard_normal((16, 1024, 1024), np.float32)  # 64 MB
  ckpt.save(2, {'w': jnp.asarray(big)})
  print('saving step 2', flush=True)
  os.kill(os.getpid(), signal.SIGKILL)   # the background write is still running


def _child_sharded(directory):
  devices = np.asarray(jax.devices()).reshape(2, 2)
  mesh = Mesh(devices, ('data', 'fsdp'))
  kernel = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
  saved_as = NamedSharding(mesh, P('data'))
  state = {'blocks': {i: {'kernel': jax.device_put(kernel + i, saved_as),
                          'bias': jax.device_put(jnp.arange(8.0) * i, saved_as)}
                      for i in range(2)}}
  with checkpointing.Checkpointer(directory, save_interval_steps=1, max_to_keep=1) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    k_target = NamedSharding(mesh, P(None, 'fsdp'))
    b_target = NamedSharding(mesh, P(('data', 'fsdp')))
    abstract = {'blocks': {i: {'kernel': jax.ShapeDtypeStruct((8, 6), jnp.float32,
                                                              sharding=k_target),
                               'bias': jax.ShapeDtypeStruct((8,), jnp.float32,
                                                            sharding=b_target)}
                           for i in range(2)}}
    _, restored = ckpt.restore(abstract)
  k, b = restored['blocks'][1]['kernel'], restored['blocks'][1]['bias']
  equal = all(np.array_equal(np.asarray(x), np.asarray(y))
              for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  assert k.sharding.is_equivalent_to(k_target, 2) and b.sharding.is_equivalent_to(b_target, 1)
  print(json.dumps({
      'num_devices': len(jax.devices()), 'values_equal': equal,
      'kernel_spec': [a for a in k.sharding.spec], 'kernel_shard': list(
          k.addressable_shards[0].data.shape),
      'bias_spec': [list(a) if isinstance(a, tuple) else a for a in b.sharding.spec],
      'bias_shard': list(b.addressable_shards[0].data.shape),
      'block_keys': sorted(restored['blocks'])}))


if __name__ == '__main__':
  {'kill_mid_save': _child_kill_mid_save, 'sharded': _child_sharded}[sys.argv[1]](sys.argv[2])
