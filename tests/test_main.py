"""main.py: config overrides, refusals before anything compiles, modes, stage caching."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'),
                         '--config=configs/default.py:smoke', f'--workdir={workdir}', *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_unknown_config_key_is_refused_naming_it(tmp_path):
  out = _main('--config.model.no_such_key=3', workdir=tmp_path)
  assert out.returncode != 0
  assert 'no_such_key' in out.stderr


def test_mesh_not_matching_device_count_is_refused_before_compiling(tmp_path):
  out = _main('--config.mesh.data=3', workdir=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'config.mesh' in out.stderr and 'product 3 != 1' in out.stderr
  assert not os.listdir(tmp_path)   # nothing ran


def test_bad_model_shape_is_refused_naming_the_key(tmp_path):
  out = _main('--config.model.overrides.vision_width=130', workdir=tmp_path)
  assert out.returncode == 2
  assert 'config.model.vision_width=130' in out.stderr


def test_mode_not_built_exits_nonzero_naming_it(tmp_path):
  out = _main('--mode=mine', workdir=tmp_path)
  assert out.returncode == 3, out.stderr[-2000:]
  assert '--mode=mine' in out.stderr and 'not built yet' in out.stderr


def test_all_mode_runs_the_built_stages_then_skips_them_on_rerun(tmp_path):
  first = _main(workdir=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert os.path.exists(tmp_path / 'tokenizer' / 'stage.json')
  assert os.path.exists(tmp_path / 'pretrain' / 'model' / 'model.safetensors')
  assert 'step 40/40' in first.stdout
  second = _main(workdir=tmp_path)
  assert second.returncode == 0
  assert 'stage tokenizer: done before' in second.stderr
  assert 'stage pretrain: done before' in second.stderr
  assert 'step 40/40' not in second.stdout


def test_align_with_missing_dpo_file_is_refused_naming_the_key(tmp_path):
  out = _main('--mode=align', '--config.align.dpo_path=/no/such/dpo.arrayrecord',
              workdir=tmp_path)
  assert out.returncode == 2
  assert 'config.align.dpo_path' in out.stderr
