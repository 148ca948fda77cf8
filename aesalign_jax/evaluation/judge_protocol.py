"""The order-consistent protocol of the system-level judge (PAPER.md): win / similar / lose
between two retrieval systems.

For each query both systems return their top k. A judge compares the two groups twice, with
the order swapped: call 1 shows (A = system 1, B = system 2), call 2 shows (A = system 2,
B = system 1). Per aspect (accuracy, aesthetic):
  both calls prefer system 1 -> win; both prefer system 2 -> lose;
  anything else (the calls disagree, or either says 'similar') -> similar.
A judge that always prefers the first group it sees (position bias) thus scores 'similar',
never a win. Rates are over the queries whose two calls both succeeded; a failed call
(refusal, malformed answer, network failure, an exception in the judge) excludes its query
from every aspect, is counted and listed with its reason, and never stops the run.

A judge (`Judge` protocol) compares two `Group`s: compare(query, group_a, group_b) ->
{aspect: 'A'|'B'|'similar'} or None for a failed call. The judges are in judge.py (world,
scorer, make_judge) and judge_openai.py (an LMM).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from aesalign_jax import multihost
from aesalign_jax.evaluation.hpir import ASPECTS

logger = logging.getLogger(__name__)

CHOICES = ("A", "B", "similar")
OUTCOMES = ("win", "similar", "lose")


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
                  aspects: Sequence[str] = ASPECTS, max_concurrency: int | None = None,
                  across_processes: bool = False) -> dict:
  """Compares system 1 with system 2 on every query, twice with the order swapped.

  queries: str or objects with .text (e.g. world Queries); tops_1, tops_2: per query the
  system's top k as a Group or an int id sequence. max_concurrency: judge calls in flight
  (None = the judge's own max_concurrency, else 1). across_processes: every process of a
  multi-process run calls this with the same arguments; each makes its block of the calls
  (multihost.share; an LMM judge's requests are split) and all get every answer.

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

  split = across_processes and multihost.count() > 1
  start, stop = multihost.share(len(calls)) if split else (0, len(calls))
  workers = max(1, min(max_concurrency, stop - start))
  if workers == 1:
    answers = [run(t) for t in calls[start:stop]]
  else:
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="judge") as pool:
      answers = list(pool.map(run, calls[start:stop]))
  if split:   # (verdict, reason) pairs travel as JSON lists
    answers = [tuple(a) for a in multihost.concat_shares([list(a) for a in answers])]

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
