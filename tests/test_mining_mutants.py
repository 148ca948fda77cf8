"""Mining tests that kill the survivors of the mutation run (benchmarks/mutation.py): the row
score cache, the config boundaries, the candidates an approximate search returns, and the
world summary computed from a known truth, without pretraining a model."""

import numpy as np
import pytest

from aesalign_jax import losses, mining


def _config(**kw):
  c = mining.default_config()
  c.update(kw)
  return c


def _unit_rows(n, d=6, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


class ExactSearcher:
  """Exact top-k by inner product in numpy (rows best first, ties by row)."""

  def topk(self, queries, corpus, k):
    scores = np.asarray(queries) @ np.asarray(corpus).T
    rows = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


class FixedSearcher:
  """The same candidate rows for every query, as an approximate index may return them."""

  def __init__(self, rows):
    self.rows = np.asarray(rows)

  def topk(self, queries, corpus, k):
    rows = np.tile(self.rows, (len(queries), 1))
    return np.zeros(rows.shape, np.float32), rows


def test_row_scores_call_the_scorer_once_per_row_and_keep_the_order():
  calls = []

  def score(rows):
    calls.append(rows.tolist())
    return rows * 0.5

  cached = mining.RowScores(score)
  np.testing.assert_array_equal(cached(np.array([3, 1, 3])), [1.5, 0.5, 1.5])
  np.testing.assert_array_equal(cached(np.array([1, 2])), [0.5, 1.0])
  assert calls == [[1, 3], [2]]


def test_validate_accepts_the_smallest_valid_settings_and_refuses_stride_zero():
  mining.validate(_config(stride=1, top_k=12), u=3, v=4)   # top_k = stride*u*v is enough
  with pytest.raises(ValueError, match=r'config\.mine\.stride=0 must be > 0'):
    mining.validate(_config(stride=0, top_k=12), u=3, v=4)
  with pytest.raises(ValueError, match=r'config\.mine\.top_k=11 <'):
    mining.validate(_config(stride=1, top_k=11), u=3, v=4)


def test_padding_rows_and_unscorable_images_leave_the_candidates():
  """Candidates -1 (padding) and N (past the end) are dropped, a repeated row counts once,
  NaN-scored rows are counted as unscorable; exactly u*v rows are left: one record."""
  corpus = _unit_rows(10)
  aesthetic = np.linspace(0.9, 0.0, 10)
  aesthetic[[4, 5]] = np.nan
  result = mining.mine(['q'], ['q'], text_embed=lambda texts: _unit_rows(1, seed=1),
                       corpus=corpus, ids=np.arange(10).astype(str),
                       aesthetic_fn=lambda rows: aesthetic[rows],
                       c=_config(top_k=8, stride=1), u=2, v=2,
                       searcher=FixedSearcher([-1, 10, 0, 1, 2, 3, 3, 4, 5]))
  summary = result.summary
  assert (summary['records'], summary['skipped'], summary['unscorable_images']) == (1, [], 2)
  assert sorted(result.groups[0].image_ids) == ['0', '1', '2', '3']
  assert 0.0 <= summary['seconds'] < 60.0


class ToyTruth:
  """Known ground truth: an aesthetic per corpus row (with ties) and relevant rows per query."""

  def __init__(self, gt, relevant):
    self.gt, self.on_topic = gt, relevant

  def aesthetic(self, rows):
    return self.gt[np.asarray(rows)]

  def relevant(self, query, rows):
    return np.isin(rows, self.on_topic[query])


def test_world_summary_follows_its_definitions_on_a_known_truth():
  n, u, v, top = 60, 2, 3, 5
  corpus = _unit_rows(n, seed=2)
  queries, rephrased = ['q0', 'q1', 'q2'], ['r0', 'r1', 'r2']
  table = dict(zip(queries + rephrased, _unit_rows(6, seed=3)))
  text_embed = lambda texts: np.stack([table[t] for t in texts])
  gt = np.round(np.random.default_rng(4).uniform(size=n), 1)   # coarse: ties in many pairs
  truth = ToyTruth(gt, {q: np.arange(i, n, 3) for i, q in enumerate(queries)})
  scores = np.random.default_rng(5).uniform(size=n)
  result = mining.mine(queries, rephrased, text_embed=text_embed, corpus=corpus,
                       ids=np.arange(n).astype(str), aesthetic_fn=lambda rows: scores[rows],
                       c=_config(top_k=20, stride=2, summary_top=top), u=u, v=v, truth=truth,
                       searcher=ExactSearcher())
  summary = result.summary
  assert summary['records'] == 3
  right = total = ties = 0
  for g in result.groups:
    truth_of_group = gt[g.meta['corpus_rows']]
    for k, l in np.argwhere(losses.pair_mask(u, v, 'product')):
      right += truth_of_group[k] > truth_of_group[l]
      ties += truth_of_group[k] == truth_of_group[l]
      total += 1
  assert ties > 0   # a tie is not a pair whose preferred image is truly better
  assert summary['pairs_preferred_truly_more_aesthetic'] == pytest.approx(right / total)
  on_topic = [np.mean(truth.relevant(g.query, g.meta['corpus_rows'])) for g in result.groups]
  row0 = [np.mean(truth.relevant(g.query, g.meta['corpus_rows'][:v])) for g in result.groups]
  assert summary['mined_on_topic_fraction'] == pytest.approx(np.mean(on_topic))
  assert summary['mined_row0_on_topic_fraction'] == pytest.approx(np.mean(row0))
  for which, texts in (('original', queries), ('rephrased', rephrased)):
    _, tops = ExactSearcher().topk(text_embed(texts), corpus, top)
    assert summary[f'top{top}_gt_aesthetic_{which}'] == pytest.approx(
        np.mean([gt[t].mean() for t in tops]))
    assert summary[f'top{top}_relevance_{which}'] == pytest.approx(
        np.mean([truth.relevant(q, t).mean() for q, t in zip(queries, tops)]))
