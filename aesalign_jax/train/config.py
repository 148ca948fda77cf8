"""The `pretrain` and `align` config sections: defaults, and validation before anything compiles."""

from __future__ import annotations

import ml_collections

from aesalign_jax import optim

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
