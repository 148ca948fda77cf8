"""The training loop: fit() runs (or resumes) one training kind to its last step."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
from absl import logging

from aesalign_jax import optim
from aesalign_jax.models import clip
from aesalign_jax.train import config as config_lib
from aesalign_jax.train import host, objectives, state as state_lib, step as step_lib


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
  config_lib.validate(c, kind)
  objective = objectives.get_objective(kind)
  for name, it in iterators.items():
    if not hasattr(it, 'get_state'):
      raise TypeError(f'fit: iterator {name!r} ({type(it).__name__}) has no get_state(); '
                      'checkpoints need grain iterators (or ones with get_state/set_state)')
  optimizer, lr = optim.make_optimizer(c.optim, c.steps, init_params)

  # The state's layout on the mesh and the jitted step.
  abstract, shardings = state_lib.sharded_abstract_state(
      init_params, ref_params, optimizer, seed, model_cfg, mesh, rules,
      online_reference=objective.online_reference(c))
  step_fn = step_lib.make_train_step(model_cfg, c, kind, optimizer, lr, mesh=mesh, rules=rules)
  train_step = step_lib.jit_train_step(step_fn, shardings, mesh, rules)

  # Resume from the latest checkpoint, else start at step 0.
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    save_interval_steps=c.checkpoint_every,
                                    max_to_keep=c.keep_checkpoints,
                                    async_save=c.async_checkpoints)
  restored = ckpt.restore(abstract, iterators)
  if restored is None:
    state = state_lib.initial_state(init_params, ref_params, abstract, shardings, optimizer,
                                    seed)
    start = 0
    logging.info('%s: starting from step 0', kind)
  else:
    start, state = restored
    logging.info('%s: resumed from the checkpoint at step %d', kind, start)

  prefetcher = host.DevicePrefetcher(iterators, lambda b: host.to_global(b, mesh, rules),
                                     first=start + 1, last=c.steps,
                                     depth=c.get('prefetch_to_device', 1),
                                     keys=objective.device_keys)
  compile_info, batch_shapes = {}, None
  if start < c.steps:
    # Ahead-of-time compile for the first batch's shapes (its transfer overlaps the compile).
    train_step, batch_shapes, seconds = step_lib.compile_ahead(train_step, abstract,
                                                               prefetcher.peek())
    line, compile_info = host.compile_report(train_step, seconds)
    logging.info('%s: train step %s', kind, line)

  examples_per_step = objective.images_per_step(c)
  logger = metrics_lib.MetricLogger(
      workdir, total_steps=c.steps, log_every=c.log_every, start_step=start,
      flops_per_step=metrics_lib.clip_flops(model_cfg, images=examples_per_step,
                                            texts=objective.texts_per_step(c)),
      peak_tflops_per_device=c.peak_tflops_per_device, compile_steps=0)
  preemption = host.Preemption().install()
  history, status = [], 'finished'
  logger.reset_timer()   # step 1's time starts here, not at the logger's own setup
  try:
    for step in range(start, c.steps):
      done = step + 1
      pulled, data_wait = prefetcher.pop()
      step_lib.check_batch_shapes(pulled.batch, batch_shapes, done)
      state, step_metrics = train_step(state, pulled.batch)   # dispatched; runs on device
      stopping = preemption.should_stop(done)
      ckpt.poll()   # logs a save's commit as soon as it is on disk
      if not stopping:   # the next batches travel while this step runs
        data_wait += prefetcher.fill(limit=_next_checkpoint(done, c))
      record = logger.log_step(done, step_metrics, examples=examples_per_step,
                               data_wait_s=data_wait)
      if record is not None:
        step_lib.check_finite(state)
        history.append(record)
        if on_log:
          on_log(done, record)
      if done % c.checkpoint_every == 0 or done == c.steps or stopping:
        step_lib.check_finite(state)   # never checkpoint a state past a non-finite step
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


def _next_checkpoint(step: int, c) -> int:
  """The first step >= `step` that checkpoints on schedule (an interval step or the last)."""
  return min(-(-step // c.checkpoint_every) * c.checkpoint_every, c.steps)
