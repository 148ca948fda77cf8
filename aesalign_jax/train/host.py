"""The host side of the loop: SIGTERM (preemption), batches put on the devices ahead of the step
that uses them, and the compiled step's XLA memory report."""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
import time
from typing import Callable, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from aesalign_jax import sharding


@dataclasses.dataclass
class Preemption:
  """SIGTERM (Cloud TPU preemption, a scheduler's stop) sets a flag; the loop saves and exits."""
  requested: bool = False

  def install(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint at the current step, then exiting')
    self.requested = True

  def uninstall(self):
    signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:   # every process must agree to save at the same step
      return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
    return self.requested


def to_global(batch: dict, mesh, rules) -> dict:
  """Per-process numpy batches -> global jax.Arrays sharded along the batch dimension."""
  def put(x):
    return jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, np.ndim(x)), np.asarray(x))
  return jax.tree.map(put, batch)


class IteratorPosition:
  """A grain iterator's position frozen at one moment, checkpointable in its place.

  grain's orbax handler stores a non-DatasetIterator item as the bytes of get_state(); this
  gives the JSON text the handler writes for a DatasetIterator itself, so a checkpoint saved
  from a position restores into the live iterator (and the other way round).
  """

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


@dataclasses.dataclass
class _Pulled:
  batch: dict        # global jax.Arrays, on their way to the devices
  positions: dict    # name -> IteratorPosition right after this batch was read


class DevicePrefetcher:
  """Reads the batches of steps first..last (1-based) and puts them on device ahead of use.

  Up to `depth` batches wait on device beyond the one the running step uses; with depth 0 a
  batch is read when its step starts. fill(limit) reads ahead, but never the batch of a step
  after `limit`: the loop passes the next due checkpoint, so a run killed right after a
  checkpoint has read exactly the data of the steps it saved. `keys`: iterator name -> the
  keys of its batches that go to the device.
  """

  def __init__(self, iterators: dict, put: Callable[[dict], dict], *, first: int, last: int,
               depth: int, keys: Mapping[str, tuple]):
    self._iterators, self._put, self._depth, self._keys = iterators, put, depth, keys
    self._next, self._last = first, last
    self._queue: collections.deque = collections.deque()

  def _pull(self):
    host = {name: {k: batch[k] for k in self._keys[name]}
            for name, batch in ((n, next(it)) for n, it in self._iterators.items())}
    positions = {name: IteratorPosition(it) for name, it in self._iterators.items()}
    self._queue.append(_Pulled(self._put(host), positions))
    self._next += 1

  def fill(self, limit: int) -> float:
    """Reads ahead up to `depth` waiting batches, none for a step after `limit`; seconds."""
    t0 = time.perf_counter()
    while len(self._queue) < self._depth and self._next <= min(limit, self._last):
      self._pull()
    return time.perf_counter() - t0

  def peek(self) -> dict:
    """The next batch (read now if none waits): what the compiler needs to know its shapes."""
    if not self._queue:
      self._pull()
    return self._queue[0].batch

  def pop(self) -> tuple[_Pulled, float]:
    """The next step's batch (with the iterator positions right after it) and the seconds
    spent waiting for it (0 when it was read ahead)."""
    t0 = time.perf_counter()
    if not self._queue:
      self._pull()
    return self._queue.popleft(), time.perf_counter() - t0


def compile_report(compiled, seconds: float) -> tuple[str, dict]:
  """A readable line and a dict: compile time and XLA's memory figures per device (those the
  backend gives; memory_analysis() is None or partial on some)."""
  info = {'compile_s': seconds}
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except   (unsupported on some backends)
    logging.info('memory_analysis() unavailable: %s', e)
    stats = None
  fields = (('argument', 'argument_size_in_bytes'), ('output', 'output_size_in_bytes'),
            ('temp', 'temp_size_in_bytes'), ('generated code', 'generated_code_size_in_bytes'),
            ('aliased', 'alias_size_in_bytes'))
  parts = []
  for label, attr in fields:
    value = getattr(stats, attr, None) if stats is not None else None
    if value is not None:
      info[attr] = int(value)
      parts.append(f'{label} {_fmt_bytes(value)}')
  memory = ', '.join(parts) if parts else 'not reported by this backend'
  return f'compiled in {seconds:.1f} s; memory per device: {memory}', info


def _fmt_bytes(n) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
