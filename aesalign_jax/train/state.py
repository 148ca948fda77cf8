"""The train state: a dict {params, opt_state, step, rng, bad_step} (and `ref_params`, the
frozen reference of the online DPO reference), its shardings on the mesh, its initialisation.

The dict's keys are the layout of the checkpoint's `state` item: changing them breaks
restoring existing checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aesalign_jax import sharding
from aesalign_jax.models import clip


def init_state(params, optimizer, seed: int, ref_params=None) -> dict:
  state = {'params': params, 'opt_state': optimizer.init(params),
           'step': jnp.zeros((), jnp.int32), 'bad_step': jnp.full((), -1, jnp.int32),
           'rng': jax.random.key_data(jax.random.PRNGKey(seed))}
  if ref_params is not None:
    state['ref_params'] = ref_params
  return state


def _param_path(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_specs(abstract_state, cfg: clip.ClipConfig, mesh, rules):
  """PartitionSpecs for the whole state: optimizer moments follow their parameters."""
  pspecs = sharding.param_specs(clip.logical_axes(cfg), abstract_state['params'], mesh, rules)
  by_path = {_param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      pspecs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]}

  def spec(path, leaf):
    keys = _param_path(path)
    for start in range(len(keys)):   # drop leading keys ('params', 'opt_state', 'mu', ...)
      tail = keys[start:]
      if tail in by_path and len(by_path[tail]) <= len(leaf.shape):
        return by_path[tail]
    return jax.sharding.PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, abstract_state)


def sharded_abstract_state(init_params, ref_params, optimizer, seed: int,
                           cfg: clip.ClipConfig, mesh, rules, *, online_reference: bool):
  """(abstract state with its shardings, the shardings): the target of checkpoint restores and
  of the ahead-of-time compile. online_reference without ref_params: the state holds a frozen
  copy of the start (initial_state makes it)."""
  abstract = jax.eval_shape(lambda p, r: init_state(p, optimizer, seed, r), init_params,
                            ref_params)
  if online_reference and ref_params is None:
    abstract['ref_params'] = abstract['params']   # a frozen copy of the start (init below)
  specs = state_specs(abstract, cfg, mesh, rules)
  shardings = sharding.named(mesh, specs)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def initial_state(init_params, ref_params, abstract, shardings, optimizer, seed: int) -> dict:
  """The step-0 state on the mesh; host arrays go over with explicit device_puts."""
  params = jax.device_put(init_params, shardings['params'])
  if ref_params is not None:
    ref = jax.device_put(ref_params, shardings['ref_params'])
  else:   # the online reference is a copy of the start (the jit's outputs are new buffers)
    ref = params if 'ref_params' in abstract else None
  return jax.jit(lambda p, r: init_state(p, optimizer, seed, r),
                 out_shardings=shardings)(params, ref)
