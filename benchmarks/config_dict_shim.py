"""A stand-in for `ml_collections` (ConfigDict only) where the package is missing.

The lent GPU machine's image has jax, flax, optax and absl but no ml_collections
(/work/.library/device/KINDS.md) and no registry to fetch it from, while the project builds its
config sections as ml_collections.ConfigDict. benchmarks/gpu_step.py installs this module as
`ml_collections` only when the import fails, so the benchmark runs there unchanged; everywhere
else the real package is used. It covers what the train step reads of a config: attribute and
item access, get, nested dicts as ConfigDicts, to_dict, lock/unlock (no-ops).
"""

from __future__ import annotations

import contextlib
import copy


class ConfigDict(dict):
  """A dict whose keys are also attributes; dict values become ConfigDicts."""

  def __init__(self, initial=None, **kwargs):
    super().__init__()
    for k, v in dict(initial or {}, **kwargs).items():
      self[k] = v

  def __setitem__(self, key, value):
    if isinstance(value, dict) and not isinstance(value, ConfigDict):
      value = ConfigDict(value)
    super().__setitem__(key, value)

  def __getattr__(self, key):
    if key.startswith('__'):
      raise AttributeError(key)
    try:
      return self[key]
    except KeyError as e:
      raise AttributeError(f"ConfigDict has no field {key!r}") from e

  def __setattr__(self, key, value):
    self[key] = value

  def __delattr__(self, key):
    try:
      del self[key]
    except KeyError as e:
      raise AttributeError(key) from e

  def update(self, *args, **kwargs):
    for k, v in dict(*args, **kwargs).items():
      self[k] = v

  def to_dict(self) -> dict:
    return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self.items()}

  def copy_and_resolve_references(self) -> 'ConfigDict':
    return copy.deepcopy(self)

  def __deepcopy__(self, memo):
    return ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

  def lock(self) -> 'ConfigDict':
    return self

  def unlock(self) -> 'ConfigDict':
    return self

  @contextlib.contextmanager
  def unlocked(self):
    yield self

  def __reduce__(self):
    return ConfigDict, (dict(self),)


FrozenConfigDict = ConfigDict
