"""torch's thread count for a fair comparison on a shared machine.

torch's CPU ops run on OpenMP threads that wait for each other at every op. When the machine
is busier than its cores (other processes running), one descheduled thread stalls the rest:
on 2 cores at load 8, a 1-layer CLIP step took 2 s with 2 threads and 0.03 s with 1. XLA's
thread pool does not wait that way. So the benchmarks time torch's step twice per round, on
every core (the setting open_clip's training uses, best on an idle machine) and on one
thread, in alternation with ours, and compare ours with the faster of the two.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np


def thread_counts() -> tuple:
  """Every core, and one thread (once each on a 1-core machine)."""
  return tuple(dict.fromkeys((os.cpu_count() or 1, 1)))


def with_threads(step: Callable[[], object], threads: int) -> Callable[[], object]:
  """step, run with torch set to `threads` threads."""
  import torch  # pylint: disable=g-import-not-at-top

  def run():
    torch.set_num_threads(threads)
    return step()

  return run


def variants(name: str, step: Callable[[], object]) -> dict:
  """{f'{name}@{n}': step on n threads} for each of thread_counts()."""
  return {f'{name}@{n}': with_threads(step, n) for n in thread_counts()}


def fastest(name: str, times: dict) -> dict:
  """From interleaved times of variants(name, ...): the faster variant's median seconds
  (`{name}_s`), its thread count, and every variant's median."""
  medians = {int(k.split('@')[1]): float(np.median(t)) for k, t in times.items()
             if k.startswith(name + '@')}
  best = min(medians, key=medians.get)
  return {f'{name}_s': medians[best], 'torch_threads': best,
          'torch_s_by_threads': {str(n): s for n, s in medians.items()}}
