"""Training metrics: console lines, a progress bar, TensorBoard and JSON Lines; model FLOPs.

    flops = clip_flops(cfg, images=n_images, texts=n_texts)          # per train step
    logger = MetricLogger(workdir, total_steps=10_000, log_every=50, start_step=restored,
                          flops_per_step=flops, peak_tflops_per_device=197.0)
    logger.reset_timer()
    for step in range(restored + 1, total + 1):
      t = time.perf_counter(); batch = next(it); wait = time.perf_counter() - t
      state, metrics = train_step(state, batch)
      logger.log_step(step, metrics, examples=batch_size, data_wait_s=wait)
    logger.close()

Every `log_every` steps (and at the first and the last step) the logger averages the
metrics of the steps since the last line and writes one record:
  - a console line (through tqdm.write while a progress bar is shown, when stderr is a
    terminal; plain lines otherwise),
  - TensorBoard scalars (tensorboardX event files in `workdir`),
  - one JSON object per line in `workdir/metrics.jsonl`: {"step": ..., <metric>: ...}.
Metrics stay on the device between lines: the logger fetches them only when it writes, so
logging does not stall the asynchronous dispatch of train steps.

Timing. The logger measures wall time between log_step calls. The first `compile_steps`
steps after construction (or any step passed with compiling=True) are compile steps: the
logger waits for their result, reports their time as time/compile_s, and leaves them out of
every throughput figure. Throughput over an interval is
  examples/s  = examples of its steps / their wall time
  TFLOP/s     = flops_per_step * steps / wall time / 1e12   (all devices together)
  MFU         = TFLOP/s per device / peak_tflops_per_device
Call reset_timer() after work that is not a train step (evaluation, setup) so that its time
is not counted as step time.

Resume. With start_step=s, records with step > s are dropped from metrics.jsonl (they
belong to steps that will be run again) and TensorBoard is told to purge events after s, so
a restarted run never shows a step twice.

Only the main process (process 0) writes anything; other processes' loggers do nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, TextIO

import jax
import numpy as np

from aesalign_jax.models.clip import ClipConfig

JSONL_NAME = 'metrics.jsonl'


# Analytic FLOPs.

def _transformer_macs(tokens: int, width: int, mlp: int, layers: int) -> int:
  # Per layer: q, k, v and output projections (4 t w^2), the MLP (2 t w m), attention
  # scores q k^T and the weighted sum of values (2 t^2 w, over all heads together).
  return layers * (4 * tokens * width ** 2 + 2 * tokens * width * mlp + 2 * tokens ** 2 * width)


def clip_flops(cfg: ClipConfig, *, images: int, texts: int, backward: bool = True,
               text_length: Optional[int] = None) -> float:
  """FLOPs to encode `images` images and `texts` texts (forward, or forward + backward).

  Counts matrix multiplications and attention, 2 FLOPs per multiply-accumulate:
    image: n = num_patches + 1 tokens, width w, MLP m, L layers, patch p
      MACs = num_patches * 3 p^2 * w               (patch embedding; with the conv stem,
                                                    its 3x3 layers and a 1x1 map into w)
           + L * (4 n w^2 + 2 n w m + 2 n^2 w)     (blocks: projections, MLP, attention)
           + w * embed_dim                         (projection of the class token)
    text: t = text_length (default context_length) tokens, the same per block, plus
           w * embed_dim for the projection of the pooled token (token lookup: no FLOPs).
  Causal attention is counted in full (XLA computes the whole t x t score matrix).
  Left out: layer norms, activations, softmax, residual adds (a few % of the total on the
  tiny model, less on larger ones) and the loss's similarity matrix.
  backward=True adds the backward pass as 2x the forward (grads of activations and weights),
  i.e. returns 3x the forward FLOPs, the convention of MFU reports.
  """
  n = cfg.num_patches + 1
  stem_macs, side, cin = 0, cfg.image_size, 3
  for cout in cfg.stem_channels:            # the conv stem's 3x3 stride-2 layers
    side //= 2
    stem_macs += side * side * 9 * cin * cout
    cin = cout
  kernel = 1 if cfg.stem_channels else cfg.patch_size
  image_macs = (stem_macs + cfg.num_patches * cin * kernel ** 2 * cfg.vision_width
                + _transformer_macs(n, cfg.vision_width, cfg.vision_mlp, cfg.vision_layers)
                + cfg.vision_width * cfg.embed_dim)
  t = cfg.context_length if text_length is None else text_length
  text_macs = (_transformer_macs(t, cfg.text_width, cfg.text_mlp, cfg.text_layers)
               + cfg.text_width * cfg.embed_dim)
  forward = 2.0 * (images * image_macs + texts * text_macs)
  return forward * (3.0 if backward else 1.0)


# Logging.

def _fmt(value: float) -> str:
  if value != 0 and math.isfinite(value) and abs(value) < 1e-3:
    return f'{value:.2e}'
  return f'{value:.4g}'


def _fmt_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def _to_float(value: Any) -> float:
  return float(np.mean(np.asarray(value, dtype=np.float64)))


def truncate_jsonl(path: str, last_step: int) -> int:
  """Rewrites a metrics JSONL file keeping records with step <= last_step; returns how many
  were dropped (a torn last line, from a crash mid-write, counts as dropped)."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
        keep = int(record['step']) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(tmp, path)   # atomic: a crash now leaves the old or the new file, never half
  return dropped


class MetricLogger:
  """Per-interval console lines, progress bar, TensorBoard scalars and metrics.jsonl."""

  def __init__(self, workdir, *, total_steps: int, log_every: int,
               is_main_process: Optional[bool] = None, start_step: int = 0,
               flops_per_step: Optional[float] = None,
               peak_tflops_per_device: Optional[float] = None,
               num_devices: Optional[int] = None, compile_steps: int = 1,
               progress_bar: Optional[bool] = None, stream: Optional[TextIO] = None,
               clock: Callable[[], float] = time.perf_counter):
    """Creates the writers (main process only).

    Args:
      workdir: directory for the TensorBoard event files and metrics.jsonl.
      total_steps: the run's last step (progress bar, ETA, a line at the end).
      log_every: steps per record.
      is_main_process: write anything at all; default jax.process_index() == 0.
      start_step: the step training resumes from (0 for a fresh run): later records of an
        earlier run are dropped.
      flops_per_step: FLOPs of one train step over all devices (clip_flops); enables TFLOP/s.
      peak_tflops_per_device: the accelerator's peak; enables MFU (0 or None: not shown).
      num_devices: devices the step runs on; default jax.device_count().
      compile_steps: first steps after construction treated as compile steps.
      progress_bar: a tqdm bar on stderr; default: when stderr is a terminal.
      stream: where console lines go; default sys.stdout.
      clock: seconds, monotonic (tests pass a fake one).
    """
    if log_every <= 0:
      raise ValueError(f'logging.log_every must be positive, got {log_every}')
    self.workdir = os.fspath(workdir)
    self.total_steps = total_steps
    self.log_every = log_every
    self.is_main_process = (jax.process_index() == 0 if is_main_process is None
                            else is_main_process)
    self.flops_per_step = flops_per_step
    self.peak_tflops_per_device = peak_tflops_per_device or None
    self.num_devices = num_devices or jax.device_count()
    self._compile_steps_left = compile_steps
    self._stream = stream
    self._clock = clock
    # A fresh run logs its first step (early feedback); a resumed one logs on the interval
    # boundaries only, so that its records average the same steps as an uninterrupted run's.
    self._first_step = start_step == 0
    self._reset_interval()
    self._last_time = clock()
    self._tb = self._jsonl = self._bar = None
    if not self.is_main_process:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self.jsonl_path = os.path.join(self.workdir, JSONL_NAME)
    truncate_jsonl(self.jsonl_path, start_step)
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    import tensorboardX  # pylint: disable=g-import-not-at-top  (main process only)
    # purge_step: TensorBoard discards events of steps >= it written by an earlier run.
    self._tb = tensorboardX.SummaryWriter(self.workdir, purge_step=start_step + 1,
                                          flush_secs=30)
    if progress_bar is None:
      progress_bar = sys.stderr.isatty()
    if progress_bar:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=sys.stderr,
                            dynamic_ncols=True, unit='step')

  def _reset_interval(self):
    self._pending: list[Mapping[str, Any]] = []
    self._steps = 0          # non-compile steps in the interval
    self._seconds = 0.0      # their wall time
    self._examples = 0
    self._data_wait = 0.0
    self._compile_seconds = 0.0

  def reset_timer(self):
    """Starts step timing now: time since the last step (evaluation, setup) is not counted."""
    self._last_time = self._clock()

  def log_step(self, step: int, metrics: Mapping[str, Any], *, examples: int,
               data_wait_s: float = 0.0, compiling: Optional[bool] = None
               ) -> Optional[dict[str, float]]:
    """Records one finished train step; writes a record on log steps and returns it.

    Args:
      step: the step just run (1-based: the number of updates applied).
      metrics: name -> scalar (jax arrays are fine: fetched only on log steps), e.g. loss,
        rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, grad_norm, lr.
      examples: examples in this step over all processes (for examples/s).
      data_wait_s: seconds this step waited for its batch.
      compiling: this step compiled (default: the first compile_steps steps).
    """
    if not self.is_main_process:
      return None
    if compiling is None:
      compiling = self._compile_steps_left > 0
    self._compile_steps_left -= 1
    self._pending.append(metrics)
    write = (self._first_step or step % self.log_every == 0 or step >= self.total_steps)
    self._first_step = False
    if compiling or write:
      # Wait for the step to finish so that its time lands in this interval.
      fetched = jax.device_get(self._pending)
    now = self._clock()
    elapsed, self._last_time = now - self._last_time, now
    if compiling:
      self._compile_seconds += elapsed
    else:
      self._steps += 1
      self._seconds += elapsed
      self._examples += examples
      self._data_wait += data_wait_s
    if self._bar is not None:
      self._bar.update(1)
    if not write:
      return None
    record = self._record(step, fetched)
    self._emit(step, record)
    self._reset_interval()
    self._last_time = self._clock()   # the writing itself is not step time
    return record

  def _record(self, step: int, fetched: list[Mapping[str, Any]]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for metrics in fetched:
      for name, value in metrics.items():
        sums[name] = sums.get(name, 0.0) + _to_float(value)
    # The caller's key order (device_get sorts dict keys), losses first, then DPO rewards.
    names = list(dict.fromkeys(k for metrics in self._pending for k in metrics))
    names.sort(key=lambda k: 0 if 'loss' in k else 1 if k.startswith('rewards/') else 2)
    record: dict[str, float] = {'step': step}
    record.update({name: sums[name] / len(fetched) for name in names})
    if self._compile_seconds:
      record['time/compile_s'] = self._compile_seconds
    if self._steps and self._seconds > 0:
      record['time/step_s'] = self._seconds / self._steps
      record['time/data_wait_s'] = self._data_wait / self._steps
      record['perf/examples_per_s'] = self._examples / self._seconds
      if self.flops_per_step:
        tflops = self.flops_per_step * self._steps / self._seconds / 1e12
        record['perf/tflops_per_s'] = tflops
        record['perf/tflops_per_s_per_device'] = tflops / self.num_devices
        if self.peak_tflops_per_device:
          record['perf/mfu'] = tflops / self.num_devices / self.peak_tflops_per_device
    return record

  def _console_line(self, step: int, record: Mapping[str, float]) -> str:
    parts = [f'step {step}/{self.total_steps}']
    parts += [f'{k} {_fmt(v)}' for k, v in record.items()
              if k != 'step' and not k.startswith(('time/', 'perf/'))]
    if 'time/compile_s' in record:
      parts.append(f'compile {record["time/compile_s"]:.1f}s')
    if 'time/step_s' in record:
      parts.append(f'{record["time/step_s"]:.3g} s/step (data {record["time/data_wait_s"]:.2g} s)')
      parts.append(f'{record["perf/examples_per_s"]:.4g} ex/s')
      if 'perf/tflops_per_s' in record:
        parts.append(f'{record["perf/tflops_per_s"]:.3g} TFLOP/s')
      if 'perf/mfu' in record:
        parts.append(f'MFU {100 * record["perf/mfu"]:.1f}%')
      remaining = max(self.total_steps - step, 0)
      if remaining:
        parts.append(f'eta {_fmt_duration(remaining * record["time/step_s"])}')
    return ' | '.join(parts)

  def _emit(self, step: int, record: Mapping[str, float], line: Optional[str] = None):
    line = line or self._console_line(step, record)
    if self._bar is not None:
      self._bar.write(line, file=self._stream or sys.stdout)
      if 'loss' in record:
        self._bar.set_postfix_str(f'loss {_fmt(record["loss"])}', refresh=False)
    else:
      print(line, file=self._stream or sys.stdout, flush=True)
    for name, value in record.items():
      if name != 'step':
        self._tb.add_scalar(name, value, step)
    self._tb.flush()
    self._jsonl.write(json.dumps(dict(record)) + '\n')
    self._jsonl.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, prefix: str = ''):
    """Writes other scalars (e.g. evaluation results, as prefix 'eval/') at `step`."""
    if not self.is_main_process:
      return
    record = {'step': step, **{prefix + k: _to_float(v) for k, v in scalars.items()}}
    line = ' | '.join([f'step {step}'] + [f'{k} {_fmt(v)}' for k, v in record.items()
                                          if k != 'step'])
    self._emit(step, record, line)

  def close(self):
    """Flushes and closes the writers (and the progress bar)."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
