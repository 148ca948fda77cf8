"""torch's thread count for a fair comparison on a shared machine.

torch's CPU ops run on OpenMP threads that wait for each other at every op. When the machine
is busier than its cores (other processes running), one descheduled thread stalls the rest:
on 2 cores at load 8, a 1-layer CLIP step took 2 s with 2 threads and 0.03 s with 1. XLA's
thread pool does not wait that way. So before timing, `use_fastest_threads` times a torch
step at every core and at one thread, and keeps the faster: on an idle machine that is every
core (the setting open_clip's training uses), on a loaded one it may be one.
"""

from __future__ import annotations

import os
import time
from typing import Callable


def use_fastest_threads(step: Callable[[], object], tries: int = 2) -> dict:
  """Sets torch's thread count to the faster of os.cpu_count() and 1 for `step`; returns
  {'torch_threads': chosen, 'torch_threads_probe_s': {threads: best of `tries` seconds}}."""
  import torch  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count() or 1
  probe = {}
  for threads in dict.fromkeys((cores, 1)):
    torch.set_num_threads(threads)
    times = []
    for _ in range(tries):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    probe[threads] = min(times)
  chosen = min(probe, key=probe.get)
  torch.set_num_threads(chosen)
  return {'torch_threads': chosen, 'torch_threads_probe_s': probe}
