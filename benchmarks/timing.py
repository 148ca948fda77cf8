"""Timing helpers shared by the benchmarks: medians of repeated runs, after warm-up."""

import statistics
import time
from typing import Callable


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


def interleaved_medians(fns: dict, *, warmup: int = 2, repeats: int = 5) -> dict:
  """Medians of several functions timed in alternation, so machine noise hits all alike."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
