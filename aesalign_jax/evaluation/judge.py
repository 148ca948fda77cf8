"""System-level judge: win / similar / lose between two retrieval systems (PAPER.md protocol).

For each query both systems return their top k. A judge compares the two groups twice, with
the order swapped: call 1 shows (A = system 1, B = system 2), call 2 shows (A = system 2,
B = system 1). Per aspect (accuracy, aesthetic):
  both calls prefer system 1 -> win; both prefer system 2 -> lose;
  anything else (the calls disagree, or either says 'similar') -> similar.
A judge that always prefers the first group it sees (position bias) thus scores 'similar',
never a win. Rates are over the queries whose two calls both succeeded; a failed call
(refusal, malformed answer, network failure, an exception in the judge) excludes its query
from every aspect, is counted and listed with its reason, and never stops the run.

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

import concurrent.futures
import dataclasses
import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from aesalign_jax.evaluation.hpir import ASPECTS

logger = logging.getLogger(__name__)

CHOICES = ("A", "B", "similar")
OUTCOMES = ("win", "similar", "lose")
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


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """One system's top k for a query, in whatever form a judge needs.

  rows: int64 [k], ids of the images in the system's corpus (e.g. world indices);
  images: uint8 [k, H, W, 3] RGB or None; paths: image files (k of them) or None.
  At least one is given; those given agree on k.
  """
  rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  images: np.ndarray | None = None
  paths: tuple[str, ...] | None = None

  def __post_init__(self):
    rows = np.asarray(self.rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
      raise TypeError(f"Group.rows must be integers, got dtype {rows.dtype}")
    object.__setattr__(self, "rows", rows.astype(np.int64).reshape(-1))
    if self.images is not None:
      images = np.asarray(self.images)
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Group.images must be uint8 [k, H, W, 3], got {images.dtype} "
                         f"{images.shape}")
      object.__setattr__(self, "images", images)
    if self.paths is not None:
      object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
    sizes = {name: n for name, n in (
        ("rows", len(self.rows) or None),
        ("images", None if self.images is None else len(self.images)),
        ("paths", None if self.paths is None else len(self.paths))) if n is not None}
    if not sizes or not max(sizes.values()):
      raise ValueError("Group: empty; give rows, images or paths")
    if len(set(sizes.values())) > 1:
      raise ValueError(f"Group: rows, images and paths disagree on k: {sizes}")

  def __len__(self) -> int:
    if len(self.rows):
      return len(self.rows)
    return len(self.images) if self.images is not None else len(self.paths)


def as_group(top: Any) -> Group:
  """`top` if it is a Group, else a Group of its rows (an int sequence or array)."""
  return top if isinstance(top, Group) else Group(rows=top)


def groups_from_rows(rows, images_fn: Callable[[np.ndarray], np.ndarray] | None = None
                     ) -> list[Group]:
  """One Group per row of an int [Q, k] array of top-k ids; images_fn(ids [k]) -> uint8
  [k, H, W, 3] (e.g. world.render_batch) adds their pixels, for judges that look."""
  rows = np.asarray(rows)
  if rows.ndim != 2:
    raise ValueError(f"groups_from_rows: expected top-k ids [Q, k], got shape {rows.shape}")
  return [Group(rows=r, images=None if images_fn is None else images_fn(r)) for r in rows]


class Judge(Protocol):
  """Compares two groups of results for one query."""
  name: str
  aspects: tuple[str, ...]   # the aspects its verdicts hold

  def compare(self, query, group_a: Group, group_b: Group) -> dict[str, str] | None:
    """{aspect: 'A' | 'B' | 'similar'}, or None when the call failed."""
    ...


def query_text(query) -> str:
  """The text of a query: a str, or an object with .text (e.g. a world Query)."""
  return query if isinstance(query, str) else str(getattr(query, "text", query))


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


# --- the protocol ---------------------------------------------------------------------------

def preferred_system(choice: str, call: int) -> int:
  """Which system a call's choice prefers: 1, 2, or 0 for 'similar'. Call 1 shows system 1
  as A; call 2 shows system 2 as A."""
  if choice == "similar":
    return 0
  first, second = (1, 2) if call == 1 else (2, 1)
  return first if choice == "A" else second


def outcome(choice_1: str, choice_2: str) -> str:
  """'win', 'lose' or 'similar' for system 1, from the choices of call 1 and call 2."""
  p1, p2 = preferred_system(choice_1, 1), preferred_system(choice_2, 2)
  if p1 == p2 == 1:
    return "win"
  if p1 == p2 == 2:
    return "lose"
  return "similar"


def judge_systems(judge: Judge, queries: Sequence, tops_1: Sequence, tops_2: Sequence, *,
                  aspects: Sequence[str] = ASPECTS, max_concurrency: int | None = None) -> dict:
  """Compares system 1 with system 2 on every query, twice with the order swapped.

  queries: str or objects with .text (e.g. world Queries); tops_1, tops_2: per query the
  system's top k as a Group or an int id sequence. max_concurrency: judge calls in flight
  (None = the judge's own max_concurrency, else 1).

  Returns a JSON-ready dict:
    judge, aspects, num_queries;
    num_judged: queries whose two calls both succeeded (the rates' denominator);
    failures: queries excluded for a failed call; failed_calls: failed calls (<= 2 per query);
    rates: {aspect: {win, similar, lose, win_plus_similar (None when num_judged is 0),
                     counts: {win, similar, lose}}};
    per_query: [{query, verdicts: [call 1, call 2] (a verdict or None),
                 outcome: {aspect: win|similar|lose} or None, reasons: [why a call failed]}].
  """
  aspects = tuple(aspects)
  if not aspects or any(a not in ASPECTS for a in aspects):
    raise ValueError(f"judge_systems: aspects must be a non-empty subset of {ASPECTS}; "
                     f"got {aspects}")
  missing = [a for a in aspects if a not in tuple(getattr(judge, "aspects", ASPECTS))]
  if missing:
    raise ValueError(f"judge_systems: judge {getattr(judge, 'name', judge)!r} does not judge "
                     f"{missing}")
  queries = list(queries)
  if not len(queries) == len(tops_1) == len(tops_2):
    raise ValueError(f"judge_systems: {len(queries)} queries but {len(tops_1)} and "
                     f"{len(tops_2)} top lists")
  groups_1 = [as_group(t) for t in tops_1]
  groups_2 = [as_group(t) for t in tops_2]
  if max_concurrency is None:
    max_concurrency = int(getattr(judge, "max_concurrency", 1))
  if max_concurrency < 1:
    raise ValueError(f"judge_systems: max_concurrency must be >= 1; got {max_concurrency}")

  calls = [(i, call) for i in range(len(queries)) for call in (1, 2)]

  def run(task):
    i, call = task
    a, b = (groups_1[i], groups_2[i]) if call == 1 else (groups_2[i], groups_1[i])
    return _one_call(judge, queries[i], a, b, aspects)

  workers = max(1, min(max_concurrency, len(calls)))
  if workers == 1:
    answers = [run(t) for t in calls]
  else:
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="judge") as pool:
      answers = list(pool.map(run, calls))

  counts = {a: dict.fromkeys(OUTCOMES, 0) for a in aspects}
  per_query, failed_calls = [], 0
  for i, q in enumerate(queries):
    (v1, r1), (v2, r2) = answers[2 * i], answers[2 * i + 1]
    failed_calls += (v1 is None) + (v2 is None)
    result = None
    if v1 is not None and v2 is not None:
      result = {a: outcome(v1[a], v2[a]) for a in aspects}
      for a in aspects:
        counts[a][result[a]] += 1
    per_query.append(dict(query=query_text(q), verdicts=[v1, v2], outcome=result,
                          reasons=[r1, r2]))
  judged = sum(p["outcome"] is not None for p in per_query)
  failures = len(queries) - judged
  if failures:
    first = next(p for p in per_query if p["outcome"] is None)
    logger.warning("judge %s: %d of %d queries excluded for a failed call; first: %r (%s)",
                   getattr(judge, "name", "?"), failures, len(queries), first["query"],
                   "; ".join(r for r in first["reasons"] if r))
  def rate(n: int) -> float | None:
    return n / judged if judged else None

  rates = {a: dict(win=rate(c["win"]), similar=rate(c["similar"]), lose=rate(c["lose"]),
                   win_plus_similar=rate(c["win"] + c["similar"]), counts=dict(c))
           for a, c in counts.items()}
  return dict(judge=getattr(judge, "name", type(judge).__name__), aspects=list(aspects),
              num_queries=len(queries), num_judged=judged, failures=failures,
              failed_calls=failed_calls, rates=rates, per_query=per_query)


def _one_call(judge: Judge, query, group_a: Group, group_b: Group,
              aspects: tuple[str, ...]) -> tuple[dict[str, str] | None, str]:
  """(verdict restricted to `aspects`, '') or (None, why the call failed); never raises."""
  redact = getattr(judge, "redact", lambda text: text)
  try:
    explained = getattr(judge, "compare_explained", None)
    if explained is not None:
      verdict, reason = explained(query, group_a, group_b)
    else:
      verdict, reason = judge.compare(query, group_a, group_b), ""
    if verdict is None:
      return None, redact(reason or "the judge gave no verdict")
    if not isinstance(verdict, dict):
      return None, f"malformed verdict: a {type(verdict).__name__}, not a dict"
    bad = {a: verdict.get(a) for a in aspects if verdict.get(a) not in CHOICES}
    if bad:
      return None, redact(f"malformed verdict: {bad} (each aspect must be one of {CHOICES})")
    return {a: verdict[a] for a in aspects}, ""
  except Exception as e:  # pylint: disable=broad-except  # one failed call never stops the run
    logger.debug("judge %s failed on %r: %s", getattr(judge, "name", "?"), query_text(query),
                 redact(traceback.format_exc()))
    return None, redact(f"{type(e).__name__}: {e}")
