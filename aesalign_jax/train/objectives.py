"""The training objectives, registered by name: what one (micro-)batch costs, as (loss, metrics).

  pretrain: InfoNCE (or SigLIP) on image-text batches.
  align:    listwise ranked DPO over D_po groups + lam * InfoNCE on the image-text batches
            drawn alongside (the regulariser that keeps recall; PAPER.md).

An objective is an `Objective` in OBJECTIVES under its training `kind`; the step
(make_train_step) and the loop (fit) only look it up, so a new loss is added by registering
one (register_objective) without touching either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aesalign_jax import losses, sharding
from aesalign_jax.models import clip
from input_pipeline import images as images_lib

IMAGE_MEAN = np.asarray(images_lib.CLIP_MEAN, np.float32) * 255.0
IMAGE_STD = np.asarray(images_lib.CLIP_STD, np.float32) * 255.0

# The keys of each iterator's batches that go to the device (the rest stay on the host).
DEVICE_KEYS = {'pairs': ('image', 'ids', 'eos_index'),
               'groups': ('images', 'ids', 'eos_index', 'ref_scores')}


def normalize_on_device(images_uint8):
  """uint8 -> CLIP-normalised float32, on device (4x fewer bytes cross from the host)."""
  return (images_uint8.astype(jnp.float32) - IMAGE_MEAN) / IMAGE_STD


# ------------------------------------------------------------------------------- contrastive


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
    if 'logit_bias' not in params:
      raise ValueError('loss=siglip needs a model with a learned logit bias '
                       '(clip.with_siglip_bias; config.model.overrides.logit_bias_init)')
    return losses.siglip_loss(img, txt, scale, params['logit_bias'])
  return _infonce(img, txt, scale, label_smoothing, shard)


def _infonce(img, txt, scale, label_smoothing: float, shard: Optional[ShardedContrastive]):
  if shard is not None:
    return losses.clip_infonce_sharded(img, txt, scale, mesh=shard.mesh,
                                       batch_axes=shard.batch_axes,
                                       label_smoothing=label_smoothing,
                                       row_chunk=shard.row_chunk)
  return losses.clip_infonce(img, txt, scale, label_smoothing=label_smoothing)


def _contrastive_metrics(closs, caux) -> dict:
  return {'contrastive_loss': closs, **{f'contrastive/{k}': v for k, v in caux.items()}}


# ---------------------------------------------------------------------------- ranked DPO


def concat_per_shard(arrays, shards: int):
  """Concatenates batches along dim 0 so that each device's block holds its own rows of every
  batch (no data moves between devices); returns the result and each batch's rows per shard."""
  parts = [x.reshape((shards, x.shape[0] // shards) + x.shape[1:]) for x in arrays]
  joined = jnp.concatenate(parts, axis=1)
  return joined.reshape((-1,) + joined.shape[2:]), [p.shape[1] for p in parts]


def split_per_shard(joined, sizes, shards: int):
  """Inverse of concat_per_shard."""
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
  images, image_sizes = concat_per_shard([pairs['image'], group_images], shards)
  ids, text_sizes = concat_per_shard([pairs['ids'], groups['ids']], shards)
  eos, _ = concat_per_shard([pairs['eos_index'], groups['eos_index']], shards)
  img_pairs, img_groups = split_per_shard(model.encode_image(normalize_on_device(images)),
                                          image_sizes, shards)
  txt_pairs, txt_groups = split_per_shard(model.encode_text(ids, eos), text_sizes, shards)
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


# ------------------------------------------------------------------------------- registry

# loss(params, batch, ref_params) -> (loss, metrics) for one (micro-)batch.
LossFn = Callable[[Any, dict, Any], tuple]


@dataclasses.dataclass(frozen=True)
class Objective:
  """One training kind: its loss and what the loop must know of its batches.

  make_loss(cfg, c, shard, shards) -> LossFn, where `c` is the kind's config section, `shard`
  the sharded InfoNCE's placement (contrastive_sharding; None = dense) and `shards` the
  devices the batch is split over. Frozen towers are applied before the loss sees `params`.
  images_per_step(c), texts_per_step(c): what one step encodes (throughput and FLOPs).
  online_reference(c): the state holds `ref_params`, a frozen copy of the initial parameters,
  when the caller gives none.
  device_keys: iterator name -> the keys of its batches the step reads.
  """
  make_loss: Callable[[clip.ClipConfig, Any, Optional[ShardedContrastive], int], LossFn]
  images_per_step: Callable[[Any], int] = lambda c: c.batch_size
  texts_per_step: Callable[[Any], int] = lambda c: c.batch_size
  online_reference: Callable[[Any], bool] = lambda c: False
  device_keys: Mapping[str, tuple] = dataclasses.field(default_factory=lambda: DEVICE_KEYS)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(kind: str, objective: Objective) -> Objective:
  """Makes `objective` the loss of training kind `kind` (fit(kind=...), make_train_step)."""
  if kind in OBJECTIVES:
    raise ValueError(f'an objective is already registered as {kind!r}')
  OBJECTIVES[kind] = objective
  return objective


def get_objective(kind: str) -> Objective:
  if kind not in OBJECTIVES:
    raise ValueError(f'unknown training kind {kind!r}: expected one of '
                     f'{", ".join(OBJECTIVES)} (or register_objective it)')
  return OBJECTIVES[kind]


def _maybe_freeze(params, freeze: str):
  if not freeze:
    return params
  return {**params, freeze: jax.lax.stop_gradient(params[freeze])}   # LiT: no backward there


def make_loss_fn(cfg: clip.ClipConfig, c, kind: str, mesh=None, rules=None) -> LossFn:
  """loss(params, batch, ref_params) -> (loss, metrics) for one (micro-)batch.

  mesh, rules: the mesh the step runs on; with them (and contrastive_impl auto or sharded)
  InfoNCE runs sharded over the batch axes. Without them it is dense.
  """
  rules = sharding.DEFAULT_RULES if rules is None else rules
  shard = contrastive_sharding(c, mesh, rules)
  shards = sharding.batch_devices(mesh, rules)
  loss = get_objective(kind).make_loss(cfg, c, shard, shards)

  def loss_fn(params, batch, ref_params):
    return loss(_maybe_freeze(params, c.optim.freeze), batch, ref_params)

  return loss_fn


def _pretrain_loss(cfg: clip.ClipConfig, c, shard, shards: int) -> LossFn:
  del shards

  def loss(params, batch, ref_params):
    del ref_params
    closs, caux = contrastive_loss(cfg, params, batch['pairs'], kind=c.loss,
                                   label_smoothing=c.label_smoothing, shard=shard)
    return closs, _contrastive_metrics(closs, caux)

  return loss


def _align_loss(cfg: clip.ClipConfig, c, shard, shards: int) -> LossFn:
  def loss(params, batch, ref_params):
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

  return loss


register_objective('pretrain', Objective(make_loss=_pretrain_loss))
register_objective('align', Objective(
    make_loss=_align_loss,
    images_per_step=lambda c: c.batch_size + c.groups_per_step * c.u * c.v,
    texts_per_step=lambda c: c.batch_size + c.groups_per_step,
    online_reference=lambda c: c.online_reference))
