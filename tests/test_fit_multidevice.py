"""train.fit on 8 fake CPU devices (mesh data=2, fsdp=4) runs ViT-B/32-shaped align steps that
match the same steps on one device, and hands back parameters sharded as the specs say."""


import numpy as np
import pytest
from workers import run_worker



@pytest.fixture(scope='module')
def result():
  return run_worker('fit_multidevice_worker.py')[-1]


def test_every_step_runs_with_finite_losses(result):
  assert result['steps'] == [4, 4]
  assert len(result['losses8']) == 4 and np.all(np.isfinite(result['losses8']))
  # The 8-device run used the sharded InfoNCE, the 1-device run the dense one.
  assert result['sharded_loss_used'] == [True, False]


def test_losses_match_one_device(result):
  # Same start, data and program up to the partitioning: only fp32 summation order differs
  # (measured <= 2e-7 relative); a wrong row offset, a missed gradient share or a batch
  # split differently between the towers would move the loss by far more than 1e-5.
  np.testing.assert_allclose(result['losses8'], result['losses1'], rtol=1e-5)
  np.testing.assert_allclose(result['dpo8'], result['dpo1'], rtol=1e-5)


def test_parameters_match_one_device_after_four_adam_steps(result):
  # Adam divides each gradient entry by its own running RMS, so an entry whose gradient is
  # tiny (rare tokens' embeddings; attention key biases, whose exact gradient is 0) turns
  # summation-order noise into a visible step. Measured: the largest difference is ~0.2% of
  # the largest parameter change (3.6e-6 vs 2e-3); a real error (a gradient off by a device
  # factor, wrong rows) changes updates by a sizeable fraction of that change.
  assert result['param_diff_max'] < 0.01 * result['param_update_max'], result


def test_parameters_come_back_sharded_as_the_specs_say(result):
  assert result['mismatched_specs'] == [] and result['num_leaves'] > 40
  assert result['fc1_spec'] == ['fsdp', 'tensor']   # embed over fsdp, MLP over (size-1) tensor
  assert result['fc1_shard_shape'] == [32, 512]     # 128 / 4 rows per device
