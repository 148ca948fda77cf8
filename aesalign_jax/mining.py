"""Mining D_po (PAPER.md, "Building the partially ordered set D_po"), one group per query:

  1. q' = rephrase(q)                            (aesalign_jax.rephrase)
  2. the top K corpus images for q', by the reference model (aesalign_jax.retrieval)
  3. ordered by semantic relevance to the ORIGINAL q (reference similarity to q): q' only
     widens the net; ordering by q' lets groups drift off the subject
  4. u*v of them picked with a stride: positions 0, s, 2s, ... (K >= s*u*v); row i holds
     the i-th run of v consecutive picks, so rows are ordered by semantics
  5. each row sorted by aesthetic score, best first, so columns are ordered by aesthetics
  6. written through input_pipeline.preference (the D_po record), with the reference scores
     of the ORIGINAL query against each image for DPO.

`mine` is pure computation over embeddings; the stage (aesalign_jax.stages) wires the model,
corpus index, rephraser and aesthetic model to it. An optional `truth` (the embedded world)
adds what only a world with known answers can measure: the paper's first finding (top-10
ground-truth aesthetic of rephrased vs original queries), the fraction of mined images that
match their query, and the fraction of preference pairs whose preferred image is truly better.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Optional, Protocol, Sequence

import ml_collections
import numpy as np
from absl import logging

from aesalign_jax import losses, multihost, retrieval
from input_pipeline import preference


def default_config() -> ml_collections.ConfigDict:
  """Config section `mine` (u and v come from config.align: the grid the trainer expects)."""
  c = ml_collections.ConfigDict()
  c.top_k = 200             # K: images retrieved per rephrased query
  c.stride = 4              # s: pick positions 0, s, 2s, ... of the semantic order
  c.corpus_size = 50_000    # the first N rows of the corpus are mined (0 = all of it): the
                            # world's training split is 200k images, a real corpus is usually
                            # used whole
  c.embeddings_dir = ''     # an existing corpus index (retrieval.index) of the reference model,
                            # ids = corpus record ids; '' = build one under workdir/mine/index
  # Mining queries: a text file, one query a line, or JSON Lines ({"query": ...} a line; a
  # .jsonl / .json file); '' = the embedded world's mining queries.
  c.queries_path = ''
  c.max_queries = -1        # -1: every mining query; N: the first N
  c.summary_top = 10        # top-n of the first-finding measurement (world only)
  return c


def load_queries(path: str) -> list[str]:
  """Queries from a text file (one a line) or, for .jsonl / .json, JSON Lines {"query": ...}.

  Blank lines are ignored; malformed or empty lines and repeated queries are skipped, counted
  and named in one warning (file:line). Raises ValueError naming the file (and the config key
  mine.queries_path) when no query is left.
  """
  as_json = path.lower().endswith(('.jsonl', '.json'))
  queries, seen, skipped = [], set(), []
  with open(path, encoding='utf-8-sig') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{line_number}'
      text = line
      if as_json:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          skipped.append(f'{where}: malformed JSON ({e})')
          continue
        text = obj.get('query') if isinstance(obj, dict) else None
        if not isinstance(text, str):
          skipped.append(f'{where}: no string "query" field')
          continue
      text = ' '.join(text.split())
      if not text:
        skipped.append(f'{where}: empty query')
      elif text in seen:
        skipped.append(f'{where}: repeats the query {text!r}')
      else:
        seen.add(text)
        queries.append(text)
  if skipped:
    logging.warning('%s: skipped %d lines:\n  %s%s', path, len(skipped),
                    '\n  '.join(skipped[:20]), '\n  ...' if len(skipped) > 20 else '')
  if not queries:
    raise ValueError(f'config.mine.queries_path={path!r} holds no query ({len(skipped)} lines '
                     'skipped)')
  return queries


class RowScores:
  """Wraps aesthetic_fn (corpus rows -> scores) so each row is scored once: the candidate
  lists of different queries overlap, and scoring a row may mean decoding and embedding it."""

  def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
    self.fn, self.known = fn, {}

  def __call__(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    todo = np.asarray([r for r in np.unique(rows) if int(r) not in self.known], np.int64)
    if len(todo):
      self.known.update(zip(todo.tolist(), np.asarray(self.fn(todo), np.float64).tolist()))
    return np.asarray([self.known[int(r)] for r in rows], np.float64)

  def score_shared(self, row_lists: Sequence[np.ndarray], start: int, stop: int) -> None:
    """Scores, split over the processes, the rows that calling self on row_lists[0],
    row_lists[1], ... in turn would score, in the same batches (the new rows of each list):
    this process the batches of lists [start, stop), and every process learns every score.
    A score can depend on its batch (a jitted model's numerics do), so the same batches give
    every process count the bits of one process."""
    if multihost.count() == 1:
      return   # calling self in order scores exactly these batches
    seen, batches = set(self.known), []
    for rows in row_lists:
      todo = [int(r) for r in np.unique(np.asarray(rows, np.int64)) if int(r) not in seen]
      seen.update(todo)
      batches.append(np.asarray(todo, np.int64))
    mine = [b for b in batches[start:stop] if len(b)]
    rows = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    scores = (np.concatenate([np.asarray(self.fn(b), np.float64) for b in mine]) if mine
              else np.zeros(0, np.float64))
    for r, s in zip(multihost.allgather_arrays(rows), multihost.allgather_arrays(scores)):
      self.known.update(zip(r.tolist(), s.tolist()))


def validate(c, u: int, v: int) -> None:
  if c.stride <= 0:
    raise ValueError(f'config.mine.stride={c.stride} must be > 0')
  if c.top_k < c.stride * u * v:
    raise ValueError(f'config.mine.top_k={c.top_k} < config.mine.stride ({c.stride}) * '
                     f'config.align.u ({u}) * config.align.v ({v}) = {c.stride * u * v}: '
                     'the stride pick needs that many retrieved images')


class Truth(Protocol):
  """What a world with known answers can tell about corpus rows (for the summary only)."""

  def aesthetic(self, rows: np.ndarray) -> np.ndarray: ...
  def relevant(self, query: str, rows: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass
class MiningResult:
  groups: list
  summary: dict


def grid_pick(order: np.ndarray, aesthetic: np.ndarray, u: int, v: int, stride: int):
  """Positions into the candidate list: stride-picked from the semantic order, then each of
  the u rows (runs of v picks) sorted by aesthetic score, best first. [u * v], grid order."""
  picks = order[:stride * u * v:stride].reshape(u, v)
  within = np.argsort(-aesthetic[picks], axis=1, kind='stable')
  return np.take_along_axis(picks, within, axis=1).reshape(-1)


def mine(queries: Sequence[str], rephrased: Sequence[str], *, text_embed: Callable,
         corpus: np.ndarray, ids: np.ndarray, aesthetic_fn: Callable[[np.ndarray], np.ndarray],
         c, u: int, v: int, truth: Optional[Truth] = None,
         searcher: Optional[retrieval.Searcher] = None) -> MiningResult:
  """Groups for `queries` (with their rephrasings) against a corpus index.

  text_embed: list[str] -> unit vectors [Q, D] (the reference model);
  corpus: [N, D] reference image embeddings, ids: [N] corpus ids;
  aesthetic_fn: corpus rows [M] -> aesthetic scores [M] (higher = better); NaN for a row it
    cannot score (e.g. an image that fails to decode): such rows leave the candidates and are
    counted in the summary ('unscorable_images').
  searcher: the top-K search (retrieval.make_searcher(config.retrieval, mesh)); None = the
    device searcher of retrieval.default_config() on the default device.

  Several processes: every process calls mine with every query (and its rephrasing); each
  builds the groups of its block of queries (multihost.share: their aesthetic scoring and
  reads of corpus rows), and the groups come back gathered, in query order, to every process:
  the result does not depend on the number of processes. The searcher may split its searches
  over the processes (make_searcher(..., across_processes=True)): every process searches.
  """
  validate(c, u, v)
  if searcher is None:
    searcher = retrieval.make_searcher(retrieval.default_config())
  start = time.time()
  need = c.stride * u * v
  q_emb = text_embed(list(queries))
  r_emb = text_embed(list(rephrased))
  k = min(c.top_k, len(corpus))
  _, cand = searcher.topk(r_emb, corpus, k)
  candidates = [np.unique(rows[(rows >= 0) & (rows < len(corpus))])   # approximate top-K
                for rows in cand]                                      # may repeat a row
  first, last = multihost.share(len(queries))   # this process's queries
  if isinstance(aesthetic_fn, RowScores):
    aesthetic_fn.score_shared(candidates, first, last)
  groups, skipped, unscorable = [], [], set()
  for qi in range(first, last):
    query, rows = queries[qi], candidates[qi]
    aesthetic = np.asarray(aesthetic_fn(rows), np.float64)
    scored = np.isfinite(aesthetic)
    unscorable.update(rows[~scored].tolist())
    rows, aesthetic = rows[scored], aesthetic[scored]
    if len(rows) < need:
      skipped.append({'query': query, 'reason': f'{len(rows)} results < {need} needed'})
      continue
    semantic = corpus[rows].astype(np.float32) @ q_emb[qi]   # relevance to the ORIGINAL query
    order = np.argsort(-semantic, kind='stable')
    grid = grid_pick(order, aesthetic, u, v, c.stride)
    meta = {'corpus_rows': rows[grid].tolist()}
    if truth is not None:
      meta['gt_aesthetic'] = truth.aesthetic(rows[grid]).tolist()
      meta['gt_relevant'] = truth.relevant(query, rows[grid]).astype(int).tolist()
    groups.append(preference.PreferenceGroup(
        query=query, rephrased_query=rephrased[qi], image_ids=[str(i) for i in ids[rows[grid]]],
        aesthetic_scores=aesthetic[grid].tolist(),
        semantic_scores=semantic[grid].astype(np.float64).tolist(),
        ref_scores=semantic[grid].astype(np.float64).tolist(), u=u, v=v, stride=c.stride,
        meta=meta))
  if multihost.count() > 1:   # every process's groups, in query order
    groups = [preference.as_group(g) for g in multihost.concat_shares(
        [g.to_dict() for g in groups])]
    skipped = multihost.concat_shares(skipped)
    unscorable = set(multihost.concat_shares(sorted(unscorable)))
  if skipped:
    logging.warning('mining: %d queries skipped (too few results): %s', len(skipped),
                    '; '.join(s['query'] for s in skipped[:10]))
  summary = {'queries': len(queries), 'records': len(groups), 'skipped': skipped,
             'pairs_per_record': int(losses.pair_mask(u, v, 'product').sum()),
             'pairs': int(losses.pair_mask(u, v, 'product').sum()) * len(groups),
             'top_k': k, 'stride': c.stride, 'u': u, 'v': v,
             'unscorable_images': len(unscorable)}
  if unscorable:
    logging.warning('mining: %d retrieved images could not be scored and were left out',
                    len(unscorable))
  if truth is not None:
    summary.update(_world_measures(queries, q_emb, r_emb, groups, corpus, c, u, v, searcher,
                                   truth))
  summary['seconds'] = round(time.time() - start, 2)
  return MiningResult(groups, summary)


def _world_measures(queries, q_emb, r_emb, groups, corpus, c, u, v, searcher, truth) -> dict:
  """The first finding, on-topic rate and pair correctness, from the world's ground truth."""
  n = min(c.summary_top, len(corpus))
  _, top_plain = searcher.topk(q_emb, corpus, n)
  _, top_reph = searcher.topk(r_emb, corpus, n)
  mean_gt = lambda tops: float(np.mean([truth.aesthetic(t).mean() for t in tops]))
  rel = lambda tops: float(np.mean([truth.relevant(q, t).mean() for q, t in zip(queries, tops)]))
  mask = losses.pair_mask(u, v, 'product')
  right = total = 0
  for g in groups:
    gt = np.asarray(g.meta['gt_aesthetic'])
    better = gt[:, None] > gt[None, :]
    right += int((better & mask).sum())
    total += int(mask.sum())
  on_topic = [np.mean(g.meta['gt_relevant']) for g in groups]
  row0_on_topic = [np.mean(g.meta['gt_relevant'][:v]) for g in groups]
  return {
      f'top{n}_gt_aesthetic_original': mean_gt(top_plain),
      f'top{n}_gt_aesthetic_rephrased': mean_gt(top_reph),
      f'top{n}_relevance_original': rel(top_plain),
      f'top{n}_relevance_rephrased': rel(top_reph),
      'mined_on_topic_fraction': float(np.mean(on_topic)) if groups else float('nan'),
      'mined_row0_on_topic_fraction': float(np.mean(row0_on_topic)) if groups else float('nan'),
      'pairs_preferred_truly_more_aesthetic': right / total if total else float('nan'),
  }
