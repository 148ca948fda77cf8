"""Evaluators (retrieval, zero-shot, top-k quality) on hand-made embeddings with known answers."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from aesalign_jax.aesthetics import lowlevel
from aesalign_jax.evaluation import common, retrieval_eval, topk_quality, zeroshot
from input_pipeline import corpus as corpus_lib
from input_pipeline import world as world_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _random_unit(n, d, seed):
  return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def _brute_force_ranks(img, txt, owner):
  """Reference: full score matrix, argsort (no ties in random data)."""
  s = txt.astype(np.float64) @ img.astype(np.float64).T              # [M, N]
  order = np.argsort(-s, axis=1)
  t2i = np.argmax(order == owner[:, None], axis=1) + 1
  order_t = np.argsort(-s.T, axis=1)                                  # [N, M]
  own = owner[order_t] == np.arange(len(img))[:, None]
  has = own.any(axis=1)
  i2t = np.argmax(own, axis=1)[has] + 1
  return t2i, i2t


class LookupEmbedder:
  """A fake model: texts and images looked up in tables; counts its image calls."""

  def __init__(self, text_fn, image_fn):
    self.text_fn, self.image_fn = text_fn, image_fn
    self.image_calls = 0

  def texts(self, texts):
    return _unit(np.stack([self.text_fn(t) for t in texts]))

  def images(self, images):
    self.image_calls += 1
    return _unit(np.stack([self.image_fn(im) for im in images]))


# --- retrieval ---------------------------------------------------------------------------------

def test_identity_retrieval_gives_recall_one_and_mean_rank_one_both_ways():
  emb = _random_unit(60, 16, 0)
  m = retrieval_eval.retrieval_metrics(emb, emb, np.arange(60))
  for d in ('t2i', 'i2t'):
    assert m[f'{d}_r1'] == m[f'{d}_r5'] == m[f'{d}_r10'] == 1.0
    assert m[f'{d}_mean_rank'] == 1.0


def test_right_match_always_second_gives_r1_zero_r5_one_mean_rank_two():
  # Text i scores 1 with image i and 1.2 with image i+1 (0 elsewhere): the right image is
  # second for every text, and each image's own text is second (text i-1 beats it).
  n = 20
  img = np.eye(n, dtype=np.float32)
  txt = _unit(np.eye(n) + 1.2 * np.roll(np.eye(n), 1, axis=1))
  m = retrieval_eval.retrieval_metrics(img, txt, np.arange(n), text_chunk=7, image_chunk=6)
  for d in ('t2i', 'i2t'):
    assert (m[f'{d}_r1'], m[f'{d}_r5'], m[f'{d}_r10'], m[f'{d}_mean_rank']) == (0, 1, 1, 2)


def test_shuffled_captions_match_the_brute_force_ranks():
  img, txt = _random_unit(40, 8, 1), _random_unit(40, 8, 2)
  perm = np.random.default_rng(3).permutation(40)
  m = retrieval_eval.retrieval_metrics(img, txt, perm)
  t2i, i2t = _brute_force_ranks(img, txt, perm)
  assert m['t2i_r5'] == pytest.approx(np.mean(t2i <= 5), abs=1e-12)
  assert m['t2i_mean_rank'] == pytest.approx(t2i.mean(), abs=1e-12)
  assert m['i2t_r10'] == pytest.approx(np.mean(i2t <= 10), abs=1e-12)
  assert m['i2t_mean_rank'] == pytest.approx(i2t.mean(), abs=1e-12)
  assert 1.0 < m['t2i_mean_rank'] < 40.0


def test_multi_caption_ground_truth_counts_each_text_and_the_best_caption_per_image():
  # Image i (basis vector) has two captions: one exactly e_i, one closer to image i+1.
  n = 5
  e = np.eye(n)
  captions = [[e[i], e[i] + 2 * e[(i + 1) % n]] for i in range(n)]
  flat = _unit(np.concatenate([np.stack(c) for c in captions]))
  owner = np.repeat(np.arange(n), 2)
  m = retrieval_eval.retrieval_metrics(e.astype(np.float32), flat, owner)
  # t2i: the exact captions are first, the others second.
  assert (m['t2i_r1'], m['t2i_mean_rank'], m['t2i_r5']) == (0.5, 1.5, 1.0)
  # i2t: each image's exact caption is first, so every image is a hit at 1.
  assert (m['i2t_r1'], m['i2t_mean_rank']) == (1.0, 1.0)
  assert m['num_texts'] == 10 and m['num_images'] == 5


def test_flatten_captions_maps_each_text_to_its_image_and_captionless_images_are_left_out():
  texts, owner = retrieval_eval.flatten_captions([['a', 'b', 'c'], 'd', [], ['e']])
  assert texts == ['a', 'b', 'c', 'd', 'e']
  np.testing.assert_array_equal(owner, [0, 0, 0, 1, 3])
  emb = _random_unit(4, 8, 4)
  m = retrieval_eval.retrieval_metrics(emb, emb[owner], owner)
  assert m['num_images_with_text'] == 3 and m['i2t_r1'] == 1.0 and m['t2i_r1'] == 1.0


def test_chunking_gives_identical_results_to_one_block():
  rng = np.random.default_rng(5)
  img, txt = _random_unit(37, 12, 6), _random_unit(101, 12, 7)
  owner = rng.integers(0, 37, size=101)
  whole = retrieval_eval.retrieval_metrics(img, txt, owner, text_chunk=10_000,
                                           image_chunk=10_000)
  for tc, ic in ((1, 1), (10, 7), (64, 36), (101, 37)):
    assert retrieval_eval.retrieval_metrics(img, txt, owner, text_chunk=tc,
                                            image_chunk=ic) == whole
  t2i, i2t = _brute_force_ranks(img, txt, owner)
  assert whole['t2i_mean_rank'] == pytest.approx(t2i.mean(), abs=1e-12)
  assert whole['i2t_r5'] == pytest.approx(np.mean(i2t <= 5), abs=1e-12)


def test_a_collapsed_model_scores_chance_not_perfect_recall():
  # Every score ties: the right match is equally likely at any of the n ranks.
  n = 10
  flat = np.full((n, 4), 0.5, np.float32)
  m = retrieval_eval.retrieval_metrics(flat, flat, np.arange(n))
  assert m['t2i_r1'] == pytest.approx(1 / n) and m['i2t_r5'] == pytest.approx(5 / n)
  assert m['t2i_mean_rank'] == pytest.approx((n + 1) / 2)


def test_retrieval_metrics_refuses_a_text_pointing_outside_the_images():
  emb = _random_unit(3, 4, 0)
  with pytest.raises(ValueError, match='text 1 points at image 3'):
    retrieval_eval.retrieval_metrics(emb, emb, np.array([0, 3, 1]))


def test_retrieval_over_a_mesh_of_four_devices_equals_one_device():
  script = textwrap.dedent('''
      import json, jax, numpy as np
      from jax.sharding import Mesh
      from aesalign_jax.evaluation import retrieval_eval as r
      rng = np.random.default_rng(0)
      img, txt = rng.normal(size=(37, 16)), rng.normal(size=(83, 16))
      owner = rng.integers(0, 37, 83)
      mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'fsdp'))
      a = r.retrieval_metrics(img, txt, owner, text_chunk=10, image_chunk=7, mesh=mesh)
      print(json.dumps([len(jax.devices()), a == r.retrieval_metrics(img, txt, owner)]))
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == '[4, true]'


def test_retrieval_evaluator_reads_batches_with_several_captions_per_image():
  # A data source's batches: images are one-hot in pixel (0, 0, channel); captions name it.
  images = np.zeros((3, 2, 2, 3), np.uint8)
  for i in range(3):
    images[i, 0, 0, i] = 255
  names = ['r', 'g', 'b']
  emb = LookupEmbedder(lambda t: np.eye(3)[names.index(t[0])],
                       lambda im: im[0, 0].astype(np.float64))
  system = common.System('oracle', emb)
  batches = [{'image': images[:2], 'captions': [['r1', 'r2'], ['g1']]},
             {'image': images[2:], 'captions': [['b1', 'b2']]}]
  m = retrieval_eval.evaluate_batches(system, batches)
  assert m['num_texts'] == 5 and m['i2t_r1'] == 1.0 and m['t2i_r1'] == 1.0


# --- zero-shot ---------------------------------------------------------------------------------

def test_class_embeddings_average_normalised_templates_then_renormalise():
  table = {'x A': [3.0, 0.0], 'y A': [0.0, 1.0], 'x B': [1.0, 1.0], 'y B': [0.0, -5.0]}
  emb = zeroshot.class_embeddings(lambda ts: np.array([table[t] for t in ts]), ['A', 'B'],
                                  ['x {}', 'y {}'])
  want_a = _unit(np.array([1.0, 0.0]) + np.array([0.0, 1.0]))
  want_b = _unit(_unit(np.array([1.0, 1.0])) + np.array([0.0, -1.0]))
  np.testing.assert_allclose(emb, np.stack([want_a, want_b]), atol=1e-6)


def test_a_perfect_classifier_scores_one():
  classes = _random_unit(7, 32, 8)
  labels = np.random.default_rng(9).integers(0, 7, size=50)
  imgs = _unit(classes[labels] + 0.01 * np.random.default_rng(10).normal(size=(50, 32)))
  assert zeroshot.zeroshot_accuracy(imgs, labels, classes) == {'top1': 1.0, 'top5': 1.0}


def test_known_true_class_ranks_give_known_top1_and_top5():
  # 10 orthogonal classes; image n puts its true class at rank ranks[n] by construction.
  c = 10
  classes = np.eye(c, dtype=np.float32)
  ranks = np.array([1, 1, 2, 3, 5, 6, 9, 10, 1, 4])
  labels = np.arange(len(ranks)) % c
  imgs = []
  for label, rank in zip(labels, ranks):
    others = [j for j in range(c) if j != label]
    order = others[:rank - 1] + [label] + others[rank - 1:]   # best first
    w = np.zeros(c)
    w[order] = np.linspace(1.0, 0.1, c)
    imgs.append(w)
  acc = zeroshot.zeroshot_accuracy(_unit(np.stack(imgs)), labels, classes, chunk=3)
  assert acc['top1'] == pytest.approx(np.mean(ranks == 1))
  assert acc['top5'] == pytest.approx(np.mean(ranks <= 5))
  assert acc['top5'] >= acc['top1']


def test_top5_with_fewer_than_five_classes_is_capped_at_all_classes():
  classes = np.eye(3, dtype=np.float32)
  imgs = _unit(np.array([[1, 0.5, 0.2], [0.2, 0.5, 1], [0.2, 1, 0.5]]))
  acc = zeroshot.zeroshot_accuracy(imgs, np.array([0, 0, 1]), classes)
  assert acc == {'top1': pytest.approx(2 / 3), 'top5': 1.0}


@pytest.fixture(scope='module')
def small_world():
  return world_lib.World(num_train=0, num_eval=120, num_hpir_pool=0, num_queries=48,
                         num_eval_queries=16)


def _world_oracle(world, idx):
  """An embedder that knows each rendered eval image's subject (shape, colour)."""
  scene = world.scene(idx)
  by_pixels = {world.render_batch(idx[j:j + 1])[0].tobytes(): j for j in range(len(idx))}
  n_s, n_c = len(world_lib.SHAPES), len(world_lib.COLOURS)

  def image_fn(im):
    j = by_pixels[im.tobytes()]
    v = np.zeros(n_s + n_c)
    v[scene.shape[j, 0]] = v[n_s + scene.colour[j, 0]] = 1.0
    return v

  def text_fn(text):
    v = np.full(n_s + n_c, 1e-3)
    words = text.replace(',', ' ').split()
    for s, name in enumerate(world_lib.SHAPES):
      v[s] += name in words
    for c, name in enumerate(world_lib.COLOURS):
      v[n_s + c] += name in words
    return v
  return LookupEmbedder(text_fn, image_fn)


def test_world_shape_task_labels_one_object_images_by_their_subject(small_world):
  idx, labels, names = zeroshot.world_task(small_world, 'world_shape')
  assert names == world_lib.SHAPES and 0 < len(idx) < 120
  for i, label in zip(idx[:10], labels[:10]):
    objects = small_world.semantics(int(i))['objects']
    assert len(objects) == 1 and objects[0]['shape'] == names[label]
  all_idx, _, _ = zeroshot.world_task(small_world, 'world_shape', single_object=False)
  assert len(all_idx) == 120


def test_zeroshot_evaluator_on_the_world_with_an_oracle_model_scores_one(small_world):
  idx = small_world.split_indices('eval')
  system = common.System('oracle', _world_oracle(small_world, idx))
  evals = ml_collections.ConfigDict({
      'shape': zeroshot.default_config('world_shape'),
      'colour': zeroshot.default_config('world_colour')})
  evaluators = common.make_evaluators(evals, world=small_world)
  m = common.run_evaluators(evaluators, system)
  assert m['shape/top1'] == 1.0 and m['colour/top1'] == 1.0
  assert m['shape/num_classes'] == 6 and m['colour/num_classes'] == 8
  # Both tasks embed the same one-object images: the shared cache embeds them once.
  assert system.embedder.image_calls == 1


def test_zeroshot_on_a_tfds_set_uses_the_builders_class_names():
  tfds = pytest.importorskip('tensorflow_datasets')
  from input_pipeline import sources
  with tfds.testing.mock_data(num_examples=12):
    src = sources.TfdsSource('beans', split='test', image_size=8)
    label_of = {src[i]['image'].tobytes(): src[i]['label'] for i in range(len(src))}
    names = zeroshot.tfds_label_names(src)
    assert names == ['angular leaf spot', 'bean rust', 'healthy']   # '_' -> ' '
    oracle = LookupEmbedder(
        lambda t: np.eye(3)[[n for n in range(3) if f' {names[n]}.' in t][0]],
        lambda im: np.eye(3)[label_of[im.tobytes()]])
    c = zeroshot.default_config('tfds')
    c.tfds_name, c.image_size, c.batch_size = 'beans', 8, 5
    ev = zeroshot.ZeroShotEvaluator(c, name='beans')
    m = ev.run(common.System('oracle', oracle))
  assert m == {'top1': 1.0, 'top5': 1.0, 'num_images': 12.0, 'num_classes': 3.0}


def test_tfds_label_names_are_the_sources_class_names_with_spaces():
  class Source:
    def class_names(self):
      return ['angular_leaf_spot', 'healthy']
  assert zeroshot.tfds_label_names(Source()) == ['angular leaf spot', 'healthy']


# --- top-k quality -----------------------------------------------------------------------------

def test_diversity_is_zero_for_identical_one_for_orthogonal_and_two_thirds_for_a_mix():
  e = np.eye(4)
  div = topk_quality.pairwise_diversity(np.stack([
      np.repeat(e[:1], 3, axis=0), e[:3], np.stack([e[0], e[0], e[1]])]))
  np.testing.assert_allclose(div, [0.0, 1.0, 2 / 3], atol=1e-12)


def _toy_corpus():
  # Corpus rows 0..5; the query 'q' prefers rows 5, 4, 3, ... (descending weights); its
  # rephrasing 'q+' prefers rows 0, 1, 2, ...
  corpus = np.eye(6, dtype=np.float32)
  texts = {'q': np.arange(1.0, 7.0), 'q+': np.arange(6.0, 0.0, -1)}
  emb = LookupEmbedder(lambda t: texts[t], lambda im: None)
  return corpus, emb


def test_topk_quality_equals_hand_computation_and_follows_the_rephrased_query():
  corpus, emb = _toy_corpus()
  calls = []
  scorers = {'double': lambda rows: (calls.append(len(rows)), 2.0 * rows)[1]}
  relevance = lambda qi, rows: rows % 2 == 1        # odd rows are relevant
  plain = common.System('pt', emb)
  m, top = topk_quality.evaluate_topk(plain, ['q'], corpus, k=3, scorers=scorers,
                                      relevance=relevance, ids=np.arange(100, 106))
  np.testing.assert_array_equal(top.rows, [[5, 4, 3]])
  np.testing.assert_array_equal(top.ids, [[105, 104, 103]])
  assert m == {'aesthetic/double': pytest.approx(8.0), 'precision': pytest.approx(2 / 3),
               'diversity': pytest.approx(1.0)}
  reph = common.System('pt+rephrase', emb, rephrase={'q': 'q+'})
  m2, top2 = topk_quality.evaluate_topk(reph, ['q'], corpus, k=3, scorers=scorers,
                                        relevance=relevance)
  assert top2.query_texts == ['q+'] and top2.queries == ['q']
  np.testing.assert_array_equal(top2.rows, [[0, 1, 2]])
  assert m2['aesthetic/double'] == pytest.approx(2.0) and m2['precision'] == pytest.approx(1 / 3)
  assert calls == [3, 3]   # each system's rows scored in one call


def test_topk_diversity_in_a_fixed_reference_space():
  corpus, emb = _toy_corpus()
  same = np.ones((6, 2), np.float32)                  # every image identical there
  m, _ = topk_quality.evaluate_topk(common.System('pt', emb), ['q'], corpus, k=4,
                                    diversity_emb=same)
  assert m['diversity'] == pytest.approx(0.0, abs=1e-12)


def test_topk_evaluator_on_the_world_matches_ground_truth_and_keeps_rows(small_world):
  idx = small_world.split_indices('eval')
  embedder = _world_oracle(small_world, idx)
  c = topk_quality.default_config()
  c.k, c.max_queries, c.batch_size = 4, 6, 50
  corpus = corpus_lib.WorldCorpus(small_world, 'eval')
  low = lowlevel.LowLevelScorer()
  scorers = {'ground_truth': corpus.truth.aesthetic,
             'lowlevel': lambda rows: low.score(corpus.images(rows)[0])}
  ev = common.make_evaluators(ml_collections.ConfigDict({'topk': c}), corpus=corpus,
                              queries=corpus.queries('eval'), scorers=scorers)['topk']
  pt, reph = common.System('pt', embedder), common.System('pt+r', embedder, lambda q: q)
  metrics = {s.name: common.as_metrics(ev.run(s)) for s in (pt, reph)}
  assert embedder.image_calls == 3    # the 120-image corpus in batches of 50, once for both
  top = ev.results['pt']
  queries = small_world.eval_queries[:6]
  assert top.rows.shape == (6, 4) and top.queries == [q.text for q in queries]
  np.testing.assert_array_equal(top.ids, idx[top.rows])
  gt = np.stack([small_world.aesthetic(i) for i in top.ids])
  rel = np.stack([small_world.is_relevant(q, i) for q, i in zip(queries, top.ids)])
  assert metrics['pt']['aesthetic/ground_truth'] == pytest.approx(gt.mean(), abs=1e-6)
  assert metrics['pt']['precision'] == pytest.approx(rel.mean())
  assert set(metrics['pt']) == {'aesthetic/ground_truth', 'aesthetic/lowlevel', 'precision',
                                'diversity'}
  assert 0.0 <= metrics['pt']['aesthetic/lowlevel'] <= 1.0
  assert metrics['pt'] == metrics['pt+r']
  # The oracle ranks images whose subject has the query's colour and shape first: for a
  # colour-shape query they are all in the top k (the first 6 queries include one).
  scene = small_world.scene(idx)
  checked = 0
  for j, q in enumerate(queries):
    subject = np.flatnonzero((scene.shape[:, 0] == world_lib.SHAPES.index(q.shape))
                             & (scene.colour[:, 0] == world_lib.COLOURS.index(q.colour)))
    if q.kind == 'colour_shape' and 0 < len(subject) <= c.k:
      assert set(subject) <= set(top.rows[j]) and rel[j, :len(subject)].all()
      checked += 1
  assert checked >= 1
  assert top.to_json()['ids'] == top.ids.tolist()


# --- registry and systems ----------------------------------------------------------------------

def test_make_evaluators_builds_by_type_skips_disabled_and_names_unknown_types():
  evals = ml_collections.ConfigDict({
      'coco': retrieval_eval.default_config(),
      'off': zeroshot.default_config(),
  })
  evals.off.enabled = False
  built = common.make_evaluators(evals)
  assert list(built) == ['coco'] and isinstance(built['coco'], retrieval_eval.RetrievalEvaluator)
  with pytest.raises(ValueError, match="unknown evaluator type 'nope'"):
    common.make_evaluators(ml_collections.ConfigDict({'x': {'type': 'nope'}}))
  with pytest.raises(ValueError, match='evals.coco: needs `corpus`'):
    built['coco'].run(common.System('s', LookupEmbedder(None, None)))


def test_run_evaluators_prefixes_names_and_accepts_iterators():
  @common.register('_test_iter')
  class Yields(common.Evaluator):
    def run(self, system):
      yield 'len', len(system.name)
      yield 'x', 0.5
  evs = common.make_evaluators(ml_collections.ConfigDict({'a': {'type': '_test_iter'}}))
  assert common.run_evaluators(evs, common.System('abc', None)) == {'a/len': 3.0, 'a/x': 0.5}


def test_system_query_texts_from_a_callable_a_mapping_or_a_batch_rephraser():
  class Batch:
    def rephrase_batch(self, qs):
      return type('R', (), {'texts': [q.upper() for q in qs]})()
  assert common.System('s', None).query_text('a cat') == 'a cat'
  assert common.System('s', None, lambda q: q + '!').query_texts(['a', 'b']) == ['a!', 'b!']
  assert common.System('s', None, {'a': 'A'}).query_text('a') == 'A'
  assert common.System('s', None, Batch()).query_texts(['a', 'b']) == ['A', 'B']
  with pytest.raises(KeyError, match='no rephrasing'):
    common.System('s', None, {'a': 'A'}).query_text('b')


def test_default_evals_config_builds_every_evaluator():
  built = common.make_evaluators(common.default_config())
  assert {type(e).kind for e in built.values()} == {'retrieval', 'zeroshot', 'topk_quality'}
