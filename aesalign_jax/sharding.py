"""Device mesh and logical-axis sharding.

Parameters and activations are annotated with logical axis names ('embed', 'mlp', 'heads',
'vocab', 'batch', ...). Rules in the config map each logical name to mesh axes, so the same
model runs data-parallel, FSDP or tensor-parallel by changing config only:

  config.mesh  = {'data': -1, 'fsdp': 1, 'tensor': 1}    # -1 takes the remaining devices
  config.rules = [('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...]

A mesh axis is used at most once per array: a later logical axis that maps to an axis already
taken stays replicated on it, so any rule set gives a valid PartitionSpec.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Defaults: batch over data and fsdp; weights' embed dimension over fsdp (ZeRO-3 style);
# MLP hidden, attention heads and vocabulary over tensor (Megatron style).
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('proj', 'tensor'),
    ('norm', None),
    ('length', None),
    ('act_embed', None),
)


def default_config() -> ml_collections.ConfigDict:
  """config.mesh: devices per mesh axis (-1 = the rest); config.rules: logical -> mesh axes."""
  return ml_collections.ConfigDict({
      'mesh': {'data': -1, 'fsdp': 1, 'tensor': 1},
      'rules': [list(r) for r in DEFAULT_RULES],
  })


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves -1 in the mesh config; refuses shapes whose product is not the device count."""
  sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
  unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; expected {MESH_AXES}')
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}')
  if any(n == 0 or n < -1 for n in sizes.values()):
    raise ValueError(f'config.mesh: sizes must be positive or -1, got {sizes}')
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh {sizes}: {num_devices} devices are not divisible by '
                       f'the fixed axes (product {fixed})')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'config.mesh {sizes}: product {math.prod(sizes.values())} != '
                     f'{num_devices} devices')
  return sizes


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) over all devices (every process's, multi-host)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # odd topologies (e.g. fake CPU devices): a plain reshape is fine there
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def local_mesh(mesh: Mesh) -> Mesh:
  """`mesh` itself when this process holds all its devices; else a mesh of this process's
  devices, all on the data axis: for work each process does on its own share (corpus
  embedding, top-K over its part of an index), where a global mesh would make every process
  wait on the others' data."""
  me = jax.process_index()
  if all(d.process_index == me for d in mesh.devices.flat):
    return mesh
  local = [d for d in mesh.devices.flat if d.process_index == me]
  return Mesh(np.asarray(local).reshape(len(local), 1, 1), MESH_AXES)


def check_rules(rules: Iterable) -> dict:
  """The rules as {logical name: mesh axes}; refuses malformed rules and unknown mesh axes."""
  out = {}
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'config.rules: each rule is (logical_name, mesh_axes), got {rule!r}')
    name, axes = rule
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    axes = tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f'config.rules: logical axis {name!r} maps to unknown mesh axes {bad}')
    out[name] = axes
  return out


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry these logical names."""
  table = rules if isinstance(rules, dict) else check_rules(rules)
  used, spec = set(), []
  for name in logical_axes:
    axes = tuple(a for a in table.get(name, ()) if a not in used) if name else ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _fits(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide a dimension (e.g. a 3-channel conv input)."""
  fixed = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n = math.prod(mesh.shape[a] for a in names)
    fixed.append(axes if n and dim % n == 0 else None)
  return PartitionSpec(*fixed)


def param_specs(logical_tree, shapes_tree, mesh: Mesh, rules):
  """PartitionSpecs for a parameter tree, from its logical axes and shapes (same structure)."""
  table = check_rules(rules)
  return jax.tree.map(
      lambda axes, x: _fits(x.shape, logical_to_spec(axes, table), mesh),
      logical_tree, shapes_tree, is_leaf=lambda a: isinstance(a, tuple))


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


# Activation constraints: the model calls constrain(x, names); it is a no-op unless a mesh and
# rules are active (so the model also runs unsharded, e.g. in parity tests).
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  prev = getattr(_ACTIVE, 'value', None)
  _ACTIVE.value = (mesh, check_rules(rules))
  try:
    yield
  finally:
    _ACTIVE.value = prev


def constrain(x, logical_axes: Sequence[Optional[str]]):
  active = getattr(_ACTIVE, 'value', None)
  if active is None:
    return x
  mesh, table = active
  spec = _fits(x.shape, logical_to_spec(logical_axes, table), mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_axes(rules) -> tuple:
  """The mesh axes the logical 'batch' axis maps to (() when it is not split)."""
  spec = logical_to_spec(('batch',), rules)[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def batch_devices(mesh: Optional[Mesh], rules) -> int:
  """Devices the batch dimension is split over (1 without a mesh)."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in batch_axes(rules)]))


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Sharding of an input array whose leading dimension is the batch."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules))


def describe(mesh: Mesh) -> str:
  return (f'mesh {dict(mesh.shape)} over {mesh.devices.size} devices '
          f'({jax.process_count()} processes, {jax.local_device_count()} local devices, '
          f'platform {jax.devices()[0].platform})')
