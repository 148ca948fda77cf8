"""The train step: gradients (accumulated over micro-batches), the optimizer update and the NaN
guard; jitted over the state's shardings and compiled ahead of time.

The guard: `bad_step` in the state records the first step whose loss or gradient was not
finite; from then on the step leaves the state untouched, and the host (check_finite) raises
an error naming that step at its next check.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aesalign_jax import optim, sharding
from aesalign_jax.models import clip
from aesalign_jax.train import objectives

MAX_LOG_SCALE = float(np.log(100.0))


class NonFiniteError(FloatingPointError):
  pass


def make_train_step(cfg: clip.ClipConfig, c, kind: str, optimizer, lr_schedule, *,
                    mesh=None, rules=None):
  """step(state, batch) -> (state, metrics); mesh and rules as make_loss_fn."""
  loss_fn = objectives.make_loss_fn(cfg, c, kind, mesh, rules)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(params, batch, ref_params):
    if c.grad_accum == 1:
      return grad_fn(params, batch, ref_params)
    micro = jax.tree.map(lambda x: x.reshape((c.grad_accum, -1) + x.shape[1:]), batch)

    def body(carry, mb):
      (loss, metrics), grads = grad_fn(params, mb, ref_params)
      acc = jax.tree.map(jnp.add, carry, ((loss, metrics), grads))
      return acc, None

    zero = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), ref_params)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    total, _ = jax.lax.scan(body, zero, micro)
    return jax.tree.map(lambda x: x / c.grad_accum, total)

  def step(state, batch):
    (loss, metrics), grads = accumulate(state['params'], batch, state.get('ref_params'))
    if c.debug_nan_at_step >= 0:
      loss = jnp.where(state['step'] == c.debug_nan_at_step, jnp.nan, loss)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # CLIP's cap on the temperature: logits at most 100 * cosine, else training destabilises.
    params['logit_scale'] = jnp.minimum(params['logit_scale'], MAX_LOG_SCALE)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state['bad_step'] < 0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = dict(state)
    new_state.update(
        params=keep(params, state['params']),
        opt_state=keep(opt_state, state['opt_state']),
        step=state['step'] + 1,
        bad_step=jnp.where((state['bad_step'] < 0) & ~ok, state['step'], state['bad_step']))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_schedule(state['step']))
    return new_state, metrics

  return step


def jit_train_step(step_fn, shardings, mesh, rules):
  """step_fn jitted on the mesh: the state keeps `shardings` and is donated."""
  def sharded_step(state, batch):
    with sharding.activation_rules(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(sharded_step, in_shardings=(shardings, None),
                 out_shardings=(shardings, None), donate_argnums=(0,))


def compile_ahead(train_step, abstract_state, batch):
  """Compiles the jitted step for `batch`'s shapes and shardings before step 1: (compiled,
  the batch shapes every later batch must have, seconds)."""
  batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), batch)
  t0 = time.perf_counter()
  compiled = train_step.lower(abstract_state, batch_shapes).compile()
  return compiled, batch_shapes, time.perf_counter() - t0


def check_batch_shapes(batch, expected, step: int) -> None:
  got = jax.tree.map(lambda x: (x.shape, x.dtype), batch)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), expected)
  if got != want:
    raise ValueError(f'the batch of step {step} has shapes {got}, the step was compiled for '
                     f'{want}; batch with drop_remainder=True')


def check_finite(state) -> None:
  """Raises NonFiniteError once the step's guard has recorded a non-finite step."""
  bad = int(jax.device_get(state['bad_step']))
  if bad >= 0:
    raise NonFiniteError(f'non-finite loss or gradient at step {bad}; training stopped, the '
                         'last checkpoint (before that step) is intact')
