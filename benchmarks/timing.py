"""Timing helpers shared by the benchmarks: medians of repeated runs, after warm-up.

Two things compared are timed in alternation (interleaved), round after round, so that the
noise of a shared machine hits both alike and their ratio stays meaningful when their
absolute times do not.
"""

import statistics
import time
from typing import Callable, Optional


class Measured(float):
  """Seconds a timed function measured itself; return it to leave out its own cleanup
  (e.g. waiting for a closed pipeline's threads to exit) from the timing."""


def median_seconds(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5) -> float:
  """Median wall time of fn() (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_times(fns: dict, *, warmup: int = 2, repeats: int = 5,
                      max_seconds: Optional[float] = None, min_repeats: int = 3) -> dict:
  """Wall times of several functions timed in alternation: name -> list of seconds.

  Each fn must block until its work is done; one returning a `Measured` reports that value
  instead of its wall time. Runs `repeats` rounds, or stops earlier once the timed rounds
  took more than `max_seconds` and at least `min_repeats` rounds are done (a loaded machine
  then still finishes in time, with fewer samples).
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  began = time.perf_counter()
  for done in range(1, repeats + 1):
    for name, fn in fns.items():
      start = time.perf_counter()
      out = fn()
      times[name].append(out if isinstance(out, Measured) else time.perf_counter() - start)
    if (max_seconds is not None and done >= min_repeats
        and time.perf_counter() - began > max_seconds):
      break
  return {name: [float(t) for t in ts] for name, ts in times.items()}


def interleaved_medians(fns: dict, *, warmup: int = 2, repeats: int = 5,
                        max_seconds: Optional[float] = None, min_repeats: int = 3) -> dict:
  """Medians of several functions timed in alternation, so machine noise hits all alike."""
  times = interleaved_times(fns, warmup=warmup, repeats=repeats, max_seconds=max_seconds,
                            min_repeats=min_repeats)
  return {name: statistics.median(t) for name, t in times.items()}


def spread(times: list) -> dict:
  """Median, min, max and count of a list of seconds (for the results' details)."""
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'n': len(times)}
