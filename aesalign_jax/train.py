"""Training: contrastive pretraining and ranked-DPO alignment in one jitted, sharded step.

  pretrain: L = InfoNCE (or SigLIP) on image-text batches.
  align:    L = L_dpo(listwise ranked DPO over D_po groups) + lambda * InfoNCE on image-text
            batches drawn alongside (the regulariser that keeps recall; PAPER.md).

The train state is a dict {params, opt_state, step, rng, bad_step}. `bad_step` records the first
step whose loss or gradient was not finite; from then on the step leaves the state untouched,
the host raises an error naming that step at the next check, and no checkpoint is written with
it, so the last good checkpoint stays intact.

Speed on accelerators (fit):
- The contrastive loss of a batch split over several devices runs sharded
  (losses.clip_infonce_sharded: each device scores its own rows against all gathered
  columns), so no device holds the global [B, B] similarity matrix.
- The step is compiled ahead of time (lower + compile) before step 1; the compile time and
  XLA's memory figures per device are logged in one line.
- Batches go to the device ahead of the step that uses them (`prefetch_to_device`), while the
  previous step runs. Checkpoints store each iterator's position right after the batch of the
  step they hold, never a position past a batch that was only prefetched; and no batch past a
  due checkpoint is read before that checkpoint is written.
- Inside the loop the host reads the device only where it means to: metrics every
  `log_every` steps and the NaN flag, each with an explicit jax.device_get (tests run the
  loop under jax.transfer_guard('disallow')).
"""

from __future__ import annotations

import collections
import dataclasses
import json
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


CONTRASTIVE_IMPLS = ('auto', 'dense', 'sharded')


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
  # InfoNCE over a batch split across devices: 'dense' computes the global [B, B] logits (on
  # every device); 'sharded' all-gathers the embeddings and each device scores only its own
  # rows (losses.clip_infonce_sharded; same loss and gradients); 'auto' = sharded when the
  # mesh has more than one device on the batch axes, else dense. SigLIP is always dense.
  c.contrastive_impl = 'auto'
  c.contrastive_row_chunk = 0  # sharded InfoNCE: local rows per logits block (0 = all at once)
  c.prefetch_to_device = 1     # batches put on device ahead of the running step (0 = none)
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
  impl = c.get('contrastive_impl', 'auto')
  if impl not in CONTRASTIVE_IMPLS:
    raise ValueError(f'config.{p}.contrastive_impl={impl!r}: expected one of '
                     f'{", ".join(CONTRASTIVE_IMPLS)}')
  if impl == 'sharded' and c.loss != 'infonce':
    raise ValueError(f'config.{p}.contrastive_impl=sharded needs config.{p}.loss=infonce '
                     f'(got {c.loss!r}); use auto or dense')
  for key in ('contrastive_row_chunk', 'prefetch_to_device'):
    if c.get(key, 0) < 0:
      raise ValueError(f'config.{p}.{key}={c[key]} must be >= 0')
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


@dataclasses.dataclass(frozen=True)
class ShardedContrastive:
  """Where the sharded InfoNCE runs: the mesh, the mesh axes of the batch, the row block."""
  mesh: Any
  batch_axes: tuple
  row_chunk: int = 0


def contrastive_sharding(c, mesh, rules) -> Optional[ShardedContrastive]:
  """Resolves config `contrastive_impl` for this mesh: None = the dense loss."""
  impl = c.get('contrastive_impl', 'auto')
  if impl == 'dense' or c.loss != 'infonce':
    return None
  if mesh is None:
    if impl == 'sharded':
      raise ValueError('contrastive_impl=sharded needs the mesh (make_train_step(mesh=...))')
    return None
  axes = sharding.batch_axes(rules)
  if not axes or (impl == 'auto' and sharding.batch_devices(mesh, rules) == 1):
    if impl == 'sharded':
      logging.warning('contrastive_impl=sharded: the batch is not split over any mesh axis '
                      '(rules map "batch" to %r); using the dense loss', axes)
    return None
  return ShardedContrastive(mesh, axes, int(c.get('contrastive_row_chunk', 0)))


def contrastive_loss(cfg: clip.ClipConfig, params, pairs, *, kind: str, label_smoothing: float,
                     shard: Optional[ShardedContrastive] = None):
  """InfoNCE (or SigLIP) on a batch {'image' uint8, 'ids', 'eos_index'}; `shard` (from
  contrastive_sharding) computes InfoNCE without a [B, B] matrix per device."""
  model = clip.bind(cfg, params)
  img, txt, scale = model(normalize_on_device(pairs['image']), pairs['ids'], pairs['eos_index'])
  if kind == 'siglip':
    return losses.siglip_loss(img, txt, scale, params.get('logit_bias', -10.0))
  return _infonce(img, txt, scale, label_smoothing, shard)


def _infonce(img, txt, scale, label_smoothing: float, shard: Optional[ShardedContrastive]):
  if shard is not None:
    return losses.clip_infonce_sharded(img, txt, scale, mesh=shard.mesh,
                                       batch_axes=shard.batch_axes,
                                       label_smoothing=label_smoothing,
                                       row_chunk=shard.row_chunk)
  return losses.clip_infonce(img, txt, scale, label_smoothing=label_smoothing)


def _concat_per_shard(arrays, shards: int):
  """Concatenates batches along dim 0 so that each device's block holds its own rows of every
  batch (no data moves between devices); returns the result and each batch's rows per shard."""
  parts = [x.reshape((shards, x.shape[0] // shards) + x.shape[1:]) for x in arrays]
  joined = jnp.concatenate(parts, axis=1)
  return joined.reshape((-1,) + joined.shape[2:]), [p.shape[1] for p in parts]


def _split_per_shard(joined, sizes, shards: int):
  """Inverse of _concat_per_shard."""
  blocks = joined.reshape((shards, sum(sizes)) + joined.shape[1:])
  starts = np.cumsum([0] + list(sizes))
  return [blocks[:, a:b].reshape((-1,) + blocks.shape[2:]) for a, b in zip(starts, starts[1:])]


def encode_pairs_and_groups(cfg: clip.ClipConfig, params, pairs, groups, shards: int = 1):
  """One image pass and one text pass over the contrastive pairs and the D_po groups together
  (half the compiled graph of two passes, and larger matmuls): (pair image, pair text,
  group images [G, N, D], group queries [G, D], logit scale)."""
  model = clip.bind(cfg, params)
  g, n = groups['images'].shape[:2]
  group_images = groups['images'].reshape((g * n,) + groups['images'].shape[2:])
  images, image_sizes = _concat_per_shard([pairs['image'], group_images], shards)
  ids, text_sizes = _concat_per_shard([pairs['ids'], groups['ids']], shards)
  eos, _ = _concat_per_shard([pairs['eos_index'], groups['eos_index']], shards)
  img_pairs, img_groups = _split_per_shard(model.encode_image(normalize_on_device(images)),
                                           image_sizes, shards)
  txt_pairs, txt_groups = _split_per_shard(model.encode_text(ids, eos), text_sizes, shards)
  return img_pairs, txt_pairs, img_groups.reshape(g, n, -1), txt_groups, jnp.exp(
      params['logit_scale'])


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
  return _ranked_dpo(scores, ref_scores, scale, c)


def _ranked_dpo(scores, ref_scores, scale, c):
  mask = losses.pair_mask(c.u, c.v, c.pair_rule)
  # tau is held fixed for the preference term: DPO must not win by sharpening the temperature.
  return losses.ranked_dpo(scores, ref_scores, mask, beta=c.beta, loss_type=c.dpo_loss,
                           label_smoothing=c.dpo_label_smoothing,
                           temperature_scale=jax.lax.stop_gradient(scale))


# ------------------------------------------------------------------------------------- step


def _contrastive_metrics(closs, caux) -> dict:
  return {'contrastive_loss': closs, **{f'contrastive/{k}': v for k, v in caux.items()}}


def make_loss_fn(cfg: clip.ClipConfig, c, kind: str, mesh=None, rules=None):
  """loss(params, batch, ref_params) -> (loss, metrics) for one (micro-)batch.

  mesh, rules: the mesh the step runs on; with them (and contrastive_impl auto or sharded)
  InfoNCE runs sharded over the batch axes. Without them it is dense.
  """
  rules = sharding.DEFAULT_RULES if rules is None else rules
  shard = contrastive_sharding(c, mesh, rules)
  shards = sharding.batch_devices(mesh, rules)

  def loss_fn(params, batch, ref_params):
    params = _maybe_freeze(params, c.optim.freeze)
    if kind == 'pretrain':
      closs, caux = contrastive_loss(cfg, params, batch['pairs'], kind=c.loss,
                                     label_smoothing=c.label_smoothing, shard=shard)
      return closs, _contrastive_metrics(closs, caux)
    groups = batch['groups']
    if c.online_reference:
      ref_scores, _ = group_scores(cfg, jax.lax.stop_gradient(ref_params), groups)
    else:
      ref_scores = groups['ref_scores']
    if c.lam == 0:   # lambda = 0: no contrastive pass at all
      dloss, daux = dpo_loss(cfg, params, groups, ref_scores, c)
      return dloss, {'dpo_loss': dloss, **daux}
    img, txt, group_img, group_txt, scale = encode_pairs_and_groups(
        cfg, params, batch['pairs'], groups, shards)
    closs, caux = _infonce(img, txt, scale, c.label_smoothing, shard)
    scores = jnp.einsum('gd,gnd->gn', group_txt, group_img)
    dloss, daux = _ranked_dpo(scores, ref_scores, scale, c)
    return dloss + c.lam * closs, {**_contrastive_metrics(closs, caux), 'dpo_loss': dloss,
                                   **daux}

  return loss_fn


def make_train_step(cfg: clip.ClipConfig, c, kind: str, optimizer, lr_schedule, *,
                    mesh=None, rules=None):
  """step(state, batch) -> (state, metrics); mesh and rules as make_loss_fn."""
  loss_fn = make_loss_fn(cfg, c, kind, mesh, rules)
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
  checkpoint has read exactly the data of the steps it saved.
  """

  def __init__(self, iterators: dict, put: Callable[[dict], dict], *, first: int, last: int,
               depth: int):
    self._iterators, self._put, self._depth = iterators, put, depth
    self._next, self._last = first, last
    self._queue: collections.deque = collections.deque()

  def _pull(self):
    host = {name: {k: batch[k] for k in DEVICE_KEYS[name]}
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


def _next_checkpoint(step: int, c) -> int:
  """The first step >= `step` that checkpoints on schedule (an interval step or the last)."""
  return min(-(-step // c.checkpoint_every) * c.checkpoint_every, c.steps)


@dataclasses.dataclass
class RunResult:
  params: Any
  step: int
  status: str        # 'finished' | 'preempted'
  history: list      # the logged metric dicts
  compile_info: dict = dataclasses.field(default_factory=dict)   # compile_report's dict


def fit(*, kind: str, c, model_cfg: clip.ClipConfig, init_params, iterators: dict,
        mesh, rules, workdir: str, seed: int = 0, ref_params=None,
        on_log: Optional[Callable[[int, dict], None]] = None,
        on_save: Optional[Callable[[int], None]] = None) -> RunResult:
  """Runs (or resumes) training; `iterators` are grain iterators named 'pairs' [and 'groups'].

  Checkpoints (state + every iterator's position) go to workdir/checkpoints; a restart with
  the same workdir continues from the latest one. Returns the final parameters (sharded as
  state_specs says), the logged records and compile_report's figures.

  The step is compiled ahead of time for the first batch's shapes: every batch must have
  them (grain batches with drop_remainder). A record's time/data_wait_s is the host time
  the loop spent reading and putting batches during that step (overlapped with the device
  when read ahead).
  """
  from aesalign_jax import checkpointing, metrics as metrics_lib
  validate(c, kind)
  for name, it in iterators.items():
    if not hasattr(it, 'get_state'):
      raise TypeError(f'fit: iterator {name!r} ({type(it).__name__}) has no get_state(); '
                      'checkpoints need grain iterators (or ones with get_state/set_state)')
  optimizer, lr = optim.make_optimizer(c.optim, c.steps, init_params)

  abstract = jax.eval_shape(lambda p, r: init_state(p, optimizer, seed, r), init_params,
                            ref_params)
  if kind == 'align' and c.online_reference and ref_params is None:
    abstract['ref_params'] = abstract['params']   # a frozen copy of the start (init below)
  specs = state_specs(abstract, model_cfg, mesh, rules)
  shardings = sharding.named(mesh, specs)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  step_fn = make_train_step(model_cfg, c, kind, optimizer, lr, mesh=mesh, rules=rules)

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
    state = _initial_state(init_params, ref_params, abstract, shardings, optimizer, seed)
    start = 0
    logging.info('%s: starting from step 0', kind)
  else:
    start, state = restored
    logging.info('%s: resumed from the checkpoint at step %d', kind, start)

  prefetcher = DevicePrefetcher(iterators, lambda host: to_global(host, mesh, rules),
                                first=start + 1, last=c.steps,
                                depth=c.get('prefetch_to_device', 1))
  compile_info, batch_shapes = {}, None
  if start < c.steps:
    # Ahead-of-time compile for the first batch's shapes (its transfer overlaps the compile).
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding),
                                prefetcher.peek())
    t0 = time.perf_counter()
    train_step = train_step.lower(abstract, batch_shapes).compile()
    line, compile_info = compile_report(train_step, time.perf_counter() - t0)
    logging.info('%s: train step %s', kind, line)

  examples_per_step = c.batch_size + (c.groups_per_step * c.u * c.v if kind == 'align' else 0)
  texts_per_step = c.batch_size + (c.groups_per_step if kind == 'align' else 0)
  logger = metrics_lib.MetricLogger(
      workdir, total_steps=c.steps, log_every=c.log_every, start_step=start,
      flops_per_step=metrics_lib.clip_flops(model_cfg, images=examples_per_step,
                                            texts=texts_per_step),
      peak_tflops_per_device=c.peak_tflops_per_device, compile_steps=0)
  preemption = Preemption().install()
  history, status = [], 'finished'
  logger.reset_timer()   # step 1's time starts here, not at the logger's own setup
  try:
    for step in range(start, c.steps):
      done = step + 1
      pulled, data_wait = prefetcher.pop()
      _check_batch_shapes(pulled.batch, batch_shapes, done)
      state, step_metrics = train_step(state, pulled.batch)   # dispatched; runs on device
      stopping = preemption.should_stop(done)
      if not stopping:   # the next batches travel while this step runs
        data_wait += prefetcher.fill(limit=_next_checkpoint(done, c))
      record = logger.log_step(done, step_metrics, examples=examples_per_step,
                               data_wait_s=data_wait)
      if record is not None:
        _check_finite(state)
        history.append(record)
        if on_log:
          on_log(done, record)
      if done % c.checkpoint_every == 0 or done == c.steps or stopping:
        _check_finite(state)        # never checkpoint a state past a non-finite step
        # The positions right after this step's batch: batches read ahead are not consumed.
        ckpt.save(done, state, pulled.positions, force=True)
        if on_save:
          on_save(done)
        if not stopping:
          prefetcher.fill(limit=_next_checkpoint(done + 1, c))
      if stopping:
        status = 'preempted'
        break
  finally:
    preemption.uninstall()
    ckpt.close()
    logger.close()
  final_step = int(jax.device_get(state['step']))
  return RunResult(params=state['params'], step=final_step, status=status, history=history,
                   compile_info=compile_info)


def _initial_state(init_params, ref_params, abstract, shardings, optimizer, seed: int) -> dict:
  """The step-0 state on the mesh; host arrays go over with explicit device_puts."""
  params = jax.device_put(init_params, shardings['params'])
  if ref_params is not None:
    ref = jax.device_put(ref_params, shardings['ref_params'])
  else:   # the online reference is a copy of the start (the jit's outputs are new buffers)
    ref = params if 'ref_params' in abstract else None
  return jax.jit(lambda p, r: init_state(p, optimizer, seed, r),
                 out_shardings=shardings)(params, ref)


def _check_batch_shapes(batch, expected, step: int) -> None:
  got = jax.tree.map(lambda x: (x.shape, x.dtype), batch)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), expected)
  if got != want:
    raise ValueError(f'the batch of step {step} has shapes {got}, the step was compiled for '
                     f'{want}; batch with drop_remainder=True')


def _check_finite(state) -> None:
  bad = int(jax.device_get(state['bad_step']))
  if bad >= 0:
    raise NonFiniteError(f'non-finite loss or gradient at step {bad}; training stopped, the '
                         'last checkpoint (before that step) is intact')
