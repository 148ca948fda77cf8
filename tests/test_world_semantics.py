"""benchmarks/world_semantics.py: the diagnostics of what the PT model sees in the world."""

import numpy as np

from benchmarks import world_semantics as ws
from input_pipeline import world as world_lib


def _world():
  return world_lib.World(num_train=2000, num_eval=200, num_hpir_pool=0)


def test_ridge_probe_reads_labels_that_the_features_carry_and_not_noise():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, 600)
  informative = np.eye(6)[labels] + 0.1 * rng.standard_normal((600, 6))
  assert ws.ridge_probe(informative, labels, 6) > 0.95
  assert ws.ridge_probe(rng.standard_normal((600, 64)), labels, 6) < 0.25   # held out: chance


def test_one_object_keeps_the_subjects_of_one_object_scenes():
  world = _world()
  idx = world.split_indices('train')[:300]
  kept, attr = ws.one_object(world, idx)
  scene = world.scene(kept)
  assert 0 < len(kept) < 300 and (scene.num_objects == 1).all()
  np.testing.assert_array_equal(attr['shape'], scene.shape[:, 0])
  np.testing.assert_array_equal(attr['colour'], scene.colour[:, 0])


def test_batch_negatives_counts_what_a_pairwise_check_of_the_batch_finds():
  world = _world()
  out = ws.batch_negatives(world, batch=64, batches=1, seed=3)
  idx = world.split_indices('train')[np.random.default_rng(3).integers(0, 2000, 64)]
  scene = world.scene(idx)
  ones = [j for j in range(64) if scene.num_objects[j] == 1]
  key = lambda j: (scene.colour[j, 0], scene.size[j, 0], scene.pattern[j])
  only = [any(key(k) == key(j) and scene.shape[k, 0] != scene.shape[j, 0] for k in ones if k != j)
          for j in ones]
  colour = [any(scene.colour[k, 0] == scene.colour[j, 0] and scene.shape[k, 0] != scene.shape[j, 0]
                for k in ones if k != j) for j in ones]
  assert out['one_object_images'] == len(ones)
  assert out['with_negative_differing_only_in_shape'] == np.mean(only)
  assert out['with_negative_same_colour_other_shape'] == np.mean(colour)
  assert 0 < np.mean(only) < np.mean(colour)


def test_nuisance_probe_trains_and_tests_on_plain_backgrounds_only():
  from aesalign_jax.models import clip
  import pytest
  world = _world()
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  out = ws.label_probe(world, cfg, attribute='shape', lr=1e-3, steps=2, eval_images=500,
                       nuisance='clean_plain')
  eval_idx, attr = ws.one_object(world, world.split_indices('eval'))
  plain = int(np.sum(attr['pattern'] == 0))
  assert 0 < out['eval_images'] == plain < len(eval_idx)
  assert out['nuisance'] == 'clean_plain'
  with pytest.raises(ValueError, match='nuisance'):
    ws.label_probe(world, cfg, attribute='shape', lr=1e-3, steps=1, nuisance='dirty')
