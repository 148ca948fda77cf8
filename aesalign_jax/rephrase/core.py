"""The rephraser: a backend, a prompt style, an optional on-disk cache, and the failure policy.

A backend turns queries into clean query lines (`Attempt`s) and reports per query why it could
not. `Rephraser.rephrase_batch` adds what every backend shares: 'original' needs no backend;
duplicate queries are asked once; cached answers are reused and new successes cached; and a
failed or empty rephrasing falls back to the original query, is counted and listed in the
result's summary, and never raises. The rephraser keeps running totals (`tally`, and
`counting()` for a block of calls) so that a stage can report how much fell back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from aesalign_jax.rephrase import prompts

logger = logging.getLogger(__name__)

OK, FALLBACK = "ok", "fallback"


@dataclasses.dataclass(frozen=True)
class Attempt:
  """A backend's answer for one query: the clean query line, or None and the reason why not."""
  text: str | None
  reason: str = ""


class Backend(Protocol):
  """What a rephrasing backend provides (lexicon, hf, openai)."""
  name: str         # the backend's name, part of cache keys
  model: str        # the model it runs (a folder, an endpoint's model name...), part of cache keys
  cacheable: bool   # whether answers are worth caching on disk

  def complete(self, queries: Sequence[str], style: str) -> list[Attempt]:
    """One Attempt per query, in order; per-query failures are Attempts, not exceptions."""
    ...


@dataclasses.dataclass
class RephraseResult:
  """Rephrased texts for a batch of queries, with the status of each."""
  backend: str
  model: str
  style: str
  queries: list[str]
  texts: list[str]          # the rephrasing, or the original query where it fell back
  status: list[str]         # 'ok' or 'fallback' per query
  reasons: list[str]        # why it fell back ('' when ok)
  from_cache: list[bool]    # answered from the on-disk cache
  backend_calls: int        # distinct queries sent to the backend by this call
  seconds: float

  @property
  def num_ok(self) -> int:
    return self.status.count(OK)

  @property
  def num_fallbacks(self) -> int:
    return self.status.count(FALLBACK)

  @property
  def fallbacks(self) -> list[tuple[str, str]]:
    """(query, reason) for each query that fell back to the original."""
    return [(q, r) for q, s, r in zip(self.queries, self.status, self.reasons) if s == FALLBACK]

  def summary(self) -> dict:
    """A JSON-ready summary: counts, the fallback rate, time, and every fallback with its
    reason."""
    return dict(backend=self.backend, model=self.model, style=self.style,
                queries=len(self.queries), ok=self.num_ok, fallbacks=self.num_fallbacks,
                rate=fallback_rate(self.num_fallbacks, len(self.queries)),
                from_cache=sum(self.from_cache), backend_calls=self.backend_calls,
                seconds=round(self.seconds, 3),
                fallback_list=[dict(query=q, reason=r) for q, r in self.fallbacks])


def concat_results(parts: Sequence[RephraseResult]) -> RephraseResult:
  """One result for consecutive blocks of queries rephrased apart (e.g. by several processes,
  each its share): lists in block order, backend calls summed, the longest time."""
  first = parts[0]
  lists = {name: [x for p in parts for x in getattr(p, name)]
           for name in ("queries", "texts", "status", "reasons", "from_cache")}
  return RephraseResult(backend=first.backend, model=first.model, style=first.style, **lists,
                        backend_calls=sum(p.backend_calls for p in parts),
                        seconds=max(p.seconds for p in parts))


def fallback_rate(fallbacks: int, queries: int) -> float | None:
  """fallbacks / queries, None when there were no queries."""
  return fallbacks / queries if queries else None


@dataclasses.dataclass
class RephraseTally:
  """Totals over several rephrase_batch calls: rephrasings asked for (`queries`, cached ones
  included), answered `ok`, `fallbacks` to the original query, answered `from_cache`, and
  distinct queries sent to the backend (`backend_calls`); the first fallback as an example."""
  backend: str
  model: str
  style: str
  queries: int = 0
  ok: int = 0
  fallbacks: int = 0
  from_cache: int = 0
  backend_calls: int = 0
  first_fallback: dict | None = None   # {query, reason}

  def add(self, result: RephraseResult) -> None:
    self.queries += len(result.queries)
    self.ok += result.num_ok
    self.fallbacks += result.num_fallbacks
    self.from_cache += sum(result.from_cache)
    self.backend_calls += result.backend_calls
    if self.first_fallback is None and result.num_fallbacks:
      query, reason = result.fallbacks[0]
      self.first_fallback = dict(query=query, reason=reason)

  def to_json(self) -> dict:
    """The counts and the fallback rate (the keys of RephraseResult.summary, no list)."""
    out = dict(backend=self.backend, model=self.model, style=self.style, queries=self.queries,
               ok=self.ok, fallbacks=self.fallbacks,
               rate=fallback_rate(self.fallbacks, self.queries), from_cache=self.from_cache,
               backend_calls=self.backend_calls)
    if self.first_fallback is not None:
      out["first_fallback"] = dict(self.first_fallback)
    return out


class Rephraser:
  """Rephrases queries in one prompt style with one backend, through an optional cache."""

  def __init__(self, backend: Backend, style: str, cache=None, k: int = 3,
               across_processes: bool = False):
    """backend: a Backend; style: one of prompts.STYLES; cache: a RephraseCache or None;
    k: the keyword count the style's prompt asks for (part of the cache key);
    across_processes: every process of a multi-process run makes the same rephrase_batch
    calls; the queries the cache lacks are split over the processes (each sends its block to
    the backend) and every process gets every answer (make_rephraser sets it up)."""
    self.backend = backend
    self.across_processes = across_processes
    self.style = prompts.check_style(style)
    self.cache = cache if getattr(backend, "cacheable", False) else None
    self.prompt_id = prompts.prompt_fingerprint(style, k)
    self.tally = self._new_tally()   # every call since this rephraser was made
    self._open_tallies: list[RephraseTally] = []

  def _new_tally(self) -> RephraseTally:
    return RephraseTally(self.backend.name, self.backend.model, self.style)

  @contextlib.contextmanager
  def counting(self):
    """Yields a fresh RephraseTally of the rephrase_batch calls made inside the block (e.g.
    one evaluator's), while `tally` keeps counting everything."""
    tally = self._new_tally()
    self._open_tallies.append(tally)
    try:
      yield tally
    finally:
      self._open_tallies.remove(tally)

  def close(self) -> None:
    """Closes the cache file, if any."""
    if self.cache is not None:
      self.cache.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def rephrase(self, query: str) -> str:
    """One query's rephrasing (the query itself if it fell back)."""
    return self.rephrase_batch([query]).texts[0]

  def rephrase_batch(self, queries: Sequence[str]) -> RephraseResult:
    """Rephrases every query; see the module docstring for the policy."""
    start = time.perf_counter()
    queries = list(queries)
    for i, q in enumerate(queries):
      if not isinstance(q, str):
        raise TypeError(f"rephrase_batch: query {i} is a {type(q).__name__}, not a str")
    n = len(queries)
    texts, status = list(queries), [FALLBACK] * n
    reasons, from_cache = [""] * n, [False] * n
    todo: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
      if self.style == "original":
        status[i] = OK
      elif not q.strip():
        reasons[i] = "empty query"
      else:
        hit = self._cache_get(q)
        if hit is not None:
          texts[i], status[i], from_cache[i] = hit, OK, True
        else:
          todo.setdefault(q, []).append(i)

    for q, attempt in zip(todo, self._complete(list(todo))):
      text = " ".join(attempt.text.split()) if attempt.text else ""
      if text:
        self._cache_put(q, text)
      for i in todo[q]:
        if text:
          texts[i], status[i] = text, OK
        else:
          reasons[i] = attempt.reason or "empty answer"

    result = RephraseResult(self.backend.name, self.backend.model, self.style, queries, texts,
                            status, reasons, from_cache, len(todo), time.perf_counter() - start)
    for tally in (self.tally, *self._open_tallies):
      tally.add(result)
    if result.num_fallbacks:
      query, reason = result.fallbacks[0]
      logger.warning("rephrase (%s, %s): %d of %d queries fell back to the original query; "
                     "first: %r (%s)", self.backend.name, self.style, result.num_fallbacks, n,
                     query, reason)
    return result

  def _complete(self, queries: list[str]) -> list[Attempt]:
    from aesalign_jax import multihost  # pylint: disable=g-import-not-at-top  (jax)
    if not self.across_processes or multihost.count() == 1:
      return self._complete_here(queries)
    start, stop = multihost.share(len(queries))
    own = self._complete_here(queries[start:stop])
    return [Attempt(text, reason) for text, reason in
            multihost.concat_shares([[a.text, a.reason] for a in own])]

  def _complete_here(self, queries: list[str]) -> list[Attempt]:
    if not queries:
      return []
    try:
      attempts = list(self.backend.complete(queries, self.style))
      if len(attempts) != len(queries):
        raise RuntimeError(f"returned {len(attempts)} answers for {len(queries)} queries")
    except Exception as e:  # pylint: disable=broad-except  # the policy: fall back, never stop
      logger.exception("rephrase backend %s failed on a batch of %d queries",
                       self.backend.name, len(queries))
      return [Attempt(None, f"backend {self.backend.name} failed: {type(e).__name__}: {e}")
              ] * len(queries)
    return attempts

  def _cache_get(self, query: str) -> str | None:
    if self.cache is None:
      return None
    return self.cache.get(self.backend.name, self.backend.model, self.style, self.prompt_id,
                          query)

  def _cache_put(self, query: str, text: str) -> None:
    if self.cache is None:
      return
    try:
      self.cache.put(self.backend.name, self.backend.model, self.style, self.prompt_id, query,
                     text)
    except OSError as e:
      logger.warning("rephrase cache %s cannot be written (%s); going on without it",
                     self.cache.path, e)
      self.cache = None
