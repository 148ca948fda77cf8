"""System-level judge: win / similar / lose between two retrieval systems (PAPER.md protocol,
in judge_protocol.py: two calls per query with the order swapped, failed calls excluded and
counted).

Judges (`Judge` protocol: compare(query, group_a, group_b) -> {aspect: 'A'|'B'|'similar'} or
None for a failed call):
- WorldJudge: the embedded world's ground truth (relevance, aesthetic);
- ScorerJudge: any aesthetic and semantic scoring functions over groups;
- OpenAIJudge (judge_openai.py): an LMM behind an OpenAI-compatible chat endpoint.

Usage:
  judge = make_judge(config.evals.judge, world=world)
  result = judge_systems(judge, queries, tops_1, tops_2)
  result["rates"]["aesthetic"]["win"], result["failures"], result["per_query"][0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from aesalign_jax.evaluation.hpir import ASPECTS
# The protocol, importable from here too (judge_lib.judge_systems, judge.Group...).
from aesalign_jax.evaluation.judge_protocol import (  # noqa: F401
    CHOICES, OUTCOMES, Group, Judge, as_group, groups_from_rows, judge_systems, outcome,
    preferred_system, query_text)

__all__ = ["ASPECTS", "CHOICES", "Group", "Judge", "KINDS", "OUTCOMES", "ScorerJudge",
           "WorldJudge", "as_group", "choose", "default_config", "groups_from_rows",
           "judge_systems", "make_judge", "outcome", "preferred_system", "query_text",
           "scorer_aesthetic_fn"]

KINDS = ("world", "scorer", "openai")
_TOLERANCE = 1e-9   # float rounding allowed when a difference is compared with a margin


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the `evals.judge` config section."""
  c = ml_collections.ConfigDict()
  # Which judge: world (the embedded world's ground truth) | scorer (an aesthetic and a
  # semantic scorer) | openai (an LMM behind an OpenAI-compatible chat endpoint with images).
  c.kind = "world"
  # Images of each system's top list the judge compares (read by the evaluation driver).
  c.top_k = 10
  # world, scorer: a group difference within the margin (inclusive) is 'similar'. Accuracy is
  # a fraction of relevant images (world; one image of 10 = 0.1), so 0 means any difference
  # counts; the world's aesthetic is in [0, 1] with a spread of about 0.12 over images.
  c.accuracy_margin = 0.0
  c.aesthetic_margin = 0.02
  # openai: API root including the version, e.g. https://api.openai.com/v1.
  c.base_url = "http://localhost:8000/v1"
  # openai: the endpoint's model name (one that accepts image inputs).
  c.model = ""
  # openai: NAME of the environment variable that holds the API key ('' = send no key).
  c.api_key_env = "OPENAI_API_KEY"
  # openai: seconds per socket operation of one request.
  c.timeout_s = 60.0
  # openai: extra tries after a 429, 5xx, timeout or connection error.
  c.max_retries = 3
  # openai: first backoff in seconds (doubles per retry, with jitter); Retry-After wins.
  c.backoff_s = 1.0
  # openai: cap on any single wait, Retry-After included.
  c.max_backoff_s = 30.0
  # Judge calls in flight at once (each query makes two).
  c.max_concurrency = 8
  # openai: sampling temperature, and the most tokens of an answer (a short JSON object).
  c.temperature = 0.0
  c.max_new_tokens = 200
  # openai: send at most this many images of each group (its first ones).
  c.max_images_per_group = 10
  # openai: resize each image so its longer side has this many pixels (0 = as is); the
  # world's 32-pixel images are too small for most LMMs to see.
  c.image_side = 0
  # openai: send each group as one grid image (fewer, larger images) instead of one image each.
  c.as_grid = False
  # openai: the image_url 'detail' field (low | high | auto; '' = leave it out).
  c.image_detail = ""
  return c


def choose(score_a: float, score_b: float, margin: float) -> str:
  """'A' or 'B' for the higher score, 'similar' when they differ by at most `margin`."""
  diff = float(score_a) - float(score_b)
  if not np.isfinite(diff):
    raise ValueError(f"non-finite group scores {score_a}, {score_b}")
  if abs(diff) <= margin + _TOLERANCE:
    return "similar"
  return "A" if diff > 0 else "B"


class WorldJudge:
  """Ground truth of the embedded world: accuracy = fraction of the group's images relevant
  to the query, aesthetic = their mean ground-truth aesthetic.

  world: anything with is_relevant(query, ids) -> bool [k] and aesthetic(ids) -> float [k]
  (input_pipeline.world.World); queries given as text are looked up in world.queries.
  row_ids: maps a group's rows to world indices (e.g. world.split_indices('eval') when rows
  are positions in the eval corpus); None = rows are world indices.
  """

  name = "world"
  aspects = ASPECTS
  max_concurrency = 1

  def __init__(self, world, *, accuracy_margin: float = 0.0, aesthetic_margin: float = 0.02,
               row_ids=None):
    _check_margins(accuracy_margin, aesthetic_margin)
    self.world = world
    self.margins = {"accuracy": float(accuracy_margin), "aesthetic": float(aesthetic_margin)}
    self.row_ids = None if row_ids is None else np.asarray(row_ids, np.int64)
    self._by_text = {q.text: q for q in getattr(world, "queries", ())}

  def compare(self, query, group_a: Group, group_b: Group) -> dict[str, str]:
    q = self._resolve(query)
    a, b = self.truth(q, group_a), self.truth(q, group_b)
    return {k: choose(a[k], b[k], self.margins[k]) for k in self.aspects}

  def truth(self, query, group: Group) -> dict[str, float]:
    """{'accuracy': fraction relevant, 'aesthetic': mean ground truth} of a group."""
    if not len(group.rows):
      raise ValueError("WorldJudge needs the groups' rows (world ids)")
    ids = group.rows if self.row_ids is None else self.row_ids[group.rows]
    relevant = np.asarray(self.world.is_relevant(self._resolve(query), ids), np.float64)
    aesthetic = np.asarray(self.world.aesthetic(ids), np.float64)
    return {"accuracy": float(relevant.mean()), "aesthetic": float(aesthetic.mean())}

  def _resolve(self, query):
    if not isinstance(query, str):
      return query
    if query in self._by_text:
      return self._by_text[query]
    if self._by_text:
      raise KeyError(f"WorldJudge: {query!r} is not a query of this world; pass the Query")
    return query


class ScorerJudge:
  """Judges by scoring functions over groups: accuracy by semantic_fn(query, group),
  aesthetic by aesthetic_fn(group); each returns a score per image or one per group (the
  group's score is the mean). Either may be None, which drops its aspect."""

  name = "scorer"
  max_concurrency = 1

  def __init__(self, aesthetic_fn: Callable[[Group], Any] | None,
               semantic_fn: Callable[[Any, Group], Any] | None, *,
               accuracy_margin: float = 0.0, aesthetic_margin: float = 0.02):
    if aesthetic_fn is None and semantic_fn is None:
      raise ValueError("ScorerJudge needs an aesthetic_fn, a semantic_fn or both")
    _check_margins(accuracy_margin, aesthetic_margin)
    self.aesthetic_fn, self.semantic_fn = aesthetic_fn, semantic_fn
    self.margins = {"accuracy": float(accuracy_margin), "aesthetic": float(aesthetic_margin)}
    self.aspects = tuple(k for k, fn in (("accuracy", semantic_fn),
                                         ("aesthetic", aesthetic_fn)) if fn is not None)

  def compare(self, query, group_a: Group, group_b: Group) -> dict[str, str]:
    out = {}
    if self.semantic_fn is not None:
      out["accuracy"] = choose(_mean(self.semantic_fn(query, group_a)),
                               _mean(self.semantic_fn(query, group_b)),
                               self.margins["accuracy"])
    if self.aesthetic_fn is not None:
      out["aesthetic"] = choose(_mean(self.aesthetic_fn(group_a)),
                                _mean(self.aesthetic_fn(group_b)), self.margins["aesthetic"])
    return out


def scorer_aesthetic_fn(scorer) -> Callable[[Group], np.ndarray]:
  """An aesthetic_fn from an aesthetics Scorer (uint8 images -> scores): scores group.images."""
  def fn(group: Group) -> np.ndarray:
    if group.images is None:
      raise ValueError(f"aesthetic scorer {scorer.name} needs the groups' images")
    return scorer.score(group.images)
  return fn


def _mean(scores) -> float:
  scores = np.asarray(scores, np.float64).reshape(-1)
  if not scores.size:
    raise ValueError("a scorer returned no scores")
  return float(scores.mean())


def _check_margins(accuracy_margin: float, aesthetic_margin: float) -> None:
  for key, value in (("accuracy_margin", accuracy_margin), ("aesthetic_margin",
                                                            aesthetic_margin)):
    if not float(value) >= 0:
      raise ValueError(f"evals.judge.{key} must be >= 0; got {value}")


def make_judge(config: ml_collections.ConfigDict, *, world=None, row_ids=None,
               aesthetic_fn=None, semantic_fn=None) -> Judge:
  """The judge named by config.kind (the `evals.judge` section).

  world (and row_ids) serve kind 'world'; aesthetic_fn / semantic_fn serve kind 'scorer'.
  """
  margins = dict(accuracy_margin=config.accuracy_margin, aesthetic_margin=config.aesthetic_margin)
  if config.kind == "world":
    if world is None:
      raise ValueError("evals.judge.kind is 'world' but no world was given")
    return WorldJudge(world, row_ids=row_ids, **margins)
  if config.kind == "scorer":
    return ScorerJudge(aesthetic_fn, semantic_fn, **margins)
  if config.kind == "openai":
    from aesalign_jax.evaluation.judge_openai import OpenAIJudge
    return OpenAIJudge.from_config(config)
  raise ValueError(f"evals.judge.kind must be one of {', '.join(KINDS)}; got {config.kind!r}")
