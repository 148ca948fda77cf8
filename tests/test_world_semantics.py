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
  assert ws.ridge_probe(rng.standard_normal((600, 16)), labels, 6) < 0.3


def test_one_object_keeps_the_subjects_of_one_object_scenes():
  world = _world()
  idx = world.split_indices('train')[:300]
  kept, attr = ws.one_object(world, idx)
  scene = world.scene(kept)
  assert 0 < len(kept) < 300 and (scene.num_objects == 1).all()
  np.testing.assert_array_equal(attr['shape'], scene.shape[:, 0])
  np.testing.assert_array_equal(attr['colour'], scene.colour[:, 0])


def test_batch_negatives_counts_shape_only_negatives_within_same_colour_ones():
  out = ws.batch_negatives(_world(), batch=64, batches=3)
  only, colour = (out['with_negative_differing_only_in_shape'],
                  out['with_negative_same_colour_other_shape'])
  assert 0 < only <= colour <= 1 and out['one_object_images'] > 100
  tiny = ws.batch_negatives(_world(), batch=2, batches=20)   # a pair rarely differs so little
  assert tiny['with_negative_differing_only_in_shape'] < only
