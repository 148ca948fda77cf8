"""The optimizer: AdamW, linear warmup + cosine decay, global-norm clipping, weight decay masked
off norms, biases and scalars, per-tower learning-rate multipliers and frozen towers (LiT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

TOWERS = ('vision', 'text')


def default_config() -> ml_collections.ConfigDict:
  """Config section `optim` (inside `pretrain` and `align`)."""
  c = ml_collections.ConfigDict()
  c.lr = 5e-4              # peak learning rate
  c.warmup_steps = 100     # linear warmup from 0 to lr
  c.end_lr_ratio = 0.0     # cosine decays to lr * end_lr_ratio at the last step
  c.weight_decay = 0.1     # AdamW decay on matrices and embeddings only
  c.b1 = 0.9
  c.b2 = 0.98              # CLIP's beta2: steadier with large contrastive batches
  c.eps = 1e-6
  c.grad_clip_norm = 1.0   # global-norm clipping; 0 disables
  c.vision_lr_mult = 1.0   # per-tower learning-rate multipliers
  c.text_lr_mult = 1.0
  c.freeze = ''            # '' | 'vision' | 'text': that tower gets no update (LiT: 'vision')
  return c


def validate(c, prefix: str) -> None:
  if c.lr <= 0:
    raise ValueError(f'config.{prefix}.lr={c.lr} must be > 0')
  if c.warmup_steps < 0:
    raise ValueError(f'config.{prefix}.warmup_steps={c.warmup_steps} must be >= 0')
  if not 0 <= c.end_lr_ratio <= 1:
    raise ValueError(f'config.{prefix}.end_lr_ratio={c.end_lr_ratio} must be in [0, 1]')
  if c.freeze not in ('',) + TOWERS:
    raise ValueError(f'config.{prefix}.freeze={c.freeze!r}: expected "", "vision" or "text"')
  for tower in TOWERS:
    if getattr(c, f'{tower}_lr_mult') < 0:
      raise ValueError(f'config.{prefix}.{tower}_lr_mult must be >= 0')


def schedule(c, total_steps: int) -> optax.Schedule:
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=c.lr * c.end_lr_ratio)


def global_norm(tree):
  """The global L2 norm of a gradient tree (the figure grad_norm logs and the guard checks)."""
  tree_lib = getattr(optax, 'tree', None)   # optax >= 0.2.5; global_norm is deprecated there
  return tree_lib.norm(tree) if tree_lib and hasattr(tree_lib, 'norm') else optax.global_norm(tree)


def _tower_multipliers(c, params) -> dict:
  mult = {'vision': c.vision_lr_mult, 'text': c.text_lr_mult}
  if c.freeze:
    mult[c.freeze] = 0.0
  return {k: jax.tree.map(lambda _: mult.get(k, 1.0), v) for k, v in params.items()}


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(c, total_steps: int, params) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
  """optax chain for a parameter tree (nested dict with 'vision', 'text', 'logit_scale')."""
  lr = schedule(c, total_steps)
  decay_mask = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  mult = _tower_multipliers(c, params)
  frozen = jax.tree.map(lambda m: 0.0 if m == 0.0 else 1.0, mult)
  chain = [_scale_by_tree(frozen)]   # frozen grads out before clipping sees them
  if c.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(c.grad_clip_norm))
  chain += [
      optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
      optax.add_decayed_weights(c.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr),
      _scale_by_tree(mult),
  ]
  return optax.chain(*chain), lr
