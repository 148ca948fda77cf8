"""Exact resume after SIGKILL, a clean save on SIGTERM, and the NaN guard (subprocess runs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(workdir, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(HERE, 'train_worker.py'),
                         '--workdir', str(workdir), *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=600)


def _order(workdir):
  with open(os.path.join(workdir, 'order.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight')
  out = _worker(workdir, '--steps', 8, '--checkpoint_every', 4)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_killed_run_resumes_to_identical_parameters_and_data_order(straight_run, tmp_path):
  killed = _worker(tmp_path, '--steps', 8, '--checkpoint_every', 4, '--kill_after_save', 4)
  assert killed.returncode == -9   # SIGKILL right after the step-4 checkpoint reached disk
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  resumed = _worker(tmp_path, '--steps', 8, '--checkpoint_every', 4)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from the checkpoint at step 4' in resumed.stderr
  assert _order(tmp_path) == _order(straight_run)        # batches 1-4, then 5-8, same order
  assert len(_order(tmp_path)) == 8
  a, b = np.load(straight_run / 'params.npz'), np.load(tmp_path / 'params.npz')
  assert a.files == b.files and len(a.files) > 10
  for key in a.files:
    assert np.array_equal(a[key], b[key]), key              # bitwise on CPU


def test_resumed_run_differs_from_a_fresh_start(straight_run, tmp_path):
  # Guards the test above: a run that ignored the checkpoint would not match the straight run.
  out = _worker(tmp_path, '--steps', 4, '--checkpoint_every', 4)
  assert out.returncode == 0
  a, b = np.load(straight_run / 'params.npz'), np.load(tmp_path / 'params.npz')
  assert any(not np.array_equal(a[k], b[k]) for k in a.files)


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
  out = _worker(tmp_path, '--steps', 20, '--checkpoint_every', 100, '--sigterm_at_batch', 5)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.load(open(tmp_path / 'result.json')) == {'status': 'preempted', 'step': 5}
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['5']
  assert 'SIGTERM received' in out.stderr


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  out = _worker(tmp_path, '--steps', 8, '--checkpoint_every', 2, '--nan_at_step', 4)
  assert out.returncode == 4, out.stderr[-3000:]
  assert 'non-finite loss or gradient at step 4' in out.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['2', '4']
  from aesalign_jax import checkpointing
  params = checkpointing.load_params(tmp_path / 'checkpoints' / '4' / 'state')['params']
  import jax
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
