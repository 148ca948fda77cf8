"""The embedded world: determinism, queries and relevance, factors and captions, grain."""

import colorsys
import re

import grain
import numpy as np
import pytest

from input_pipeline import world as world_lib
from input_pipeline import world_scene
from input_pipeline import world_text
from input_pipeline.world import (AESTHETIC_WEIGHTS, COLOURS, FACTOR_NAMES, PATTERNS, SHAPES,
                                  SIZES, World)

_SIZE_CANON = {w: size for size, words in world_text.SIZE_WORDS.items() for w in words}
_OBJECT_RE = re.compile(r"\ba (%s) (%s) (%s)\b" % (
    "|".join(_SIZE_CANON), "|".join(COLOURS), "|".join(SHAPES)))
_PATTERN_RE = re.compile(r"\b(%s) (?:background|backdrop)\b" % "|".join(PATTERNS))


@pytest.fixture(scope="module")
def world():
  return World(num_train=5000, num_eval=2000, num_hpir_pool=3000)


def _parse_caption(caption):
  """(objects as [(size, colour, shape)], pattern) as the caption states them."""
  objects = [(_SIZE_CANON[s], c, sh) for s, c, sh in _OBJECT_RE.findall(caption)]
  patterns = _PATTERN_RE.findall(caption)
  assert len(patterns) == 1, caption
  return objects, patterns[0]


def test_same_seed_and_index_give_identical_bytes():
  a, b = World(seed=3), World(seed=3)
  idx = [5, 17, 4000, 123456]
  ra, rb = a.records(idx), b.records(idx)
  for x, y in zip(ra, rb):
    assert x["image"].tobytes() == y["image"].tobytes()
    assert x["caption"] == y["caption"]
    assert x["factors"].tobytes() == y["factors"].tobytes()


def test_random_access_does_not_depend_on_order_or_batch(world):
  idx = np.array([7, 3, 99, 2500, 0])
  forward = world.render_batch(idx)
  backward = world.render_batch(idx[::-1])[::-1]
  np.testing.assert_array_equal(forward, backward)
  # Alone, or inside a batch larger than one internal render chunk (512 images at 32 px).
  big = np.concatenate([np.arange(1000, 1600), idx])
  np.testing.assert_array_equal(world.render_batch(big)[-len(idx):], forward)
  for j, i in enumerate(idx):
    np.testing.assert_array_equal(world[int(i)]["image"], forward[j])
  assert world.captions(idx[::-1])[::-1] == world.captions(idx)


def test_different_seeds_give_different_worlds():
  a, b = World(seed=0), World(seed=1)
  idx = np.arange(50)
  differ = [not np.array_equal(x, y) for x, y in zip(a.render_batch(idx), b.render_batch(idx))]
  assert all(differ)
  assert sum(x != y for x, y in zip(a.captions(idx), b.captions(idx))) >= 45
  assert [q.text for q in a.eval_queries] != [q.text for q in b.eval_queries]


def test_query_sets_are_large_disjoint_and_deterministic(world):
  mining, held_out = world.mining_queries, world.eval_queries
  assert len(mining) + len(held_out) >= 200
  assert len(held_out) >= 100
  assert not {q.text for q in mining} & {q.text for q in held_out}
  assert not set(mining) & set(held_out)  # as structured queries too
  assert len({q.text for q in world.queries}) == len(world.queries)
  assert [q.text for q in World().eval_queries] == [q.text for q in held_out]
  # Stratified: every kind of query is held out in proportion to its share.
  kinds = [q.kind for q in world_text.all_queries()]
  for kind in set(kinds):
    share = kinds.count(kind) / len(kinds)
    held = sum(q.kind == kind for q in held_out) / len(held_out)
    assert held == pytest.approx(share, abs=0.02), kind


def test_queries_are_semantic_only(world):
  aesthetic = [row[0] for row in world_text.aesthetic_phrase_table()]
  for q in world.queries:
    assert not world_text.find_aesthetic_phrases(q.text), q.text
    assert q.colour in q.text and q.shape in q.text
  assert "sharp" in aesthetic  # the check above has a vocabulary to look for


def test_relevance_agrees_with_captions(world):
  idx = world.split_indices("eval")
  captions = world.captions(idx)
  parsed = [_parse_caption(c) for c in captions]
  scene = world.scene(idx)
  assert [len(objs) for objs, _ in parsed] == list(scene.num_objects)
  queries = world.queries
  relevance = world.relevance(queries, idx)
  for qi, q in enumerate(queries):
    from_captions = np.array([
        any(c == q.colour and s == q.shape and (q.size is None or z == q.size)
            for z, c, s in objs) and (q.pattern is None or pattern == q.pattern)
        for objs, pattern in parsed])
    np.testing.assert_array_equal(relevance[qi], from_captions, err_msg=q.text)
  assert relevance.any(1).mean() > 0.95  # nearly every query has relevant images here
  q = queries[0]
  assert world.is_relevant(q, int(idx[0])) == bool(relevance[0, 0])
  np.testing.assert_array_equal(world.is_relevant(q, idx), relevance[0])


def test_factors_are_in_unit_interval_and_ground_truth_is_the_documented_mix(world):
  assert sum(AESTHETIC_WEIGHTS.values()) == pytest.approx(1.0)
  assert set(AESTHETIC_WEIGHTS) == set(FACTOR_NAMES)
  idx = np.arange(20000)
  f, a = world.factors(idx), world.aesthetic(idx)
  assert f.shape == (len(idx), len(FACTOR_NAMES)) and f.dtype == np.float32
  assert f.min() >= 0.0 and f.max() <= 1.0
  weights = np.array([AESTHETIC_WEIGHTS[n] for n in FACTOR_NAMES])
  np.testing.assert_allclose(a, f.astype(np.float64) @ weights, atol=1e-6)
  # Every factor spans its range (the world has good and bad images of every kind).
  assert (f.min(0) < 0.05).all() and (f.max(0) > 0.9).all()
  # Aesthetics are drawn independently of semantics: per colour, the same mean.
  colour = world.scene(idx).colour[:, 0]
  means = [a[colour == c].mean() for c in range(len(COLOURS))]
  assert max(means) - min(means) < 0.02


def test_records_match_the_pixel_free_queries(world):
  idx = [11, 2222, 4999]
  for rec in world.records(idx):
    i = int(rec["index"])
    np.testing.assert_array_equal(rec["factors"], world.factors(i))
    assert rec["aesthetic"] == world.aesthetic(i)
    assert rec["caption"] == world.captions([i])[0]
    sem = world.semantics(i)
    assert rec["num_objects"] == len(sem["objects"])
    assert [SHAPES[s] for s in rec["shapes"] if s >= 0] == [o["shape"] for o in sem["objects"]]
    assert [COLOURS[c] for c in rec["colours"] if c >= 0] == [o["colour"] for o in sem["objects"]]
    assert [SIZES[z] for z in rec["sizes"] if z >= 0] == [o["size"] for o in sem["objects"]]
    assert PATTERNS[rec["pattern"]] == sem["pattern"]
    assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8


def test_aesthetic_words_follow_the_factors():
  world = World(aesthetic_caption_fraction=1.0)
  idx = np.arange(3000)
  scene = world.scene(idx)
  found = 0
  for j, caption in enumerate(world.captions(idx)):
    for phrase, factor, polarity in world_text.find_aesthetic_phrases(caption):
      found += 1
      if factor == "overall":
        value, hi, lo = scene.aesthetic[j], world_text.OVERALL_POSITIVE_AT, \
            world_text.OVERALL_NEGATIVE_AT
      else:
        value = scene.factors[j, FACTOR_NAMES.index(factor)]
        hi, lo = world_text.POSITIVE_AT, world_text.NEGATIVE_AT
      if polarity == "positive":
        assert value >= hi, (caption, phrase, value)
      else:
        assert value <= lo, (caption, phrase, value)
        if ":" in polarity:  # exposure words name the failure the pixels show
          mode = world_scene.EXPOSURE_MODES[scene.exposure_mode[j]]
          assert polarity.split(":")[1] == mode, (caption, phrase, mode)
  assert found > 3000


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.8])
def test_fraction_of_captions_with_aesthetic_words_matches_config(fraction):
  world = World(aesthetic_caption_fraction=fraction)
  captions = world.captions(np.arange(4000))
  observed = np.mean([bool(world_text.find_aesthetic_phrases(c)) for c in captions])
  # Captions drawn to carry words but whose factors are all middling carry none (~0.4%).
  assert observed == pytest.approx(fraction, abs=0.025)
  if fraction == 0.0:
    assert observed == 0.0


def test_overrides_change_only_the_named_factor(world):
  idx = np.arange(200)
  base = world.scene(idx)
  blurred = world.scene(idx, dict(sharpness=0.0))
  np.testing.assert_array_equal(blurred.factors[:, 0], 0.0)
  np.testing.assert_array_equal(np.delete(blurred.factors, 0, 1), np.delete(base.factors, 0, 1))
  np.testing.assert_array_equal(blurred.centre, base.centre)
  clash = world.scene(idx, dict(harmony=0.0))
  # Harmony is set against the subject; a second object's colour stays as drawn.
  assert clash.factors[base.num_objects == 1, 3].max() < 0.1
  assert clash.factors[:, 3].mean() < base.factors[:, 3].mean() - 0.3
  np.testing.assert_array_equal(clash.colour, base.colour)
  np.testing.assert_array_equal(clash.centre, base.centre)
  framed = world.scene(idx, dict(composition=1.0))
  assert np.median(framed.factors[:, 4]) > 0.9
  with pytest.raises(ValueError, match="unknown factor"):
    world.scene(idx, dict(beauty=1.0))


def _laplacian_variance(images):
  y = images.astype(np.float64).mean(-1)
  lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
  return lap.var((1, 2))


def test_low_level_factors_are_realised_in_pixels(world):
  idx = np.arange(64)
  clean = dict(noise=1.0, exposure=1.0)
  sharp = _laplacian_variance(world.render_batch(idx, dict(clean, sharpness=1.0)))
  soft = _laplacian_variance(world.render_batch(idx, dict(clean, sharpness=0.0)))
  assert (soft < 0.6 * sharp).all()
  quiet = world.render_batch(idx, dict(sharpness=1.0, noise=1.0, exposure=1.0))
  grainy = world.render_batch(idx, dict(sharpness=1.0, noise=0.0, exposure=1.0))
  residual = (grainy.astype(np.float64) - quiet).std((1, 2, 3)) / 255.0
  # max_noise_std (0.08) minus a little for clipping at 0 and 255.
  assert residual.min() > 0.06 and residual.max() < 0.085
  dark = world.render_batch(idx, dict(clean, sharpness=1.0, exposure=0.0))
  modes = world.scene(idx).exposure_mode
  mean_change = dark.mean((1, 2, 3)) - quiet.mean((1, 2, 3))
  assert (mean_change[modes == 0] < -10).all()  # dark
  assert (mean_change[modes == 1] > 10).all()   # washed out
  contrast_change = dark.std((1, 2, 3)) - quiet.std((1, 2, 3))
  assert (contrast_change[modes == 2] < 0).all()  # flat


@pytest.mark.parametrize("size", [32, 64, 224])
def test_pixels_show_the_stated_objects_at_every_size(size):
  world = World(image_size=size)
  idx = np.arange(24 if size == 224 else 100)
  scene = world.scene(idx)
  images = world.render_batch(idx, dict(sharpness=1.0, noise=1.0, exposure=1.0))
  assert images.shape == (len(idx), size, size, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(scene.colour, World(image_size=32).scene(idx).colour)
  for j in range(len(idx)):
    for k in range(scene.num_objects[j]):
      x, y = (np.clip(scene.centre[j, k] * size, 0, size - 1)).astype(int)
      expected = world_scene.COLOUR_RGB[scene.colour[j, k]] * 255
      np.testing.assert_allclose(images[j, y, x], expected, atol=3)


def test_subject_colour_stays_nameable_at_worst_degradation(world):
  """The prototype's heavy blur and noise made semantics hard to learn: bound the damage."""
  idx = np.arange(400)
  worst = dict(sharpness=0.0, noise=0.0, exposure=0.0)
  scene = world.scene(idx, worst)
  images = world.render_batch(idx, worst).astype(np.float64) / 255
  size = images.shape[1]
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  correct = []
  for j in range(len(idx)):
    (cx, cy), r = scene.centre[j, 0] * size, scene.radius[j, 0] * size
    core = (xx - cx) ** 2 + (yy - cy) ** 2 <= (0.25 * r) ** 2 + 0.6
    hue = colorsys.rgb_to_hsv(*images[j][core].mean(0))[0] * 360
    dist = np.abs((world_scene.COLOUR_HUE - hue + 180) % 360 - 180)
    correct.append(dist.argmin() == scene.colour[j, 0])
  assert np.mean(correct) >= 0.98
  # No object ever loses more than 30% of its radius to the frame edge.
  edge = np.minimum(scene.centre, 1 - scene.centre).min(-1)
  present = scene.num_objects[:, None] > np.arange(2)[None]
  assert (edge[present] / scene.radius[present] >= world_scene.EDGE_MIN - 1e-6).all()


def test_splits_are_disjoint_ranges_and_train_never_holds_eval_images(world):
  ranges = [world.split_range(s) for s in world_lib.SPLITS]
  assert ranges == [(0, 5000), (5000, 7000), (7000, 10000)]
  assert len(world) == 10000
  train = world.split("train")
  assert len(train) == 5000 and train.indices[-1] < world.split_indices("eval")[0]
  assert int(world.split("eval")[0]["index"]) == 5000
  with pytest.raises(IndexError):
    train[5000]
  with pytest.raises(ValueError, match="unknown world split"):
    world.split("test")


def test_works_as_a_grain_map_dataset_source(world):
  train = world.split("train")
  ds = grain.MapDataset.source(train).shuffle(seed=4).batch(16)
  first = ds[0]
  assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.uint8
  assert first["factors"].shape == (16, len(FACTOR_NAMES))
  assert len(first["caption"]) == 16
  assert (first["index"] < 5000).all() and len(set(first["index"].tolist())) == 16
  # The batched read returns exactly the single-record reads.
  for j in (0, 15):
    rec = world[int(first["index"][j])]
    np.testing.assert_array_equal(first["image"][j], rec["image"])
    assert first["caption"][j] == rec["caption"]
  # The fast chain (batch indices, render each batch at once) yields the same records.
  fast = grain.MapDataset.range(*world.split_range("train")).shuffle(seed=4).batch(16).map(
      world.batch)[0]
  assert set(fast) == set(first)
  for key in first:
    np.testing.assert_array_equal(np.asarray(fast[key]), np.asarray(first[key]), err_msg=key)
  # The whole world is a source too, and per-record access through an iterator works.
  it = iter(grain.MapDataset.source(world).map(lambda r: r["aesthetic"]).to_iter_dataset())
  assert next(it) == world.aesthetic(0)


def test_bad_config_is_refused_with_the_key_named():
  with pytest.raises(ValueError, match="unknown key"):
    World(image_sise=32)
  with pytest.raises(ValueError, match="num_eval_queries"):
    World(num_queries=100, num_eval_queries=100)
  with pytest.raises(ValueError, match="aesthetic_caption_fraction"):
    World(aesthetic_caption_fraction=1.5)
