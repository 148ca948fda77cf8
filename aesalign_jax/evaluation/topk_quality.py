"""Quality of each system's top-k for held-out queries: aesthetics, relevance, diversity.

    ev = TopKQualityEvaluator(config.evals.topk_quality, world=world, scorers=scorers)
    metrics = ev.run(system)        # {'aesthetic/ground_truth': .., 'precision': .., ...}
    ev.results[system.name]         # TopK: per-query rows, ids, scores (retrieval grids)

For each query the system searches the corpus with its query text (the query itself, or its
rephrasing for "PT + rephrasing") and keeps the k best images by cosine similarity (exact
top-k on device, aesalign_jax.retrieval.search). Then, averaged over queries and the k images:
- aesthetic/<name>: the mean score of every available scorer. A scorer is a callable
  corpus rows int [R] -> scores [R] (low-level measures on pixels, an IAP head on fixed
  reference embeddings, the world's ground truth; see world_scorers). Each scorer sees each
  system's retrieved rows once.
- precision: the fraction of the top k relevant to the ORIGINAL query (the world knows;
  elsewhere give a relevance function), so rephrasing that drifts off the subject shows.
- diversity: mean pairwise cosine distance (1 - cos) among the top-k embeddings, per query:
  0 when all k are the same image, 1 when they are mutually orthogonal. Measured in a fixed
  embedding space when `reference_embeddings` are given (comparable across models), else in
  the system's own.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from aesalign_jax.aesthetics import lowlevel as lowlevel_lib
from aesalign_jax.evaluation import common
from aesalign_jax.retrieval import search

RowScorer = Callable[[np.ndarray], np.ndarray]        # corpus rows [R] -> scores [R]
Relevance = Callable[[int, np.ndarray], np.ndarray]   # (query position, rows [k]) -> bool [k]


def default_config() -> ml_collections.ConfigDict:
  """The topk_quality section of config.evals (type 'topk_quality')."""
  c = ml_collections.ConfigDict()
  c.type = 'topk_quality'
  c.k = 10                       # images kept per query
  # 'world': corpus = the world's `split`, queries = its held-out eval queries; 'corpus':
  # the context's corpus_images (rows -> uint8) and corpus_size, and the context's queries
  # (strings) or else those of `queries_path` (a real run's held-out queries).
  c.source = 'world'
  c.split = 'eval'
  c.max_queries = 0              # first N queries only (0 = all)
  c.batch_size = 256             # images per embedding call
  c.chunk_size = 65_536          # corpus rows per top-k step on device
  # Scorers to report, by name among those given (context `scorers`, or the world's default
  # ground truth and low-level ones); () = all of them.
  c.scorers = ()
  return c


@dataclasses.dataclass
class TopK:
  """One system's retrieved top-k for each query (what the report's grids draw)."""
  system: str
  queries: list[str]                 # the original queries
  query_texts: list[str]             # what the system searched with (rephrased or not)
  rows: np.ndarray                   # int64 [Q, k] corpus rows, best first
  similarity: np.ndarray             # float32 [Q, k] cosine similarity to the query text
  ids: Optional[np.ndarray] = None   # [Q, k] corpus ids (world indices), if known
  aesthetic: dict = dataclasses.field(default_factory=dict)   # scorer name -> [Q, k]
  relevant: Optional[np.ndarray] = None                       # bool [Q, k]

  def to_json(self) -> dict:
    """JSON-ready (lists), for report.json."""
    out = dict(system=self.system, queries=self.queries, query_texts=self.query_texts,
               rows=self.rows.tolist(), similarity=np.round(self.similarity, 6).tolist(),
               aesthetic={k: np.round(v, 6).tolist() for k, v in self.aesthetic.items()})
    if self.ids is not None:
      out['ids'] = self.ids.tolist()
    if self.relevant is not None:
      out['relevant'] = self.relevant.astype(int).tolist()
    return out


def pairwise_diversity(topk_emb: np.ndarray) -> np.ndarray:
  """Per query, the mean cosine distance 1 - cos(a, b) over the k(k-1)/2 pairs of its
  top-k embeddings [Q, k, D]; [Q] float64 (NaN when k < 2)."""
  e = np.asarray(topk_emb, np.float64)
  e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  q, k = e.shape[:2]
  if k < 2:
    return np.full(q, np.nan)
  cos = np.einsum('qid,qjd->qij', e, e)
  upper = np.triu(np.ones((k, k), bool), 1)
  return 1.0 - cos[:, upper].mean(axis=1)


def score_rows(scorer: RowScorer, rows: np.ndarray) -> np.ndarray:
  """Scores [Q, k] of corpus rows [Q, k], calling `scorer` once on the distinct rows."""
  unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
  scores = np.asarray(scorer(unique), np.float64)
  if scores.shape != unique.shape:
    raise ValueError(f'scorer returned {scores.shape} scores for {len(unique)} rows')
  return scores[inverse].reshape(rows.shape)


def topk_quality(topk_emb: np.ndarray, aesthetic: Mapping[str, np.ndarray],
                 relevant: Optional[np.ndarray] = None) -> dict[str, float]:
  """The metrics of one system's top-k, from arrays (see the module docstring).

  topk_emb: [Q, k, D] embeddings of the retrieved images (for diversity);
  aesthetic: scorer name -> scores [Q, k]; relevant: bool [Q, k] or None.
  """
  # NaN: an image that failed to load when scored (a real corpus); left out of the mean.
  out = {f'aesthetic/{name}': float(np.nanmean(s) if np.isnan(s).any() else np.mean(s))
         for name, s in aesthetic.items()}
  if relevant is not None:
    out['precision'] = float(np.mean(relevant))
  out['diversity'] = float(np.nanmean(pairwise_diversity(topk_emb))) if topk_emb.shape[1] > 1 \
      else float('nan')
  return out


def retrieve(system: common.System, queries: Sequence[str], corpus_emb: np.ndarray, k: int, *,
             chunk_size: int = 65_536, mesh=None) -> TopK:
  """The system's top-k corpus rows for each query (searching with its query texts)."""
  texts = system.query_texts(queries)
  sim, rows = search.topk(system.embed_texts(texts), corpus_emb, min(k, len(corpus_emb)),
                          chunk_size=chunk_size, mesh=mesh)
  return TopK(system=system.name, queries=list(queries), query_texts=texts, rows=rows,
              similarity=sim)


def evaluate_topk(system: common.System, queries: Sequence[str], corpus_emb: np.ndarray, *,
                  k: int = 10, scorers: Mapping[str, RowScorer] = (),
                  relevance: Optional[Relevance] = None, ids: Optional[np.ndarray] = None,
                  diversity_emb: Optional[np.ndarray] = None, chunk_size: int = 65_536,
                  mesh=None) -> tuple[dict[str, float], TopK]:
  """(metrics, TopK) of one system: retrieve, score with every scorer, relevance, diversity.

  corpus_emb: [N, D] the system's embeddings of the corpus (what it searches);
  scorers: name -> RowScorer on corpus rows; relevance(query position, rows) -> bool [k];
  ids: [N] corpus ids to attach to the result; diversity_emb: [N, D'] a fixed space for
  diversity (default: corpus_emb).
  """
  top = retrieve(system, queries, corpus_emb, k, chunk_size=chunk_size, mesh=mesh)
  top.aesthetic = {name: score_rows(fn, top.rows) for name, fn in dict(scorers).items()}
  if relevance is not None:
    top.relevant = np.stack([np.asarray(relevance(qi, r), bool) for qi, r in enumerate(top.rows)])
  if ids is not None:
    top.ids = np.asarray(ids)[top.rows]
  space = corpus_emb if diversity_emb is None else diversity_emb
  return topk_quality(np.asarray(space)[top.rows], top.aesthetic, top.relevant), top


def world_scorers(world, corpus_indices: np.ndarray, *, lowlevel=True,
                  iap: Optional[RowScorer] = None) -> dict[str, RowScorer]:
  """The world's scorers on corpus rows (rows index `corpus_indices`, world indices):
  'ground_truth' (the world's aesthetic), 'lowlevel' (LowLevelScorer on the rendered pixels,
  or the Scorer given as `lowlevel`; False = none) and 'iap' if given (e.g.
  `lambda rows: iap.apply(params, reference_corpus_emb[rows])`)."""
  idx = np.asarray(corpus_indices, np.int64)
  out: dict[str, RowScorer] = {'ground_truth': lambda rows: world.aesthetic(idx[rows])}
  if lowlevel is not False:
    if lowlevel is True:
      lowlevel = lowlevel_lib.LowLevelScorer()
    scorer = lowlevel
    out[scorer.name if getattr(scorer, 'name', '') else 'lowlevel'] = (
        lambda rows: scorer.score(world.render_batch(idx[rows])))
  if iap is not None:
    out['iap'] = iap
  return out


@common.register('topk_quality')
class TopKQualityEvaluator(common.Evaluator):
  """Top-k aesthetics / precision / diversity per system (config: default_config).

  Context: `world` (source 'world') or `corpus_images`, `corpus_size` and `queries` (else
  the section's queries_path is read) (source 'corpus'); optional `scorers` (name ->
  RowScorer on this evaluator's corpus rows; default in the world: world_scorers),
  `relevance`, `corpus_ids` and `corpus_embeddings` (system name -> [N, D], that system's
  embeddings of the corpus rows when already computed, e.g. a stored index; others embed
  the corpus themselves) (source 'corpus'), `reference_embeddings` (fixed space for
  diversity), `mesh`. `results` keeps each system's TopK by system name.
  """

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    self.results: dict[str, TopK] = {}

  def _corpus(self):
    """(queries, load_images(rows), corpus size, ids, relevance, default scorers, cache key)."""
    c = self.config
    if c.source == 'world':
      world = self.need('world')
      idx = world.split_indices(c.split)
      queries = list(world.eval_queries)
      if c.max_queries:
        queries = queries[:c.max_queries]
      relevance = lambda qi, rows: world.is_relevant(queries[qi], idx[rows])
      return ([q.text for q in queries], lambda rows: world.render_batch(idx[rows]), len(idx),
              idx, relevance, lambda: world_scorers(world, idx), f'world:{c.split}:{len(idx)}')
    if c.source == 'corpus':
      queries = [str(q) for q in self._corpus_queries()]
      if c.max_queries:
        queries = queries[:c.max_queries]
      n = int(self.need('corpus_size'))
      return (queries, self.need('corpus_images'), n, self.context.get('corpus_ids'),
              self.context.get('relevance'), dict, f'corpus:{n}')
    raise ValueError(f"evals.{self.name}.source={c.source!r}: expected 'world' or 'corpus'")

  def _corpus_queries(self) -> list:
    """The context's queries, else those of the section's queries_path (text, one a line,
    or JSON Lines {"query": ...}: the mine stage's reader)."""
    if self.context.get('queries') is not None:
      return list(self.context['queries'])
    path = self.config.get('queries_path', '')
    if not path:
      raise ValueError(f"evals.{self.name}: source 'corpus' needs queries_path (the held-out "
                       'queries file), or queries given to make_evaluators')
    if getattr(self, '_queries', None) is None:
      from aesalign_jax import mining  # pylint: disable=g-import-not-at-top
      try:
        self._queries = mining.load_queries(path)
      except ValueError as e:
        raise ValueError(f'config.evals.{self.name}.queries_path={path!r} holds no query') from e
    return self._queries

  def run(self, system: common.System) -> dict[str, float]:
    c = self.config
    queries, load, n, ids, relevance, default_scorers, key = self._corpus()
    scorers = self.context.get('scorers')
    scorers = dict(default_scorers() if scorers is None else scorers)
    if c.scorers:
      missing = sorted(set(c.scorers) - set(scorers))
      if missing:
        raise ValueError(f'evals.{self.name}.scorers names {missing}; available: '
                         f'{sorted(scorers)}')
      scorers = {name: scorers[name] for name in c.scorers}
    given = (self.context.get('corpus_embeddings') or {}) if c.source == 'corpus' else {}
    if system.name in given:
      corpus_emb = np.asarray(given[system.name], np.float32)
      if len(corpus_emb) != n:
        raise ValueError(f'evals.{self.name}: corpus_embeddings[{system.name!r}] has '
                         f'{len(corpus_emb)} rows for a corpus of {n}')
    else:
      corpus_emb = self.cache.get(system, key, lambda: np.concatenate([
          system.embed_images(load(np.arange(s, min(n, s + c.batch_size))))
          for s in range(0, n, c.batch_size)]))
    metrics, top = evaluate_topk(
        system, queries, corpus_emb, k=c.k, scorers=scorers, relevance=relevance, ids=ids,
        diversity_emb=self.context.get('reference_embeddings'), chunk_size=c.chunk_size,
        mesh=self.context.get('mesh'))
    self.results[system.name] = top
    return metrics
