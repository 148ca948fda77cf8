"""Quality of each system's top-k for held-out queries: aesthetics, relevance, diversity.

    ev = TopKQualityEvaluator(config.evals.topk_quality, corpus=corpus, queries=queries,
                              scorers=scorers)
    metrics = ev.run(system)        # {'aesthetic/ground_truth': .., 'precision': .., ...}
    ev.results[system.name]         # TopK: per-query rows, ids, scores (retrieval grids)

For each query the system searches the corpus with its query text (the query itself, or its
rephrasing for "PT + rephrasing") and keeps the k best images by cosine similarity (the
searcher config.retrieval chooses: on device, or FAISS). Then, averaged over queries and the
k images:
- aesthetic/<name>: the mean score of every available scorer. A scorer is a callable
  corpus rows int [R] -> scores [R] (low-level measures on pixels, an IAP head on fixed
  reference embeddings, a corpus's ground truth). Each scorer sees each
  system's retrieved rows once.
- precision: the fraction of the top k relevant to the ORIGINAL query (a corpus with ground
  truth knows; elsewhere there is no precision), so rephrasing that drifts off topic shows.
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

from aesalign_jax.evaluation import common
from aesalign_jax import retrieval

RowScorer = Callable[[np.ndarray], np.ndarray]        # corpus rows [R] -> scores [R]
Relevance = Callable[[int, np.ndarray], np.ndarray]   # (query position, rows [k]) -> bool [k]


def default_config() -> ml_collections.ConfigDict:
  """The topk_quality section of config.evals (type 'topk_quality')."""
  c = ml_collections.ConfigDict()
  c.type = 'topk_quality'
  c.k = 10                       # images kept per query
  # The run's evaluation corpus (make_evaluators' `corpus`) is searched; the queries are the
  # corpus's own held-out ones (make_evaluators' `queries`; relevance from its ground truth)
  # unless queries_path names a file (text, one a line, or JSON Lines {"query": ...}).
  c.queries_path = ''
  c.max_queries = 0              # first N queries only (0 = all)
  c.batch_size = 256             # images per embedding call
  # Scorers to report, by name among those given (make_evaluators' `scorers`); () = all.
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
  ids: Optional[np.ndarray] = None   # [Q, k] corpus ids, if known
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
             searcher=None) -> TopK:
  """The system's top-k corpus rows for each query (searching with its query texts).
  searcher: retrieval.make_searcher(config.retrieval, mesh); None = the device default."""
  if searcher is None:
    searcher = retrieval.make_searcher(retrieval.default_config())
  texts = system.query_texts(queries)
  sim, rows = searcher.topk(system.embed_texts(texts), corpus_emb, min(k, len(corpus_emb)))
  return TopK(system=system.name, queries=list(queries), query_texts=texts, rows=rows,
              similarity=sim)


def evaluate_topk(system: common.System, queries: Sequence[str], corpus_emb: np.ndarray, *,
                  k: int = 10, scorers: Mapping[str, RowScorer] = (),
                  relevance: Optional[Relevance] = None, ids: Optional[np.ndarray] = None,
                  diversity_emb: Optional[np.ndarray] = None,
                  searcher=None) -> tuple[dict[str, float], TopK]:
  """(metrics, TopK) of one system: retrieve, score with every scorer, relevance, diversity.

  corpus_emb: [N, D] the system's embeddings of the corpus (what it searches);
  scorers: name -> RowScorer on corpus rows; relevance(query position, rows) -> bool [k];
  ids: [N] corpus ids to attach to the result; diversity_emb: [N, D'] a fixed space for
  diversity (default: corpus_emb).
  """
  top = retrieve(system, queries, corpus_emb, k, searcher=searcher)
  top.aesthetic = {name: score_rows(fn, top.rows) for name, fn in dict(scorers).items()}
  if relevance is not None:
    top.relevant = np.stack([np.asarray(relevance(qi, r), bool) for qi, r in enumerate(top.rows)])
  if ids is not None:
    top.ids = np.asarray(ids)[top.rows]
  space = corpus_emb if diversity_emb is None else diversity_emb
  return topk_quality(np.asarray(space)[top.rows], top.aesthetic, top.relevant), top


@common.register('topk_quality')
class TopKQualityEvaluator(common.Evaluator):
  """Top-k aesthetics / precision / diversity per system (config: default_config).

  Context: `corpus` (input_pipeline.corpus.Corpus: images by row, optional ground truth),
  `queries` (its held-out queries) unless the section's queries_path is set, `scorers` (name
  -> RowScorer on corpus rows), optional `corpus_embeddings` (system name -> [N, D], that
  system's embeddings of the rows when already computed, e.g. a stored index; others embed
  the corpus themselves), `reference_embeddings` (fixed space for diversity), `searcher`
  (retrieval.make_searcher; default: on the default device).
  Relevance (precision) comes from the corpus's ground truth, for its own queries.
  `results` keeps each system's TopK by system name.
  """

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    self.results: dict[str, TopK] = {}
    self._queries = None

  def queries(self) -> tuple[list[str], Optional[Relevance]]:
    """(queries, relevance or None): the section's file, else the corpus's own queries."""
    c, corpus = self.config, self.need('corpus')
    if self._queries is None:
      path = c.get('queries_path', '')
      if path:
        from aesalign_jax import mining  # pylint: disable=g-import-not-at-top
        try:
          self._queries = mining.load_queries(path)
        except ValueError as e:
          raise ValueError(f'config.evals.{self.name}.queries_path={path!r} holds no query') from e
      else:
        self._queries = [str(q) for q in self.context.get('queries') or ()]
        if not self._queries:
          raise ValueError(f'evals.{self.name}: the corpus has no held-out queries of its own; '
                           'set queries_path (the held-out queries file)')
      if c.max_queries:
        self._queries = self._queries[:c.max_queries]
    queries = self._queries
    truth = None if c.get('queries_path', '') else corpus.truth
    relevance = None if truth is None else (lambda qi, rows: truth.relevant(queries[qi], rows))
    return queries, relevance

  def run(self, system: common.System) -> dict[str, float]:
    c, corpus = self.config, self.need('corpus')
    queries, relevance = self.queries()
    scorers = dict(self.context.get('scorers') or {})
    if c.scorers:
      missing = sorted(set(c.scorers) - set(scorers))
      if missing:
        raise ValueError(f'evals.{self.name}.scorers names {missing}; available: '
                         f'{sorted(scorers)}')
      scorers = {name: scorers[name] for name in c.scorers}
    n = len(corpus)
    given = self.context.get('corpus_embeddings') or {}
    if system.name in given:
      corpus_emb = given[system.name]   # an on-disk index (retrieval.IndexRows) stays there
      if not isinstance(corpus_emb, retrieval.IndexRows):
        corpus_emb = np.asarray(corpus_emb, np.float32)
      if len(corpus_emb) != n:
        raise ValueError(f'evals.{self.name}: corpus_embeddings[{system.name!r}] has '
                         f'{len(corpus_emb)} rows for a corpus of {n}')
    else:
      corpus_emb = self.cache.get(system, corpus.name, lambda: common.embed_chunks(
          system, n, c.batch_size, lambda rows: corpus.images(rows)[0]))
    metrics, top = evaluate_topk(
        system, queries, corpus_emb, k=c.k, scorers=scorers, relevance=relevance,
        ids=corpus.ids, diversity_emb=self.context.get('reference_embeddings'),
        searcher=self.context.get('searcher'))
    self.results[system.name] = top
    return metrics
