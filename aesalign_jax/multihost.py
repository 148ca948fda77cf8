"""Splitting host-side work over the processes of a multi-process run, and merging it back.

A multi-process run (a TPU slice, or `jax.distributed.initialize` on CPU) runs every stage on
every process. Device work is one global computation over the mesh; host work that costs
(LLM calls, decoding and embedding corpus rows, scoring, evaluating queries) is split here:

    start, stop = share(len(queries))              # this process's contiguous block
    mine = work(queries[start:stop])
    everyone = allgather(mine)                      # [process 0's, process 1's, ...]
    if is_writer():                                 # one process writes each shared file
      write(everyone)
    barrier('wrote')                                # the others read it after this

Blocks are contiguous and in process order, so concatenating what allgather returns gives
the results in the order of a one-process run: files written from it do not depend on the
number of processes. With one process every function here is the identity (no collective).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def count() -> int:
  return jax.process_count()


def index() -> int:
  return jax.process_index()


def is_writer() -> bool:
  """Whether this process writes the files every process shares (process 0)."""
  return jax.process_index() == 0


def share(n: int, process: int | None = None, processes: int | None = None) -> tuple[int, int]:
  """[start, stop) of this process's block of n items: contiguous, in process order, sizes
  differing by at most one (np.array_split's rule)."""
  p = jax.process_index() if process is None else process
  k = jax.process_count() if processes is None else processes
  base, extra = divmod(n, k)
  start = p * base + min(p, extra)
  return start, start + base + (1 if p < extra else 0)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (none with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _allgather_array(x: np.ndarray) -> np.ndarray:
  """[P, *x.shape]: every process's x (same shape and dtype everywhere)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def allgather_arrays(x: np.ndarray) -> list[np.ndarray]:
  """Every process's array, in process order; the leading dimension may differ between
  processes (the rest and the dtype may not). Bits travel unchanged."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return [x]
  lengths = _allgather_array(np.asarray([len(x)], np.int64))[:, 0]
  padded = np.zeros((int(lengths.max()),) + x.shape[1:], x.dtype)
  padded[:len(x)] = x
  gathered = _allgather_array(padded)
  return [gathered[p, :int(n)] for p, n in enumerate(lengths)]


def allgather(obj: Any) -> list:
  """Every process's JSON-serialisable `obj`, in process order (floats round-trip exactly:
  json writes the shortest repr that reads back as the same float)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode('utf-8'), np.uint8)
  return [json.loads(part.tobytes().decode('utf-8')) for part in allgather_arrays(data)]


def concat_shares(part: list) -> list:
  """The per-process blocks of share() gathered and concatenated: the whole list, in order."""
  return [item for block in allgather(part) for item in block]
