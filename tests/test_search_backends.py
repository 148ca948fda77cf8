"""retrieval.make_searcher: the device and FAISS backends agree (ties included), the FAISS index
is built once per corpus, mining gives the same groups with either, and validate's refusals."""

import inspect
import sys

import numpy as np
import pytest

from aesalign_jax import embed, mining, retrieval
from aesalign_jax.retrieval import faiss_index, search
from input_pipeline import preference


def _searcher(backend, **kw):
  c = retrieval.default_config()
  c.backend = backend
  c.update(kw)
  return retrieval.make_searcher(c)


def _both():
  # Small device chunks, so the corpus is merged over several chunks and query blocks.
  return _searcher('device', chunk_size=128, query_chunk=8), _searcher('faiss')


def _unit(n, d=32, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _min_gap(queries, corpus, k):
  """The smallest gap between neighbouring scores among each query's top k + 1 (float64)."""
  scores = -np.sort(-(queries.astype(np.float64) @ corpus.astype(np.float64).T), axis=1)
  return float(np.min(-np.diff(scores[:, :k + 1], axis=1)))


def test_device_and_faiss_return_the_same_rows_on_random_unit_vectors():
  corpus, queries, k = _unit(1009), _unit(21, seed=1), 40
  assert _min_gap(queries, corpus, k) > 1e-6   # no ties, not even within float32 rounding
  (dev_sim, dev_rows), (fa_sim, fa_rows) = (s.topk(queries, corpus, k) for s in _both())
  assert dev_rows.shape == fa_rows.shape == (21, k)
  assert dev_rows.dtype == fa_rows.dtype == np.int64
  assert dev_sim.dtype == fa_sim.dtype == np.float32
  np.testing.assert_array_equal(fa_rows, dev_rows)
  np.testing.assert_allclose(fa_sim, dev_sim, rtol=0, atol=1e-6)


@pytest.fixture(scope='module')
def real_embeddings(pretrained_world_model):
  """2000 world images and 40 mining queries embedded by the pretrained tiny CLIP."""
  s = pretrained_world_model
  world = s['world']
  embedder = embed.Embedder(s['cfg'], s['params'], s['tok'])
  rows = world.split_indices('train')[:2000]
  corpus = np.concatenate([embedder.images(world.render_batch(rows[i:i + 500]))
                           for i in range(0, len(rows), 500)])
  texts = embedder.texts([q.text for q in world.mining_queries[:40]])
  return np.asarray(corpus, np.float32), np.asarray(texts, np.float32)


def test_ties_rank_the_lower_row_first_on_both_backends_with_real_embeddings(real_embeddings):
  corpus, texts = real_embeddings
  corpus = corpus.copy()
  copies = [100, 700, 1300, 1900]            # one image, repeated in 4 device chunks
  corpus[copies[1:]] = corpus[copies[0]]
  queries = np.concatenate([corpus[[copies[0]]], texts])
  for searcher in _both():
    # The rule: equal scores rank by row, lower first; a tie on the k-th place keeps the lower.
    for k in (1, 2, 3):
      np.testing.assert_array_equal(searcher.topk(queries[:1], corpus, k)[1][0], copies[:k])
    sim, rows = searcher.topk(queries[:1], corpus, 6)
    assert rows[0, :4].tolist() == copies and len(set(sim[0, :4].tolist())) == 1
    assert sim[0, 4] < sim[0, 3]
  # The text queries: the same rows, except two whose exact scores are within float32 rounding
  # (the backends sum the inner products in different orders) may swap.
  (dev_sim, dev_rows), (fa_sim, fa_rows) = (s.topk(queries, corpus, 50) for s in _both())
  np.testing.assert_allclose(fa_sim, dev_sim, rtol=0, atol=1e-6)
  exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
  q, pos = np.nonzero(fa_rows != dev_rows)
  assert len(q) <= 0.01 * dev_rows.size
  np.testing.assert_allclose(exact[q, fa_rows[q, pos]], exact[q, dev_rows[q, pos]], rtol=0,
                             atol=1e-6)


def _counting_builds(monkeypatch):
  built = []
  real_build = faiss_index.FaissIndex.build.__func__

  def build(cls, embeddings, *args, **kwargs):
    built.append(len(embeddings))
    return real_build(cls, embeddings, *args, **kwargs)

  monkeypatch.setattr(faiss_index.FaissIndex, 'build', classmethod(build))
  return built


def test_the_faiss_index_is_built_once_per_corpus_array(monkeypatch):
  built = _counting_builds(monkeypatch)
  corpus, other = _unit(300), _unit(200, seed=5)
  searcher = _searcher('faiss')
  want = [searcher.topk(_unit(4, seed=s), corpus, k)[1] for s, k in ((1, 5), (2, 9), (3, 1))]
  assert built == [300]
  searcher.topk(_unit(4, seed=1), other, 3)
  assert built == [300, 200]                   # a new corpus: a new index
  again = searcher.topk(_unit(4, seed=1), other, 7)[1]
  assert built == [300, 200]
  np.testing.assert_array_equal(again, _searcher('device').topk(_unit(4, seed=1), other, 7)[1])
  np.testing.assert_array_equal(want[0], _searcher('device').topk(_unit(4, seed=1), corpus, 5)[1])


class _Truth:
  """A stand-in for the world's ground truth (mine's summary reads it)."""

  def __init__(self, aesthetic):
    self.scores = aesthetic

  def aesthetic(self, rows):
    return self.scores[rows]

  def relevant(self, query, rows):
    return rows % 3 == int(query[1:]) % 3


def test_mine_with_the_faiss_searcher_writes_the_same_groups_as_the_device_searcher(
    tmp_path, monkeypatch):
  built = _counting_builds(monkeypatch)
  corpus = _unit(3000, d=16)
  ids = np.array([f'img{i}' for i in range(3000)])
  queries, rephrased = [f'q{i}' for i in range(12)], [f'r{i}' for i in range(12)]
  emb = {t: e for t, e in zip(queries + rephrased, _unit(24, d=16, seed=1))}
  aesthetic = np.random.default_rng(2).uniform(size=3000)
  c = mining.default_config()
  c.top_k, c.stride = 80, 2
  written, summaries = [], []
  for name, searcher in (('device', _searcher('device', chunk_size=512)),
                         ('faiss', _searcher('faiss')), ('default', None)):
    result = mining.mine(queries, rephrased, text_embed=lambda t: np.stack([emb[x] for x in t]),
                         corpus=corpus, ids=ids, aesthetic_fn=lambda r: aesthetic[r], c=c,
                         u=4, v=5, truth=_Truth(aesthetic), searcher=searcher)
    assert result.summary['records'] == 12
    path = tmp_path / f'{name}.arrayrecord'
    preference.write_groups(str(path), result.groups)
    written.append(path.read_bytes())
    summaries.append({k: v for k, v in result.summary.items() if k != 'seconds'})
  assert written[0] == written[1] == written[2]
  assert summaries[0] == summaries[1] == summaries[2]
  assert built == [3000]   # mine searched the corpus three times with one index


def test_mine_searches_only_through_its_searcher():
  device, calls = _searcher('device'), []

  class Recording:
    def topk(self, queries, corpus, k):
      calls.append(k)
      return device.topk(queries, corpus, k)

  corpus, aesthetic = _unit(500, d=8), np.linspace(0, 1, 500)
  c = mining.default_config()
  c.top_k, c.stride, c.summary_top = 40, 2, 7
  mining.mine(['q0', 'q1'], ['r0', 'r1'], text_embed=lambda t: _unit(len(t), d=8, seed=len(t)),
              corpus=corpus, ids=np.arange(500), aesthetic_fn=lambda r: aesthetic[r], c=c, u=2,
              v=2, truth=_Truth(aesthetic), searcher=Recording())
  assert calls == [40, 7, 7]   # the candidates, then the first-finding top-n of both queries


def test_the_device_searcher_is_search_topk_with_the_section_keys(monkeypatch):
  seen, signature = [], inspect.signature(search.topk).parameters
  monkeypatch.setattr(search, 'topk', lambda q, corpus, k, **kw: seen.append(kw) or (q, k))
  # The defaults are search.topk's own (what mining passed before the section existed).
  retrieval.make_searcher(retrieval.default_config()).topk('q', 'corpus', 3)
  assert seen.pop() == {key: signature[key].default for key in
                        ('chunk_size', 'query_chunk', 'mesh', 'approx', 'recall_target')}
  c = retrieval.default_config()
  c.chunk_size, c.query_chunk, c.approx, c.recall_target = 4096, 64, True, 0.9
  mesh = object()
  retrieval.make_searcher(c, mesh).topk('q', 'corpus', 3)
  assert seen.pop() == {'chunk_size': 4096, 'query_chunk': 64, 'mesh': mesh, 'approx': True,
                        'recall_target': 0.9}


def test_mine_has_no_search_keys_of_its_own():
  assert not {'chunk_size', 'approx'} & set(mining.default_config())


@pytest.mark.parametrize('key,value,message', [
    ('backend', 'gpu', r"config\.retrieval\.backend='gpu'; expected one of"),
    ('faiss_kind', 'ivf', r"config\.retrieval\.faiss_kind='ivf'; expected one of"),
    ('chunk_size', 0, r'config\.retrieval\.chunk_size=0 must be a positive integer'),
    ('query_chunk', -8, r'config\.retrieval\.query_chunk=-8 must be a positive integer'),
    ('recall_target', 0.0, r'config\.retrieval\.recall_target=0\.0 must be in \(0, 1\]'),
])
def test_validate_refuses_a_bad_key_naming_it(key, value, message):
  c = retrieval.default_config()
  retrieval.validate(c)
  c[key] = value
  with pytest.raises(ValueError, match=message):
    retrieval.validate(c)
  with pytest.raises(ValueError, match=message):
    retrieval.make_searcher(c)


def test_the_faiss_backend_without_faiss_names_the_pip_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'faiss', None)   # `import faiss` raises ImportError
  c = retrieval.default_config()
  retrieval.validate(c)                             # the device backend does not need it
  c.backend = 'faiss'
  with pytest.raises(ValueError, match=r"config\.retrieval\.backend='faiss' needs the faiss "
                                       r'package: pip install aesalign\[faiss\]'):
    retrieval.make_searcher(c)
