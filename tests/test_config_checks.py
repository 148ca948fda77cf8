"""Configs that cannot run are refused before anything compiles, naming the key."""

import os

import pytest

from aesalign_jax import config_checks
from aesalign_jax.stages import cache
from configs import default


def _refused(match, **sets):
  config = default.get_config('smoke')
  for dotted, value in sets.items():
    *path, key = dotted.split('__')
    section = config
    for p in path:
      section = section[p]
    section[key] = value
  with pytest.raises(ValueError, match=match):
    config_checks.validate(config, num_devices=1)


def test_default_and_smoke_configs_are_valid():
  config_checks.validate(default.get_config(), num_devices=1)
  config_checks.validate(default.get_config('smoke'), num_devices=1)


def test_unknown_config_arg_is_refused():
  with pytest.raises(ValueError, match='unknown config arg'):
    default.get_config('smoek')


@pytest.mark.parametrize('sets, match', [
    ({'align__beta': 0.0}, r'config\.align\.beta=0\.0 must be > 0'),
    ({'align__beta': -1.0}, r'config\.align\.beta'),
    ({'align__dpo_label_smoothing': 0.5}, r'config\.align\.dpo_label_smoothing=0\.5'),
    ({'align__dpo_label_smoothing': -0.1}, r'config\.align\.dpo_label_smoothing'),
    ({'align__lam': -0.5}, r'config\.align\.lam=-0\.5 must be >= 0'),
    ({'align__dpo_loss': 'kto'}, r'config\.align\.dpo_loss'),
    ({'align__pair_rule': 'diagonal'}, r'config\.align\.pair_rule'),
    ({'align__dpo_path': '/no/such/file.arrayrecord'}, r'config\.align\.dpo_path'),
    ({'pretrain__optim__lr': 0.0}, r'config\.pretrain\.optim\.lr'),
    ({'pretrain__optim__freeze': 'both'}, r'config\.pretrain\.optim\.freeze'),
    ({'pretrain__batch_size': 30, 'pretrain__grad_accum': 4}, r'config\.pretrain\.batch_size=30'),
    ({'mesh__data': 2}, r'config\.mesh'),
    ({'tokenizer__context_length': 77}, r'config\.tokenizer\.context_length=77'),
    ({'world__image_size': 64}, r'config\.world\.image_size=64'),
    ({'model__preset': 'vit_h14'}, r'config\.model\.preset'),
])
def test_bad_values_are_refused_naming_the_key(sets, match):
  _refused(match, **sets)


def test_cached_stage_reruns_only_when_its_config_changes(tmp_path):
  calls = []
  run = lambda stage_dir: calls.append(stage_dir) or {'n': len(calls)}
  assert cache.cached_stage('s', str(tmp_path), {'a': 1}, run)['n'] == 1
  assert cache.cached_stage('s', str(tmp_path), {'a': 1}, run)['n'] == 1   # cached
  assert cache.cached_stage('s', str(tmp_path), {'a': 2}, run)['n'] == 2   # redone
  assert len(calls) == 2


def test_a_stage_that_crashes_leaves_no_done_marker(tmp_path):
  def boom(stage_dir):
    raise RuntimeError('crash')
  with pytest.raises(RuntimeError):
    cache.cached_stage('s', str(tmp_path), {'a': 1}, boom)
  assert not (tmp_path / 's' / 'stage.json').exists()


def test_a_changed_config_clears_the_stage_outputs_of_the_old_one(tmp_path):
  def write(stage_dir):
    open(os.path.join(stage_dir, 'checkpoint'), 'a').close()
    return {}
  cache.cached_stage('s', str(tmp_path), {'a': 1}, write)
  (tmp_path / 's' / 'stale').write_text('from config a=1')
  cache.cached_stage('s', str(tmp_path), {'a': 2}, write)
  assert not (tmp_path / 's' / 'stale').exists()
  assert (tmp_path / 's' / 'checkpoint').exists()


def test_a_crashed_stage_resumes_in_its_own_folder(tmp_path):
  def crash(stage_dir):
    (tmp_path / 's' / 'partial').write_text('progress')
    raise RuntimeError('killed')
  with pytest.raises(RuntimeError):
    cache.cached_stage('s', str(tmp_path), {'a': 1}, crash)
  seen = []
  cache.cached_stage('s', str(tmp_path), {'a': 1},
                      lambda d: seen.append(os.path.exists(os.path.join(d, 'partial'))) or {})
  assert seen == [True]


@pytest.mark.parametrize('override, message', [
    ('--config.pretrain.stepz=5', '--config.pretrain.stepz=5: config.pretrain.stepz is not a '
                                  'config key (did you mean config.pretrain.steps?)'),
    ('--config.pretrainz.steps=5', 'config.pretrainz is not a config key (did you mean '
                                   'config.pretrain?)'),
    ('--config.pretrain.steps.x=3', 'config.pretrain.steps.x is not a config key'),
    ('--noconfig.model.nope', 'config.model.nope is not a config key'),
    ('--config.pretrain.steps=5', None)])
def test_an_override_naming_no_config_key_is_named_with_the_nearest_key(override, message):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for config in ([f'--config={root}/configs/default.py:smoke'],
                 ['--config', f'{root}/configs/default.py:smoke']):
    found = config_checks.unknown_override(['main.py', *config, '--workdir=w', override])
    assert found == message or message in found, found
