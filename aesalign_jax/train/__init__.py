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

Modules, one job each:
  config      default_config(kind), validate(c, kind)
  objectives  the losses of each kind, registered by name (register_objective)
  step        the jitted train step: gradient accumulation, update, NaN guard, AOT compile
  state       the train state dict, its shardings and initialisation
  host        SIGTERM handling, device prefetch, the XLA memory report
  loop        fit() and RunResult
"""

from aesalign_jax.train.config import CONTRASTIVE_IMPLS, default_config, validate
from aesalign_jax.train.host import (DevicePrefetcher, IteratorPosition, Preemption,
                                     compile_report, to_global)
from aesalign_jax.train.loop import RunResult, fit
from aesalign_jax.train.objectives import (DEVICE_KEYS, IMAGE_MEAN, IMAGE_STD, OBJECTIVES,
                                           LossFn, Objective, ShardedContrastive,
                                           concat_per_shard, contrastive_loss,
                                           contrastive_sharding, dpo_loss,
                                           encode_pairs_and_groups, get_objective,
                                           group_scores, make_loss_fn, normalize_on_device,
                                           register_objective, split_per_shard)
from aesalign_jax.train.state import init_state, initial_state, state_specs
from aesalign_jax.train.step import (MAX_LOG_SCALE, NonFiniteError, check_finite,
                                     make_train_step)

__all__ = [
    'CONTRASTIVE_IMPLS', 'DEVICE_KEYS', 'DevicePrefetcher', 'IMAGE_MEAN', 'IMAGE_STD',
    'IteratorPosition', 'LossFn', 'MAX_LOG_SCALE', 'NonFiniteError', 'OBJECTIVES', 'Objective',
    'Preemption', 'RunResult', 'ShardedContrastive', 'check_finite', 'compile_report',
    'concat_per_shard', 'contrastive_loss', 'contrastive_sharding', 'default_config',
    'dpo_loss', 'encode_pairs_and_groups', 'fit', 'get_objective', 'group_scores',
    'init_state', 'initial_state', 'make_loss_fn', 'make_train_step', 'normalize_on_device',
    'register_objective', 'split_per_shard', 'state_specs', 'to_global', 'validate',
]
