"""Training: contrastive pretraining and ranked-DPO alignment in one jitted, sharded step.

  pretrain: L = InfoNCE (or SigLIP) on image-text batches.
  align:    L = L_dpo(listwise ranked DPO over D_po groups) + lambda * InfoNCE on image-text
            batches drawn alongside (the regulariser that keeps recall; PAPER.md).

The train state is a dict {params, opt_state, step, rng, bad_step}. `bad_step` records the first
step whose loss or gradient was not finite; from then on the step leaves the state untouched,
the host raises an error naming that step at the next check, and no checkpoint is written with
it, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from aesalign_jax import losses, optim, sharding
from aesalign_jax.models import clip
from input_pipeline import images as images_lib

IMAGE_MEAN = np.asarray(images_lib.CLIP_MEAN, np.float32) * 255.0
IMAGE_STD = np.asarray(images_lib.CLIP_STD, np.float32) * 255.0
MAX_LOG_SCALE = float(np.log(100.0))


def default_config(kind: str) -> ml_collections.ConfigDict:
  """Config section `pretrain` or `align`."""
  c = ml_collections.ConfigDict()
  c.steps = 1000               # optimizer steps
  c.batch_size = 128           # image-text pairs per step (all processes together)
  c.loss = 'infonce'           # infonce | siglip (pretrain only; align uses infonce)
  c.label_smoothing = 0.1      # InfoNCE label smoothing
  c.grad_accum = 1             # micro-batches per step (contrastive negatives stay per micro-batch)
  c.log_every = 50
  c.checkpoint_every = 500     # steps between checkpoints
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.debug_nan_at_step = -1     # >= 0 injects a NaN loss at that step (tests of the NaN guard)
  c.peak_tflops_per_device = 0.0  # > 0: log MFU against this peak (e.g. 989 for an H100 bf16)
  c.optim = optim.default_config()
  if kind == 'align':
    c.steps = 300
    c.groups_per_step = 8      # D_po groups per step
    c.dpo_path = ''            # D_po records (.arrayrecord / .parquet); '' = the mine stage's
    c.beta = 0.1               # DPO beta
    c.dpo_loss = 'sigmoid'     # sigmoid | ipo | hinge
    c.dpo_label_smoothing = 0.0  # conservative DPO eps in [0, 0.5)
    c.lam = 1.0                # weight of the contrastive regulariser (lambda)
    c.pair_rule = 'product'    # product | row | column (PAPER.md)
    c.u = 5                    # grid rows (semantic bands) per group
    c.v = 5                    # grid columns (aesthetic ranks) per group
    c.online_reference = False  # True: reference scores from a frozen copy, not the records
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
  return c


def validate(c, kind: str) -> None:
  """Refuses an unusable training config before anything compiles, naming the key."""
  p = kind
  for key in ('steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'grad_accum'):
    if c[key] <= 0:
      raise ValueError(f'config.{p}.{key}={c[key]} must be > 0')
  if c.batch_size % c.grad_accum:
    raise ValueError(f'config.{p}.batch_size={c.batch_size} is not divisible by '
                     f'config.{p}.grad_accum={c.grad_accum}')
  if c.loss not in ('infonce', 'siglip'):
    raise ValueError(f'config.{p}.loss={c.loss!r}: expected infonce or siglip')
  if not 0 <= c.label_smoothing < 1:
    raise ValueError(f'config.{p}.label_smoothing={c.label_smoothing} must be in [0, 1)')
  optim.validate(c.optim, f'{p}.optim')
  if kind == 'align':
    if not c.beta > 0:
      raise ValueError(f'config.align.beta={c.beta} must be > 0')
    if not 0 <= c.dpo_label_smoothing < 0.5:
      raise ValueError(f'config.align.dpo_label_smoothing={c.dpo_label_smoothing} must be '
                       'in [0, 0.5)')
    if c.lam < 0:
      raise ValueError(f'config.align.lam={c.lam} must be >= 0')
    if c.dpo_loss not in ('sigmoid', 'ipo', 'hinge'):
      raise ValueError(f'config.align.dpo_loss={c.dpo_loss!r}: expected sigmoid, ipo or hinge')
    if c.pair_rule not in ('product', 'row', 'column'):
      raise ValueError(f'config.align.pair_rule={c.pair_rule!r}: expected product, row or column')
    if c.groups_per_step <= 0 or c.u <= 0 or c.v <= 0:
      raise ValueError('config.align.groups_per_step, u and v must be > 0')
    if c.loss != 'infonce':
      raise ValueError('config.align.loss must be infonce (the regulariser of PAPER.md)')


def normalize_on_device(images_uint8):
  """uint8 -> CLIP-normalised float32, on device (4x fewer bytes cross from the host)."""
  return (images_uint8.astype(jnp.float32) - IMAGE_MEAN) / IMAGE_STD


# ------------------------------------------------------------------------------------ losses


def _maybe_freeze(params, freeze: str):
  if not freeze:
    return params
  return {**params, freeze: jax.lax.stop_gradient(params[freeze])}   # LiT: no backward there


def contrastive_loss(cfg: clip.ClipConfig, params, pairs, *, kind: str, label_smoothing: float):
  """InfoNCE (or SigLIP) on a batch {'image' uint8, 'ids', 'eos_index'}."""
  model = clip.bind(cfg, params)
  img, txt, scale = model(normalize_on_device(pairs['image']), pairs['ids'], pairs['eos_index'])
  if kind == 'siglip':
    return losses.siglip_loss(img, txt, scale, params.get('logit_bias', -10.0))
  return losses.clip_infonce(img, txt, scale, label_smoothing=label_smoothing)


def group_scores(cfg: clip.ClipConfig, params, groups):
  """Cosine similarity of each group's query to each of its N images: [G, N]."""
  model = clip.bind(cfg, params)
  g, n = groups['images'].shape[:2]
  images = groups['images'].reshape((g * n,) + groups['images'].shape[2:])
  img = model.encode_image(normalize_on_device(images)).reshape(g, n, -1)
  txt = model.encode_text(groups['ids'], groups['eos_index'])
  return jnp.einsum('gd,gnd->gn', txt, img), jnp.exp(params['logit_scale'])


def dpo_loss(cfg: clip.ClipConfig, params, groups, ref_scores, c):
  """Listwise ranked DPO: N image encodings per group give all its u*v preference pairs."""
  scores, scale = group_scores(cfg, params, groups)
  mask = losses.pair_mask(c.u, c.v, c.pair_rule)
  # tau is held fixed for the preference term: DPO must not win by sharpening the temperature.
  return losses.ranked_dpo(scores, ref_scores, mask, beta=c.beta, loss_type=c.dpo_loss,
                           label_smoothing=c.dpo_label_smoothing,
                           temperature_scale=jax.lax.stop_gradient(scale))


# ------------------------------------------------------------------------------------- step


def make_loss_fn(cfg: clip.ClipConfig, c, kind: str):
  """loss(params, batch, ref_params) -> (loss, metrics) for one (micro-)batch."""

  def loss_fn(params, batch, ref_params):
    params = _maybe_freeze(params, c.optim.freeze)
    metrics, closs = {}, 0.0
    if kind == 'pretrain' or c.lam > 0:   # lambda = 0: no contrastive pass at all
      closs, caux = contrastive_loss(cfg, params, batch['pairs'], kind=c.loss,
                                     label_smoothing=c.label_smoothing)
      metrics = {'contrastive_loss': closs, **{f'contrastive/{k}': v for k, v in caux.items()}}
    if kind == 'pretrain':
      return closs, metrics
    groups = batch['groups']
    if c.online_reference:
      ref_scores, _ = group_scores(cfg, jax.lax.stop_gradient(ref_params), groups)
    else:
      ref_scores = groups['ref_scores']
    dloss, daux = dpo_loss(cfg, params, groups, ref_scores, c)
    metrics.update({'dpo_loss': dloss, **daux})
    return dloss + c.lam * closs, metrics

  return loss_fn


def make_train_step(cfg: clip.ClipConfig, c, kind: str, optimizer, lr_schedule):
  loss_fn = make_loss_fn(cfg, c, kind)
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
    grad_norm = _global_norm(grads)
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


# ------------------------------------------------------------------------------ state layout


def _global_norm(tree):
  tree_lib = getattr(optax, 'tree', None)   # optax >= 0.2.5; global_norm is deprecated there
  return tree_lib.norm(tree) if tree_lib and hasattr(tree_lib, 'norm') else optax.global_norm(tree)


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


class NonFiniteError(FloatingPointError):
  pass


def to_global(batch: dict, mesh, rules) -> dict:
  """Per-process numpy batches -> global jax.Arrays sharded along the batch dimension."""
  def put(x):
    return jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, np.ndim(x)), np.asarray(x))
  return jax.tree.map(put, batch)


DEVICE_KEYS = {'pairs': ('image', 'ids', 'eos_index'),
               'groups': ('images', 'ids', 'eos_index', 'ref_scores')}


@dataclasses.dataclass
class RunResult:
  params: Any
  step: int
  status: str        # 'finished' | 'preempted'
  history: list      # the logged metric dicts


def fit(*, kind: str, c, model_cfg: clip.ClipConfig, init_params, iterators: dict,
        mesh, rules, workdir: str, seed: int = 0, ref_params=None,
        on_log: Optional[Callable[[int, dict], None]] = None,
        on_save: Optional[Callable[[int], None]] = None) -> RunResult:
  """Runs (or resumes) training; `iterators` are grain iterators named 'pairs' [and 'groups'].

  Checkpoints (state + every iterator's position) go to workdir/checkpoints; a restart with
  the same workdir continues from the latest one. Returns the final parameters.
  """
  from aesalign_jax import checkpointing, metrics as metrics_lib
  validate(c, kind)
  optimizer, lr = optim.make_optimizer(c.optim, c.steps, init_params)
  if kind == 'align' and c.online_reference and ref_params is None:
    ref_params = jax.tree.map(jnp.array, init_params)   # a frozen copy of the start

  abstract = jax.eval_shape(lambda p, r: init_state(p, optimizer, seed, r), init_params,
                            ref_params)
  specs = state_specs(abstract, model_cfg, mesh, rules)
  shardings = sharding.named(mesh, specs)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  step_fn = make_train_step(model_cfg, c, kind, optimizer, lr)

  def sharded_step(state, batch):
    with sharding.activation_rules(mesh, rules):
      return step_fn(state, batch)

  train_step = jax.jit(sharded_step, in_shardings=(shardings, None),
                       out_shardings=(shardings, None), donate_argnums=(0,))

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    save_interval_steps=c.checkpoint_every,
                                    max_to_keep=c.keep_checkpoints,
                                    async_save=c.async_checkpoints)
  restored = ckpt.restore(abstract, iterators)
  if restored is None:
    state = jax.jit(lambda p, r: init_state(p, optimizer, seed, r),
                    out_shardings=shardings)(init_params, ref_params)
    start = 0
    logging.info('%s: starting from step 0', kind)
  else:
    start, state = restored
    logging.info('%s: resumed from the checkpoint at step %d', kind, start)

  examples_per_step = c.batch_size + (c.groups_per_step * c.u * c.v if kind == 'align' else 0)
  texts_per_step = c.batch_size + (c.groups_per_step if kind == 'align' else 0)
  logger = metrics_lib.MetricLogger(
      workdir, total_steps=c.steps, log_every=c.log_every, start_step=start,
      flops_per_step=metrics_lib.clip_flops(model_cfg, images=examples_per_step,
                                            texts=texts_per_step),
      peak_tflops_per_device=c.peak_tflops_per_device)
  preemption = Preemption().install()
  history, status = [], 'finished'
  try:
    for step in range(start, c.steps):
      done = step + 1
      t0 = time.perf_counter()
      host = {name: {k: batch[k] for k in DEVICE_KEYS[name]}
              for name, batch in ((n, next(it)) for n, it in iterators.items())}
      data_wait = time.perf_counter() - t0
      state, step_metrics = train_step(state, to_global(host, mesh, rules))
      record = logger.log_step(done, step_metrics, examples=examples_per_step,
                               data_wait_s=data_wait)
      stopping = preemption.should_stop(done)
      if record is not None:
        _check_finite(state)
        history.append(record)
        if on_log:
          on_log(done, record)
      if done % c.checkpoint_every == 0 or done == c.steps or stopping:
        _check_finite(state)        # never checkpoint a state past a non-finite step
        ckpt.save(done, state, iterators, force=True)
        if on_save:
          on_save(done)
      if stopping:
        status = 'preempted'
        break
  finally:
    preemption.uninstall()
    ckpt.close()
    logger.close()
  final_step = int(jax.device_get(state['step']))
  return RunResult(params=state['params'], step=final_step, status=status, history=history)


def _check_finite(state) -> None:
  bad = int(jax.device_get(state['bad_step']))
  if bad >= 0:
    raise NonFiniteError(f'non-finite loss or gradient at step {bad}; training stopped, the '
                         'last checkpoint (before that step) is intact')
