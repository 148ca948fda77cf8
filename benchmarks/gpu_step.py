"""The one prepared GPU script (issue 14): ViT-B/16 and ViT-L/14 contrastive and align train
steps in bf16 against the chip's bf16 matmul peak measured in the same run, over the levers
still untried, in one invocation of under 10 minutes (compiles included) on one H100 / H200:

  python -m benchmarks.gpu_step --plan full --out benchmarks/results_gpu.json

writes the JSON (rewritten after every finished variant, so a killed run still leaves it) and
a .md beside it, and prints the Markdown summary.

The full plan, in order of priority (a global budget, --budget-s 540 by default, skips what is
left when it runs out and records it as skipped; each group has its own timeout too):
  base   (300 s) ViT-B/16 contrastive (pretrain) step with remat off at the largest batch
         that fits, attention 'cudnn' (jax.nn.dot_product_attention(implementation='cudnn'):
         cuDNN's flash kernel, patched in here only; the library is unchanged) and 'einsum'
         (plain XLA ops); remat on at 2x and 4x the best remat-off batch; a profile of the
         best step's top kernels; the align step at the best setting (half its batch of pairs
         + batch/32 groups of 25 images); the InfoNCE loss alone, fp32 (the library's) vs bf16
         logits; then 'fused', jax.nn.dot_product_attention's default implementation, which
         in jax <= 0.11 is XLA's own, not cuDNN: what model.attention='auto' gives on a GPU.
  l14    (170 s) ViT-L/14 contrastive (largest batch that fits, at most the best ViT-B/16
         batch) and align steps at the best setting.
  lhs    (70 s) the best ViT-B/16 step under --xla_gpu_enable_latency_hiding_scheduler=true.
  no_triton_gemm (70 s) the best ViT-B/16 step under --xla_gpu_enable_triton_gemm=false.
  dpo    (150 s) listwise vs pairwise ranked DPO at ViT-B/16 (benchmarks/dpo_speed.compare).
Each group runs in a child process with its own XLA_FLAGS (XLA reads them once, when jax
starts); a child that fails (out of memory, an unknown flag on that jax) is recorded with the
reason and the next group runs. "Largest batch that fits" is decided from XLA's own memory
figures of the compiled step (compiled.memory_analysis() against the device's bytes_limit,
XLA_PYTHON_CLIENT_MEM_FRACTION 0.9 unless set), so a batch that does not fit is not run: a
first guess from the activation sizes, then one correction along the memory line, each a
compile (an out-of-memory at the first step anyway: once more at 85% of the batch).

MFU = model FLOPs (metrics.clip_flops: forward + backward, 3x the forward; remat's recompute
is not counted) per second / the measured bf16 matmul peak (8192^2, best of 3), and also / the
chip's nominal dense bf16 peak where the device kind is known (H100 SXM and H200: 989).

A follow-up run for what the budget cut: --groups l14,dpo --context <the first results JSON>
(its measured variants are kept and decide "best"). Compiles go to a persistent cache
(--cache-dir, /tmp/aesalign_gpu_step_cache), so a rerun on the same machine skips them.

  --plan tiny   the same machinery at the tiny preset on the CPU (tests/test_benchmarks.py)
  --plan full --substitute vit_b16=tiny,vit_l14=tiny   the full plan's own actions on a CPU
  --plan single the previous script: `run` at the largest of --batches that fits (run_all's
                bench_gpu calls `run`)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

try:
  import ml_collections  # pylint: disable=unused-import
except ImportError:   # the lent GPU image has none (benchmarks/config_dict_shim.py)
  from benchmarks import config_dict_shim
  sys.modules['ml_collections'] = config_dict_shim

from aesalign_jax import losses, metrics, optim, train  # pylint: disable=g-import-not-at-top
from aesalign_jax.models import clip
from benchmarks import dpo_speed, gpu_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0 ** 30

# Dense bf16 tensor-core peaks (TFLOP/s) by device kind, most specific name first.
NOMINAL_BF16_TFLOPS = (('GH200', 989.0), ('H200', 989.0), ('H100 PCIe', 756.0),
                       ('H100 NVL', 835.0), ('H100', 989.0), ('A100', 312.0))

LHS_FLAG = '--xla_gpu_enable_latency_hiding_scheduler=true'
NO_TRITON_GEMM_FLAG = '--xla_gpu_enable_triton_gemm=false'
TARGET_MFU = 0.5   # issue 14: ViT-B/16 contrastive step >= 50% MFU


def nominal_peak_tflops(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for key, peak in NOMINAL_BF16_TFLOPS:
    if key.lower() in kind:
      return peak
  return None


# ------------------------------------------------------------------ the single-run script


def matmul_peak_tflops(dtype, n: int) -> float:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  reps = 20
  start = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def _images(rng, shape):
  """Random uint8 images (rng.bytes: about 10x faster than integers() for a GB of them)."""
  return np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape)


def measured_peak_tflops(dtype, n: int, rounds: int = 3, reps: int = 20) -> float:
  """The best of `rounds` timings of `reps` [n, n] x [n, n] products of random normal data
  (generated on the device)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = 0.0
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12)
  return best


def _batch(cfg, kind, b, groups, rng):
  s, L = cfg.image_size, cfg.context_length
  pairs = {'image': _images(rng, (b, s, s, 3)),
           'ids': rng.integers(0, cfg.vocab_size - 1, (b, L)).astype(np.int32),
           'eos_index': np.full((b,), L - 1, np.int32)}
  out = {'pairs': pairs}
  if kind == 'align':
    out['groups'] = {'images': _images(rng, (groups, 25, s, s, 3)),
                     'ids': rng.integers(0, cfg.vocab_size - 1, (groups, L)).astype(np.int32),
                     'eos_index': np.full((groups,), L - 1, np.int32),
                     'ref_scores': rng.normal(0, 0.1, (groups, 25)).astype(np.float32)}
  return jax.device_put(out)


def time_step(cfg, kind: str, batch: int, groups: int, steps: int) -> dict:
  c = train.default_config(kind)
  c.batch_size = batch
  if kind == 'align':
    c.u = c.v = 5
    c.groups_per_step = groups
  params = clip.init_params(cfg)
  tx, lr = optim.make_optimizer(c.optim, 1000, params)
  step = jax.jit(train.make_train_step(cfg, c, kind, tx, lr), donate_argnums=(0,))
  state = train.init_state(params, tx, 0)
  data = _batch(cfg, kind, batch, groups, np.random.default_rng(0))
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  state, m = compiled(state, data)
  m['loss'].block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, data)
  m['loss'].block_until_ready()
  seconds = (time.perf_counter() - start) / steps
  images = batch + (groups * 25 if kind == 'align' else 0)
  texts = batch + (groups if kind == 'align' else 0)
  flops = metrics.clip_flops(cfg, images=images, texts=texts)
  return {'kind': kind, 'batch': batch, 'groups': groups if kind == 'align' else 0,
          'step_s': seconds, 'compile_s': compile_s, 'tflops_per_s': flops / seconds / 1e12,
          'loss': float(m['loss']),
          'temp_bytes': getattr(mem, 'temp_size_in_bytes', None)}


def largest_fitting(cfg, kind, batches, groups_for, steps) -> dict:
  errors = []
  for b in batches:
    try:
      return time_step(cfg, kind, b, groups_for(b), steps)
    except Exception as e:  # out of memory: try the next smaller batch
      if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
        raise
      errors.append(b)
      print(f'{kind}: batch {b} does not fit', flush=True)
  raise RuntimeError(f'{kind}: no batch in {batches} fits')


def run(cfg: clip.ClipConfig, batches, *, steps: int = 10,
        kinds=('pretrain', 'align', 'dpo'), dpo_groups: int | None = None) -> dict:
  """Train steps of `cfg` at the largest batch of `batches` that fits, for each of `kinds`
  (pretrain, align: MFU against a matmul peak measured here; dpo: listwise vs pairwise)."""
  on_gpu = jax.default_backend() == 'gpu'
  peak = matmul_peak_tflops(jnp.dtype(cfg.dtype), 8192 if on_gpu else 1024)
  print(f'device {jax.devices()[0].device_kind}; measured matmul peak {peak:.1f} TFLOP/s',
        flush=True)
  result = {'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
            'dtype': cfg.dtype, 'matmul_peak_tflops': peak, 'jax': jax.__version__}
  for kind in [k for k in ('pretrain', 'align') if k in kinds]:
    r = largest_fitting(cfg, kind, batches, lambda b: max(1, b // 32), steps)
    r['mfu'] = r['tflops_per_s'] / peak
    result[kind] = r
    print(json.dumps(r), flush=True)
  if 'dpo' in kinds:
    # One group on GPU: the pairwise step encodes 2 images per pair (400 per group at u=v=5);
    # 8 ViT-B/16 groups asked for 227 GiB on an H100.
    groups = dpo_groups or (1 if on_gpu else 2)
    ratio = dpo_speed.compare(groups=groups, repeats=5, cfg=cfg, peak_gflops=peak * 1e3)
    result['dpo_listwise_vs_pairwise'] = ratio
    print(f"listwise/pairwise {ratio['listwise_over_pairwise']:.1f}x, with online reference "
          f"{ratio['listwise_over_pairwise_online_ref']:.1f}x", flush=True)
  return result


# ------------------------------------------------------------------- batch that fits


def memory_need(compiled) -> Optional[int]:
  """Device bytes the compiled step needs: arguments + outputs - donated + temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  get = lambda k: int(getattr(m, k, 0) or 0)
  return (get('argument_size_in_bytes') + get('output_size_in_bytes')
          - get('alias_size_in_bytes') + get('temp_size_in_bytes')
          + get('generated_code_size_in_bytes'))


def next_batch(batch: int, need: int, fixed: int, limit: int, step: int,
               cap: Optional[int] = None) -> int:
  """The largest multiple of `step` whose need fits `limit`, from the line through (0, fixed)
  and (batch, need): `fixed` is what does not grow with the batch (the train state), so the
  per-sample cost is over-estimated slightly and the answer errs small. 0 = none fits."""
  per_sample = max(need - fixed, 1) / batch
  b = int((limit - fixed) / per_sample) // step * step
  return max(0, min(b, cap) if cap else b)


def fit_batch(compile_at: Callable[[int], tuple], guess: int, limit: Optional[int], fixed: int,
              step: int, cap: Optional[int] = None, max_compiles: int = 3,
              grow_below: float = 0.75) -> tuple:
  """The largest batch (a multiple of `step`, at most `cap`) whose compiled step fits `limit`
  bytes: compile at `guess`, then correct along the memory line (down if it does not fit, up
  once if it used under `grow_below` of the limit). compile_at(b) -> (compiled, need bytes).
  Returns (batch, compiled, need, tried) with batch None when none fits; tried lists every
  compile as {'batch', 'need_bytes', 'fits'}."""
  b = max(step, min(guess, cap) if cap else guess)
  tried, best = [], None
  for _ in range(max_compiles):
    compiled, need = compile_at(b)
    fits = limit is None or need is None or need <= limit
    tried.append({'batch': b, 'need_bytes': need, 'fits': fits})
    if fits:
      best = (b, compiled, need)
      if limit is None or need is None or need >= grow_below * limit or (cap and b >= cap):
        break
      nb = next_batch(b, need, fixed, limit, step, cap)
      if nb < b + max(step, b // 8):   # not worth another compile
        break
    else:
      if best is not None:   # grew too far: keep the last batch that fitted
        break
      nb = min(next_batch(b, need, fixed, limit, step, cap), b - step)
      if nb < step:
        break
    b = nb
  if best is None:
    return None, None, None, tried
  return best + (tried,)


def activation_bytes_per_sample(cfg: clip.ClipConfig, attention: str, remat: bool) -> float:
  """A first guess at the activation bytes one image-text pair keeps for the backward pass
  (bf16 compute, fp32 layer norms): per token and layer about 20 w + 6 m bytes, plus the
  attention weights (6 H n bytes: fp32 logits, bf16 weights) unless cuDNN's flash kernel
  keeps only row statistics; with remat, each block's input plus one live block. Scaled by
  0.8, which puts ViT-B/16 at ~110 MB: an H100 earlier fitted 512 but not 1024 in 60 GB."""
  def tower(n, w, m, h, layers):
    per_token = 20 * w + 6 * m + (8 * h if attention == 'cudnn' else 6 * h * n)
    if remat:
      return layers * n * 2 * w + n * per_token
    return layers * n * per_token
  size = 2 if jnp.dtype(cfg.dtype).itemsize == 2 else 4
  total = (tower(cfg.num_patches + 1, cfg.vision_width, cfg.vision_mlp, cfg.vision_heads,
                 cfg.vision_layers)
           + tower(cfg.context_length, cfg.text_width, cfg.text_mlp, cfg.text_heads,
                   cfg.text_layers))
  return 0.8 * total * size / 2


# ------------------------------------------------------------------------- child process


@contextlib.contextmanager
def cudnn_attention(on: bool):
  """jax.nn.dot_product_attention with implementation='cudnn' while tracing (the model calls
  it for attention='fused'); a benchmark-only patch, the library's default is untouched."""
  if not on:
    yield
    return
  original = jax.nn.dot_product_attention
  jax.nn.dot_product_attention = functools.partial(original, implementation='cudnn')
  try:
    yield
  finally:
    jax.nn.dot_product_attention = original


def _size(n) -> str:
  return f'{n / GIB:.1f} GiB' if n >= GIB / 10 else f'{n / 2 ** 20:.1f} MiB'


def _short_error(e: BaseException) -> str:
  text = f'{type(e).__name__}: {e}'
  low = text.lower()
  if 'resource_exhausted' in low or 'out of memory' in low:
    return 'out of memory: ' + text.splitlines()[0][:300]
  return ' '.join(text.split())[:500]


def _abstract_batch(cfg, kind, b, groups):
  s, L = cfg.image_size, cfg.context_length
  sds = jax.ShapeDtypeStruct
  out = {'pairs': {'image': sds((b, s, s, 3), np.uint8), 'ids': sds((b, L), np.int32),
                   'eos_index': sds((b,), np.int32)}}
  if kind == 'align':
    out['groups'] = {'images': sds((groups, 25, s, s, 3), np.uint8),
                     'ids': sds((groups, L), np.int32), 'eos_index': sds((groups,), np.int32),
                     'ref_scores': sds((groups, 25), np.float32)}
  return out


def _train_config(kind: str, batch: int, groups: int):
  c = train.default_config(kind)
  c.batch_size = batch
  if kind == 'align':
    c.u = c.v = 5
    c.groups_per_step = groups
  return c


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Child:
  """Runs one group's actions in this process (its XLA_FLAGS), one JSON event per line."""

  def __init__(self, spec: dict):
    self.spec = spec
    self.events = open(spec['events'], 'a', encoding='utf-8')
    self.results: dict = {}      # action name -> its result (this child's)
    self.context = spec.get('context', {})   # results of earlier children the plan passes on
    self.executables: dict = {}  # step name -> (compiled, cfg, kind, batch, groups, tx, preset)
    self.params_cache: dict = {}

  def emit(self, event: str, **kw):
    self.events.write(json.dumps({'event': event, 't': time.time(), **kw}, default=str) + '\n')
    self.events.flush()

  # -------------------------------------------------------------- setup
  def setup(self):
    if self.spec.get('cache_dir'):
      jax.config.update('jax_compilation_cache_dir', self.spec['cache_dir'])
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    dev = jax.devices()[0]
    self.backend = jax.default_backend()
    self.accel = self.backend in ('gpu', 'tpu')
    self.dtype = 'bfloat16' if self.accel else 'float32'
    n = 8192 if self.accel else int(self.spec.get('peak_n', 512))
    self.peak = measured_peak_tflops(jnp.dtype(self.dtype), n)
    stats = {}
    try:
      stats = dev.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      pass
    limit = self.spec.get('memory_limit_bytes')
    if limit is None and 'bytes_limit' in stats:
      limit = int(0.97 * (stats['bytes_limit'] - stats.get('bytes_in_use', 0)))
    self.limit = limit
    self.nominal = nominal_peak_tflops(dev.device_kind) if self.accel else None
    self.emit('device', device_kind=dev.device_kind, backend=self.backend, jax=jax.__version__,
              dtype=self.dtype, matmul_peak_tflops=self.peak, matmul_n=n,
              nominal_peak_tflops=self.nominal, memory_limit_bytes=self.limit,
              bytes_limit=stats.get('bytes_limit'), xla_flags=os.environ.get('XLA_FLAGS', ''),
              mem_fraction=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))

  # -------------------------------------------------------------- lookups
  def _all_results(self):
    return list(self.context.values()) + list(self.results.values())

  def best_step(self, preset: str, kind: str = 'pretrain', remat: Optional[bool] = None):
    cands = [r for r in self._all_results()
             if r.get('type') == 'step' and r.get('status') == 'ok' and r.get('kind') == kind
             and r.get('preset') == preset and (remat is None or r.get('remat') == remat)]
    return max(cands, key=lambda r: r['tflops_per_s'], default=None)

  def _params(self, cfg):
    key = dataclasses_key(cfg)
    if key not in self.params_cache:
      self.params_cache.clear()
      self.params_cache[key] = clip.init_params(cfg)
    # A copy: the step donates its state.
    return jax.tree.map(jnp.copy, self.params_cache[key])

  # -------------------------------------------------------------- actions
  def resolve_step(self, a: dict) -> dict:
    """Concrete attention, remat and batch spec of a step action ('best' references)."""
    preset = a['preset']
    attention, remat, batch = a.get('attention', 'einsum'), a.get('remat', False), a['batch']
    like = None
    if a.get('like') == 'best':
      like = self.best_step(preset, 'pretrain')
      if like is None:
        raise RuntimeError(f'no {preset} pretrain step succeeded to take the best setting from')
      attention, remat = like['attention'], like['remat']
    if attention == 'best':
      best = self.best_step(preset, 'pretrain', remat=False) or self.best_step(preset)
      attention = best['attention'] if best else 'einsum'
    if isinstance(batch, dict) and 'times' in batch:
      base = self.best_step(preset, 'pretrain', remat=False)
      if base is None:
        raise RuntimeError(f'no remat-off {preset} pretrain step succeeded to scale the batch of')
      batch = batch['times'] * base['batch']
    elif isinstance(batch, dict) and 'same_as' in batch:
      other = self.results.get(batch['same_as']) or self.context.get(batch['same_as'])
      if other and other.get('status') == 'ok':
        batch = other['batch']
      else:
        batch = {k: v for k, v in batch.items() if k != 'same_as'}
    elif isinstance(batch, dict) and 'half_of' in batch:
      ref = like or self.best_step(preset, 'pretrain')
      if ref is None:
        raise RuntimeError(f'no {preset} pretrain step succeeded to halve the batch of')
      step = batch.get('step', 64)
      batch = max(step, ref['batch'] // 2 // step * step)
    return {'attention': attention, 'remat': bool(remat), 'batch': batch}

  def step(self, a: dict) -> dict:
    preset, kind = a['preset'], a.get('kind', 'pretrain')
    r = self.resolve_step(a)
    attention, remat, batch = r['attention'], r['remat'], r['batch']
    cfg = clip.preset(preset, dtype=self.dtype, remat=remat,
                      attention='fused' if attention == 'cudnn' else attention,
                      **a.get('overrides', {}))
    groups_for = (lambda b: max(1, b // 32)) if kind == 'align' else (lambda b: 0)
    abstract_params = clip.abstract_params(cfg)
    c0 = _train_config(kind, 8, 1)
    tx, lr = optim.make_optimizer(c0.optim, 1000, abstract_params)
    abstract_state = jax.eval_shape(lambda p: train.init_state(p, tx, 0), abstract_params)
    fixed = _nbytes(abstract_state)
    compile_log = []

    def compile_at(b):
      g = groups_for(b)
      fn = jax.jit(train.make_train_step(cfg, _train_config(kind, b, g), kind, tx, lr),
                   donate_argnums=(0,))
      t0 = time.perf_counter()
      with cudnn_attention(attention == 'cudnn'):
        lowered = fn.lower(abstract_state, _abstract_batch(cfg, kind, b, g))
      t1 = time.perf_counter()
      compiled = lowered.compile()
      compile_log.append({'batch': b, 'lower_s': t1 - t0,
                          'compile_s': time.perf_counter() - t1})
      return compiled, memory_need(compiled)

    out = {'type': 'step', 'preset': preset, 'kind': kind, 'attention': attention,
           'remat': remat, 'dtype': self.dtype, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'memory_limit_bytes': self.limit}
    if isinstance(batch, dict):   # the largest that fits
      step = int(batch.get('step', 64))
      guess = batch.get('guess', 'auto')
      if guess == 'auto':
        per = activation_bytes_per_sample(cfg, attention, remat)
        guess = (max(step, int((self.limit - fixed) / per) // step * step) if self.limit
                 else 8 * step)
      b, compiled, need, tried = fit_batch(compile_at, int(guess), self.limit, fixed, step,
                                           cap=batch.get('cap'),
                                           max_compiles=int(batch.get('max_compiles', 3)))
      out['fit'] = {'guess': int(guess), 'tried': tried, 'state_bytes': fixed}
      if b is None:
        out.update(status=f'does not fit: even batch {tried[-1]["batch"]} needs '
                   f'{_size(tried[-1]["need_bytes"])} of {_size(self.limit)}',
                   compiles=compile_log)
        return out
    else:
      b = int(batch)
      compiled, need = compile_at(b)
      if self.limit and need and need > self.limit:
        out.update(batch=b, need_bytes=need, compiles=compile_log,
                   status=f'does not fit: batch {b} needs {_size(need)} of '
                   f'{_size(self.limit)}')
        return out
    oom = None
    try:
      state, data, m, first_s = self._first_step(compiled, cfg, kind, b, groups_for(b), tx)
    except Exception as e:  # pylint: disable=broad-except
      oom = _short_error(e)
      if not oom.startswith('out of memory'):
        raise
    if oom:   # XLA's figures said it fits, the allocator did not: once more at 85% of it
      step = int(batch.get('step', 64)) if isinstance(batch, dict) else 64
      smaller = max(step, int(b * 0.85) // step * step)
      out['oom_retry'] = {'batch': b, 'error': oom[:300]}
      if smaller >= b:
        raise RuntimeError(oom)
      b = smaller
      compiled, need = compile_at(b)
      state, data, m, first_s = self._first_step(compiled, cfg, kind, b, groups_for(b), tx)
    g = groups_for(b)
    out.update(batch=b, groups=g, need_bytes=need, compiles=compile_log,
               compile_s=sum(x['compile_s'] + x['lower_s'] for x in compile_log),
               final_compile_s=compile_log[-1]['compile_s'], first_step_s=first_s)
    try:
      mem = compiled.memory_analysis()
      out['temp_bytes'] = int(getattr(mem, 'temp_size_in_bytes', 0) or 0)
    except Exception:  # pylint: disable=broad-except
      pass
    # Steps: the spec's, fewer when a step is slow (about 10 s of timed steps at most).
    t0 = time.perf_counter()
    state, m = compiled(state, data)
    jax.block_until_ready(m['loss'])
    one = time.perf_counter() - t0
    n = max(2, min(int(self.spec.get('steps', 10)), int(10.0 / max(one, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = compiled(state, data)
    jax.block_until_ready(m['loss'])
    seconds = (time.perf_counter() - t0) / n
    images = b + (g * 25 if kind == 'align' else 0)
    texts = b + (g if kind == 'align' else 0)
    flops = metrics.clip_flops(cfg, images=images, texts=texts)
    out.update(status='ok', steps=n, step_s=seconds, images=images, texts=texts,
               flops_per_step=flops, tflops_per_s=flops / seconds / 1e12,
               mfu=flops / seconds / 1e12 / self.peak,
               mfu_nominal=(flops / seconds / 1e12 / self.nominal) if self.nominal else None,
               loss=float(m['loss']), images_per_s=images / seconds)
    del state, data
    # Keep the executable of the best pretrain step per model only (what a profile runs).
    best = self.best_step(preset, 'pretrain')
    if kind == 'pretrain' and (best is None or out['tflops_per_s'] > best['tflops_per_s']):
      self.executables = {k: e for k, e in self.executables.items() if e[6] != preset}
      self.executables[a['name']] = (compiled, cfg, kind, b, g, tx, preset)
    return out

  def _first_step(self, compiled, cfg, kind, b, g, tx):
    state = train.init_state(self._params(cfg), tx, 0)
    data = _batch(cfg, kind, b, g, np.random.default_rng(0))
    t0 = time.perf_counter()
    state, m = compiled(state, data)
    jax.block_until_ready(m['loss'])
    return state, data, m, time.perf_counter() - t0

  def profile(self, a: dict) -> dict:
    best = self.best_step(a['preset'], 'pretrain')
    if best is None or best['name'] not in self.executables:
      raise RuntimeError(f"no {a['preset']} pretrain step of this process to profile")
    compiled, cfg, kind, b, g, tx, _ = self.executables[best['name']]
    steps = int(a.get('steps', 3))
    state = train.init_state(self._params(cfg), tx, 0)
    data = _batch(cfg, kind, b, g, np.random.default_rng(0))
    state, m = compiled(state, data)
    jax.block_until_ready(m['loss'])
    trace_dir = a['trace_dir']
    os.makedirs(trace_dir, exist_ok=True)
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, m = compiled(state, data)
      jax.block_until_ready(m['loss'])
    traced_s = time.perf_counter() - t0
    path = gpu_trace.find_trace(trace_dir)
    if path is None:
      raise RuntimeError(f'jax.profiler.trace wrote no perfetto trace under {trace_dir}')
    top = gpu_trace.top_kernels(path, top=int(a.get('top', 15)), steps=steps)
    out = {'type': 'profile', 'of': best['name'], 'preset': a['preset'], 'batch': b,
           'attention': best['attention'], 'remat': best['remat'], 'steps': steps,
           'traced_s': traced_s, 'status': 'ok', **top}
    if self.accel and not top['source'].startswith('device'):
      out['warning'] = ('the trace has no device kernels (CUPTI missing?): these are host '
                        'spans')
    return out

  def loss(self, a: dict) -> dict:
    """InfoNCE alone (forward + gradients of both embeddings and the scale) at the best
    pretrain batch: the library's fp32 logits vs bf16 logits (fp32 accumulate, fp32 softmax)
    vs logits and log-softmax in bf16; and its share of that step."""
    best = self.best_step(a['preset'], 'pretrain')
    if best is None:
      raise RuntimeError(f"no {a['preset']} pretrain step succeeded to take the batch of")
    b, d = best['batch'], clip.preset(a['preset']).embed_dim
    eps = float(train.default_config('pretrain').label_smoothing)
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    txt = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    img, txt = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (img, txt))
    scale = jnp.asarray(1 / 0.07, jnp.float32)

    def ce(logits):
      logp = jax.nn.log_softmax(logits, axis=-1).astype(jnp.float32)
      return jnp.mean((1 - eps) * -jnp.diagonal(logp) + eps * -jnp.mean(logp, axis=-1))

    def bf16_logits(i, t, s):
      lg = s * jnp.dot(i.astype(jnp.bfloat16), t.astype(jnp.bfloat16).T,
                       preferred_element_type=jnp.float32)
      return 0.5 * (ce(lg) + ce(lg.T))

    def bf16_loss(i, t, s):
      lg = s.astype(jnp.bfloat16) * (i.astype(jnp.bfloat16) @ t.astype(jnp.bfloat16).T)
      return 0.5 * (ce(lg) + ce(lg.T))

    fns = {'fp32': lambda i, t, s: losses.clip_infonce(i, t, s, label_smoothing=eps)[0],
           'bf16_logits': bf16_logits, 'bf16_loss': bf16_loss}
    seconds, values = {}, {}
    for name, f in fns.items():
      g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
      jax.block_until_ready(g(img, txt, scale))
      times = []
      for _ in range(int(a.get('repeats', 20))):
        t0 = time.perf_counter()
        v, _ = jax.block_until_ready(g(img, txt, scale))
        times.append(time.perf_counter() - t0)
      seconds[name], values[name] = statistics.median(times), float(v)
    fastest_bf16 = min(seconds['bf16_logits'], seconds['bf16_loss'])
    return {'type': 'loss', 'preset': a['preset'], 'batch': b, 'embed_dim': d, 'status': 'ok',
            'of': best['name'], 'seconds': seconds, 'loss': values,
            'abs_diff_vs_fp32': {k: abs(v - values['fp32']) for k, v in values.items()},
            'fp32_share_of_step': seconds['fp32'] / best['step_s'],
            'bf16_saving_share_of_step': (seconds['fp32'] - fastest_bf16) / best['step_s']}

  def dpo(self, a: dict) -> dict:
    cfg = clip.preset(a['preset'], dtype=self.dtype, **a.get('overrides', {}))
    r = dpo_speed.compare(groups=int(a.get('groups', 1)), repeats=int(a.get('repeats', 3)),
                          cfg=cfg, peak_gflops=self.peak * 1e3)
    return {'type': 'dpo', 'preset': a['preset'], 'status': 'ok', **r}


def dataclasses_key(cfg) -> tuple:
  """Parameters are the same for any compute dtype, remat and attention."""
  return tuple(sorted((k, v) for k, v in dataclasses.asdict(cfg).items()
                      if k not in ('dtype', 'remat', 'attention')))


def child_main(spec_path: str) -> int:
  with open(spec_path, encoding='utf-8') as f:
    spec = json.load(f)
  child = Child(spec)
  child.emit('env', xla_flags=os.environ.get('XLA_FLAGS', ''), pid=os.getpid())
  child.setup()   # an unknown XLA flag aborts the process here (jax starts its backend)
  for a in spec['actions']:
    name = a['name']
    left = spec['deadline'] - time.time()
    if left < a.get('min_s', 0):
      child.emit('done', name=name, result={
          'type': a['type'], 'status': f'skipped: time budget ({left:.0f} s left, needs '
          f'>= {a.get("min_s", 0)} s)'})
      continue
    child.emit('start', name=name, group=spec['group'], type=a['type'])
    t0 = time.perf_counter()
    try:
      r = getattr(child, a['type'])(a)
    except Exception as e:  # pylint: disable=broad-except
      r = {'type': a['type'], 'status': 'error: ' + _short_error(e),
           'traceback': traceback.format_exc()[-2000:],
           **{k: a[k] for k in ('preset', 'kind', 'attention', 'remat') if k in a}}
    r['name'] = name
    r['group'] = spec['group']
    r['wall_s'] = time.perf_counter() - t0
    child.results[name] = r
    child.emit('done', name=name, result=r)
  return 0


# -------------------------------------------------------------------------------- plans
#
# A plan is a list of group builders: build(best) -> {'name', 'xla_flags', 'timeout_s',
# 'min_start_s', 'actions': [...]}, where `best` is the best ViT-B/16 (or tiny) pretrain step
# of the groups run so far (None before any): its attention, remat and batch.


def _b16_base(best, trace_dir):
  del best
  fit = {'fit': True, 'guess': 'auto', 'step': 64, 'max_compiles': 2}
  step = lambda name, **kw: {'name': name, 'type': 'step', 'preset': 'vit_b16',
                             'kind': 'pretrain', 'min_s': 40, **kw}
  # In order of priority: what the budget cuts first is last. 'fused' is the library's
  # default on a GPU (attention='auto'), so it runs at einsum's batch without a fit of its own.
  return {'name': 'base', 'xla_flags': '', 'timeout_s': 300, 'min_start_s': 60, 'actions': [
      step('b16_pretrain_cudnn', attention='cudnn', remat=False, batch=fit),
      step('b16_pretrain_einsum', attention='einsum', remat=False, batch=fit),
      step('b16_pretrain_remat_2x', attention='best', remat=True,
           batch={'times': 2, 'of': 'best_noremat'}),
      step('b16_pretrain_remat_4x', attention='best', remat=True,
           batch={'times': 4, 'of': 'best_noremat'}),
      {'name': 'b16_profile', 'type': 'profile', 'preset': 'vit_b16', 'steps': 3, 'top': 15,
       'trace_dir': os.path.join(trace_dir, 'b16'), 'min_s': 20},
      step('b16_align', kind='align', like='best', batch={'half_of': 'best', 'step': 64}),
      {'name': 'b16_loss_bf16', 'type': 'loss', 'preset': 'vit_b16', 'min_s': 5},
      step('b16_pretrain_fused_xla', attention='fused', remat=False,
           batch={'same_as': 'b16_pretrain_einsum', **fit}),
  ]}


def _setting(best, fallback_batch):
  if best is None:
    return {'attention': 'einsum', 'remat': False, 'batch': fallback_batch}
  return {'attention': best['attention'], 'remat': best['remat'], 'batch': best['batch']}


def _b16_flags(name, flags, suffix):
  def build(best, trace_dir):
    del trace_dir
    s = _setting(best, {'fit': True, 'guess': 'auto', 'step': 64})
    return {'name': name, 'xla_flags': flags, 'timeout_s': 70, 'min_start_s': 60,
            'actions': [{'name': f'b16_pretrain_best_{suffix}', 'type': 'step',
                         'preset': 'vit_b16', 'kind': 'pretrain', 'min_s': 40, **s}]}
  return build


def _l14(best, trace_dir):
  del trace_dir
  s = _setting(best, None)
  cap = s['batch'] if best else None
  return {'name': 'l14', 'xla_flags': '', 'timeout_s': 170, 'min_start_s': 90, 'actions': [
      {'name': 'l14_pretrain', 'type': 'step', 'preset': 'vit_l14', 'kind': 'pretrain',
       'attention': s['attention'], 'remat': s['remat'], 'min_s': 60,
       'batch': {'fit': True, 'guess': 'auto', 'step': 32, 'cap': cap, 'max_compiles': 2}},
      {'name': 'l14_align', 'type': 'step', 'preset': 'vit_l14', 'kind': 'align',
       'like': 'best', 'min_s': 60, 'batch': {'half_of': 'best', 'step': 32}},
  ]}


def _dpo(best, trace_dir):
  del best, trace_dir
  return {'name': 'dpo', 'xla_flags': '', 'timeout_s': 150, 'min_start_s': 100, 'actions': [
      {'name': 'b16_dpo_listwise_vs_pairwise', 'type': 'dpo', 'preset': 'vit_b16',
       'groups': 1, 'repeats': 3, 'min_s': 80}]}


TINY = {'vision_layers': 1, 'text_layers': 1}


def _tiny_base(best, trace_dir):
  del best
  step = lambda name, **kw: {'name': name, 'type': 'step', 'preset': 'tiny',
                             'overrides': TINY, 'kind': 'pretrain', **kw}
  # The child must run under its group's XLA_FLAGS; this one also compiles about 1/3 faster
  # (LLVM at -O0), which matters on the test machine's 2 cores and not for what is tested.
  return {'name': 'base', 'xla_flags': '--xla_backend_optimization_level=0',
          'timeout_s': None, 'min_start_s': 0, 'actions': [
              step('tiny_pretrain_einsum', attention='einsum', remat=False,
                   batch={'fit': True, 'guess': 16, 'step': 8}),
              step('tiny_pretrain_remat_2x', attention='best', remat=True,
                   batch={'times': 2, 'of': 'best_noremat'}),
              {'name': 'tiny_profile', 'type': 'profile', 'preset': 'tiny', 'steps': 2,
               'top': 10, 'trace_dir': os.path.join(trace_dir, 'tiny')},
              {'name': 'tiny_loss_bf16', 'type': 'loss', 'preset': 'tiny', 'repeats': 3},
          ]}


def _tiny_bad_flag(best, trace_dir):
  del trace_dir
  s = _setting(best, 8)
  return {'name': 'bad_flag', 'xla_flags': '--xla_gpu_step_no_such_flag=true', 'timeout_s': 60,
          'min_start_s': 0, 'actions': [
              {'name': 'tiny_pretrain_bad_flag', 'type': 'step', 'preset': 'tiny',
               'overrides': TINY, 'kind': 'pretrain', **s}]}


PLANS = {
    'full': dict(groups=(_b16_base, _l14, _b16_flags('lhs', LHS_FLAG, 'lhs'),
                         _b16_flags('no_triton_gemm', NO_TRITON_GEMM_FLAG, 'no_triton_gemm'),
                         _dpo),
                 best_preset='vit_b16', steps=10, budget_s=540),
    # The bad flag first: the plan must record its failure and go on.
    'tiny': dict(groups=(_tiny_bad_flag, _tiny_base), best_preset='tiny', steps=2,
                 budget_s=300),
}


def substitute_presets(group: dict, mapping: dict, step: int = 8) -> dict:
  """`group` with its models swapped (e.g. vit_b16 -> tiny, 1-layer towers) and batch steps
  of `step`: the full plan's own actions at a CPU size, a smoke test of the plan (not a
  measurement)."""
  g = copy.deepcopy(group)
  g['min_start_s'] = 0
  for a in g['actions']:
    a['min_s'] = 0
    if a.get('preset') in mapping:
      a['preset'] = mapping[a['preset']]
      if a['preset'] == 'tiny':
        a['overrides'] = TINY
    b = a.get('batch')
    if isinstance(b, dict):
      if 'step' in b:
        b['step'] = step
      if b.get('guess') == 'auto':
        b['guess'] = 2 * step
  return g


# --------------------------------------------------------------------------- the parent


def _load(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def _tail(path: str, lines: int = 12) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()[-20000:]
  except OSError:
    return ''
  keep = [l for l in text.splitlines() if l.strip()]
  flags = [l for l in keep if 'unknown flag' in l.lower() or 'unknown command' in l.lower()]
  return '\n'.join((flags[-2:] if flags else []) + keep[-lines:])


def _reason(tail: str) -> str:
  for line in reversed(tail.splitlines()):
    low = line.lower()
    if 'unknown flag' in low or 'resource_exhausted' in low or 'out of memory' in low:
      return ' '.join(line.split())[:300]
  lines = tail.splitlines()
  return ' '.join(lines[-1].split())[:300] if lines else ''


class Plan:
  """Runs a plan's groups one child at a time and keeps `out` (JSON) and its .md current."""

  def __init__(self, plan: str, out: str, budget_s: float, trace_dir: str, cache_dir: str,
               steps: Optional[int], log=print, substitute: Optional[dict] = None,
               memory_limit_bytes: Optional[int] = None, only_groups=None,
               context: Optional[dict] = None):
    self.name, self.cfg = plan, PLANS[plan]
    self.only_groups = set(only_groups or ())
    self.substitute = substitute or {}
    self.best_preset = self.substitute.get(self.cfg['best_preset'], self.cfg['best_preset'])
    self.memory_limit_bytes = memory_limit_bytes
    self.out, self.md = out, os.path.splitext(out)[0] + '.md'
    self.t0, self.budget_s = time.time(), float(budget_s)
    self.deadline = self.t0 + self.budget_s
    self.trace_dir, self.cache_dir = trace_dir, cache_dir
    self.steps = steps or self.cfg['steps']
    self.log = log
    self.work = tempfile.mkdtemp(prefix='gpu_step_')
    self.result = {
        'plan': plan, 'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
        'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'budget_s': self.budget_s, 'elapsed_s': 0.0, 'finished': False,
        'python': sys.version.split()[0], 'jax': jax.__version__, 'trace_dir': trace_dir,
        'compilation_cache': cache_dir or None, 'target_mfu': TARGET_MFU,
        'substitute': self.substitute or None,
        'devices': [], 'groups': [], 'variants': [], 'best': {}, 'done_when': {}}
    self.index: dict = {}
    if context:   # an earlier run's results: its measured variants stay, and seed 'best'
      self.result['context_from'] = context.get('started')
      self.result['devices'] += context.get('devices', [])
      for v in context.get('variants', []):
        if v.get('status') == 'ok':
          self.index[v['name']] = len(self.result['variants'])
          self.result['variants'].append({**v, 'from_earlier_run': v.get(
              'from_earlier_run', context.get('started'))})

  # -------------------------------------------------------------- bookkeeping
  def variant(self, name: str) -> dict:
    return self.result['variants'][self.index[name]]

  def add_pending(self, group: dict):
    for a in group['actions']:
      if a['name'] not in self.index:   # (one measured by an earlier run stays until rerun)
        self.index[a['name']] = len(self.result['variants'])
        self.result['variants'].append({'name': a['name'], 'group': group['name'],
                                        'type': a['type'], 'status': 'pending'})

  def best_step(self) -> Optional[dict]:
    preset = self.best_preset
    cands = [v for v in self.result['variants'] if v.get('type') == 'step' and
             v.get('status') == 'ok' and v.get('kind') == 'pretrain' and
             v.get('preset') == preset]
    return max(cands, key=lambda v: v['tflops_per_s'], default=None)

  def refresh(self):
    """Recomputes MFU against the best peak measured in any child, the best variants and the
    done-when line; writes the JSON and Markdown."""
    peaks = [d['matmul_peak_tflops'] for d in self.result['devices']
             if d.get('matmul_peak_tflops')]
    peak = max(peaks) if peaks else None
    nominal = next((d['nominal_peak_tflops'] for d in self.result['devices']
                    if d.get('nominal_peak_tflops')), None)
    self.result.update(matmul_peak_tflops=peak, nominal_peak_tflops=nominal,
                       device=(self.result['devices'][0]['device_kind']
                               if self.result['devices'] else None))
    for v in self.result['variants']:
      if v.get('type') == 'step' and v.get('status') == 'ok':
        if peak:
          v['mfu'] = v['tflops_per_s'] / peak
        v['mfu_nominal'] = v['tflops_per_s'] / nominal if nominal else None
    best = {}
    for preset in ('vit_b16', 'vit_l14', 'tiny'):
      for kind in ('pretrain', 'align'):
        cands = [v for v in self.result['variants'] if v.get('type') == 'step'
                 and v.get('status') == 'ok' and v.get('preset') == preset
                 and v.get('kind') == kind]
        if cands:
          b = max(cands, key=lambda v: v['tflops_per_s'])
          best[f'{preset}_{kind}'] = {k: b.get(k) for k in (
              'name', 'batch', 'groups', 'attention', 'remat', 'xla_flags', 'step_s',
              'tflops_per_s', 'mfu', 'mfu_nominal')}
    self.result['best'] = best
    top = best.get(f'{self.best_preset}_pretrain')
    prof = next((v for v in self.result['variants'] if v.get('type') == 'profile'
                 and v.get('status') == 'ok'), None)
    self.result['done_when'] = {
        'requirement': f'{self.best_preset} contrastive train step >= '
                       f'{TARGET_MFU:.0%} MFU (vs the measured bf16 matmul peak) at a batch '
                       'that fits, with the profile\'s top kernels listed',
        'best_mfu': top['mfu'] if top else None,
        'best_variant': top['name'] if top else None,
        'profile_top_kernels': bool(prof and prof.get('top')),
        'met': bool(top and top.get('mfu') and top['mfu'] >= TARGET_MFU and prof
                    and prof.get('top'))}
    self.result['elapsed_s'] = time.time() - self.t0
    _write_json(self.out, self.result)
    with open(self.md, 'w', encoding='utf-8') as f:
      f.write(markdown(self.result))

  # -------------------------------------------------------------- one child
  def run_group(self, group: dict):
    g = {'name': group['name'], 'xla_flags': group['xla_flags'], 'status': 'pending'}
    self.result['groups'].append(g)
    left = self.deadline - time.time()
    if left < group.get('min_start_s', 0):
      g['status'] = f'skipped: time budget ({left:.0f} s left)'
      for a in group['actions']:
        if self.variant(a['name'])['status'] == 'pending':
          self.variant(a['name'])['status'] = g['status']
      self.refresh()
      return
    timeout = left - 3 if group.get('timeout_s') is None else min(group['timeout_s'], left - 3)
    events = os.path.join(self.work, f"{group['name']}.events.jsonl")
    spec = {'group': group['name'], 'events': events, 'deadline': time.time() + timeout,
            'steps': self.steps, 'cache_dir': self.cache_dir, 'actions': group['actions'],
            'memory_limit_bytes': self.memory_limit_bytes,
            'context': {v['name']: v for v in self.result['variants']
                        if v.get('status') == 'ok'}}
    spec_path = os.path.join(self.work, f"{group['name']}.spec.json")
    _write_json(spec_path, spec)
    env = dict(os.environ)
    env['XLA_FLAGS'] = ' '.join(x for x in (os.environ.get('XLA_FLAGS', ''),
                                            group['xla_flags']) if x)
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9')
    env['PYTHONUNBUFFERED'] = '1'
    stdout = os.path.join(self.work, f"{group['name']}.stdout")
    stderr = os.path.join(self.work, f"{group['name']}.stderr")
    self.log(f"[{time.time() - self.t0:6.1f} s] group {group['name']} "
             f"(XLA_FLAGS={env['XLA_FLAGS']!r}, timeout {timeout:.0f} s): "
             f"{', '.join(a['name'] for a in group['actions'])}")
    t0 = time.time()
    with open(stdout, 'w') as fo, open(stderr, 'w') as fe:
      proc = subprocess.Popen([sys.executable, '-m', 'benchmarks.gpu_step', '--child',
                               spec_path], cwd=REPO, env=env, stdout=fo, stderr=fe)
      offset, running, killed = 0, None, False
      while True:
        rc = proc.poll()
        offset, running = self._read_events(events, offset, running)
        if rc is not None:
          break
        if time.time() > t0 + timeout:
          proc.kill()
          proc.wait()
          killed = True
          rc = proc.returncode
          offset, running = self._read_events(events, offset, running)
          break
        time.sleep(0.5)
    g.update(rc=rc, wall_s=time.time() - t0, killed_at_timeout=killed)
    tail = _tail(stderr)
    if rc != 0 or killed:
      g['stderr_tail'] = tail
    why = ('killed at its timeout / the time budget' if killed else
           f'the child exited with {rc}: {_reason(tail)}')
    if running:
      v = self.variant(running)
      v['status'] = f'error: {why}' if not killed else f'skipped: {why} while it ran'
    for a in group['actions']:
      v = self.variant(a['name'])
      if v['status'] == 'pending':
        v['status'] = (f'skipped: {why}' if killed else f'not run: {why}')
    g['status'] = 'ok' if rc == 0 and not killed else why
    self.refresh()

  def _read_events(self, path, offset, running):
    if not os.path.exists(path):
      return offset, running
    with open(path, encoding='utf-8') as f:
      f.seek(offset)
      chunk = f.read()
    complete = chunk[:chunk.rfind('\n') + 1]
    changed, done = False, []
    for line in complete.splitlines():
      try:
        e = json.loads(line)
      except json.JSONDecodeError:
        continue
      if e['event'] == 'device':
        self.result['devices'].append({k: v for k, v in e.items() if k != 'event'})
        limit = e['memory_limit_bytes']
        self.log(f"  device {e['device_kind']} ({e['backend']}, jax {e['jax']}): matmul "
                 f"{e['matmul_peak_tflops']:.3g} TFLOP/s, memory limit "
                 f"{_size(limit) if limit else 'none'}")
        changed = True
      elif e['event'] == 'start':
        running = e['name']
        v = self.variant(running)
        v.clear()   # a fresh record, also over one an earlier run (--context) measured
        v.update(name=running, group=e.get('group'), type=e.get('type'), status='running')
      elif e['event'] == 'done':
        v = self.variant(e['name'])
        if v.get('from_earlier_run'):   # skipped in the child: the earlier result stays
          continue
        v.update(e['result'])
        running = None if running == e['name'] else running
        done.append(v)
        changed = True
    if changed:
      self.refresh()
    for v in done:
      self.log('  ' + summary_line(v))
    return offset + len(complete.encode('utf-8')), running

  def run(self) -> dict:
    best = None
    groups = [build(best, self.trace_dir) for build in self.cfg['groups']]
    for g in groups:
      self.add_pending(g)
    self.refresh()
    for build in self.cfg['groups']:
      group = build(self.best_step(), self.trace_dir)
      if self.only_groups and group['name'] not in self.only_groups:
        for a in group['actions']:
          if self.variant(a['name'])['status'] == 'pending':
            self.variant(a['name'])['status'] = 'skipped: group not selected (--groups)'
        continue
      if self.substitute:
        group = substitute_presets(group, self.substitute)
      self.run_group(group)
    self.result['finished'] = True
    self.refresh()
    return self.result


def run_plan(plan: str, out: str, *, budget_s: Optional[float] = None,
             trace_dir: Optional[str] = None, cache_dir: str = '', steps: Optional[int] = None,
             log=print, substitute: Optional[dict] = None,
             memory_limit_bytes: Optional[int] = None, only_groups=None,
             context: Optional[dict] = None) -> dict:
  """Runs plan 'full' or 'tiny' (module docstring); returns the results also written to
  `out` (JSON) and its .md."""
  budget = PLANS[plan]['budget_s'] if budget_s is None else budget_s
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='gpu_step_trace_')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  return Plan(plan, out, budget, trace_dir, cache_dir, steps, log, substitute,
              memory_limit_bytes, only_groups, context).run()


# ----------------------------------------------------------------------------- Markdown


def _f(x, fmt='{:.3f}'):
  return '' if x is None else fmt.format(x)


def summary_line(v: dict) -> str:
  if v.get('type') == 'step' and v.get('status') == 'ok':
    groups = f"+{v['groups']}g" if v.get('groups') else ''
    return (f"{v['name']}: batch {v['batch']}{groups} {v['attention']} remat={v['remat']}: "
            f"{v['step_s']:.4f} s/step, {v['tflops_per_s']:.4g} TFLOP/s, MFU {v['mfu']:.1%} "
            f"(compile {v['compile_s']:.0f} s)")
  if v.get('type') == 'profile' and v.get('status') == 'ok':
    head = ', '.join(f"{r['name'][:40]} {r['share']:.0%}" for r in v['top'][:3])
    return f"{v['name']}: of {v['of']}: {head}"
  if v.get('type') == 'loss' and v.get('status') == 'ok':
    s = v['seconds']
    return (f"{v['name']}: InfoNCE at batch {v['batch']}: fp32 {s['fp32'] * 1e3:.2f} ms, bf16 "
            f"logits {s['bf16_logits'] * 1e3:.2f} ms, bf16 loss {s['bf16_loss'] * 1e3:.2f} ms "
            f"({v['fp32_share_of_step']:.2%} of the step)")
  if v.get('type') == 'dpo' and v.get('status') == 'ok':
    return f"{v['name']}: listwise/pairwise {v['listwise_over_pairwise']:.1f}x"
  return f"{v['name']}: {v.get('status')}"


def markdown(r: dict) -> str:
  lines = [f"### GPU step benchmark (`benchmarks/gpu_step.py --plan {r['plan']}`)", '']
  peak, nom = r.get('matmul_peak_tflops'), r.get('nominal_peak_tflops')
  lines.append(f"Device {r.get('device') or 'none started'}, jax {r['jax']}, started "
               f"{r['started']}; measured matmul peak {_f(peak, '{:.4g}')} TFLOP/s"
               f"{f', nominal {nom:.0f}' if nom else ''}; {r['elapsed_s']:.0f} s of a "
               f"{r['budget_s']:.0f} s budget{'' if r['finished'] else ' (unfinished)'}.")
  lines += ['', '| variant | model | kind | batch | remat | attention | XLA flags | step s | '
            'TFLOP/s | MFU | MFU (nominal) | temp GiB | compile s | status |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for v in r['variants']:
    if v.get('type') != 'step':
      continue
    batch = v.get('batch')
    if batch is not None and v.get('groups'):
      batch = f"{batch} + {v['groups']} groups"
    flags = v.get('xla_flags') or ''
    lines.append('| ' + ' | '.join(str(x) for x in (
        v['name'], v.get('preset', ''), v.get('kind', ''), '' if batch is None else batch,
        '' if 'remat' not in v else ('on' if v['remat'] else 'off'), v.get('attention', ''),
        f'`{flags.strip()}`' if flags.strip() else '', _f(v.get('step_s'), '{:.4f}'),
        _f(v.get('tflops_per_s'), '{:.4g}'), _f(v.get('mfu'), '{:.1%}'),
        _f(v.get('mfu_nominal'), '{:.1%}'),
        _f(v['temp_bytes'] / GIB if v.get('temp_bytes') is not None else None, '{:.1f}'),
        _f(v.get('compile_s'), '{:.0f}'), v.get('status', '')[:120])) + ' |')
  dw = r.get('done_when') or {}
  if dw:
    lines += ['', f"Done when: {dw['requirement']}: best {dw.get('best_variant')} at "
              f"{_f(dw.get('best_mfu'), '{:.1%}')}; top kernels listed: "
              f"{dw['profile_top_kernels']}; **{'met' if dw['met'] else 'not met'}**."]
  for v in r['variants']:
    if v.get('type') == 'profile' and v.get('status') == 'ok':
      if v.get('warning'):
        lines += ['', f"**{v['warning']}**"]
      lines += ['', f"Top kernels of {v['of']} (batch {v['batch']}, {v['steps']} steps; "
                f"{v['source']}; kernel time / traced window "
                f"{_f(v.get('kernel_time_over_window'), '{:.0%}')}; by family: "
                + ', '.join(f'{k} {s:.0%}' for k, s in v['category_shares'].items()) + '):',
                '', '| kernel | family | ms/step | calls | share |', '|---|---|---|---|---|']
      for k in v['top']:
        lines.append(f"| `{k['name'][:90]}` | {k['category']} | "
                     f"{_f(k.get('ms_per_step'), '{:.2f}')} | {k['count']} | {k['share']:.1%} |")
    elif v.get('type') == 'loss' and v.get('status') == 'ok':
      s = v['seconds']
      lines += ['', f"bf16 logits and loss ({v['name']}): the library computes InfoNCE's "
                f"logits in fp32 from the fp32 unit embeddings; timed alone at batch "
                f"{v['batch']} x {v['embed_dim']} (forward + gradients): fp32 "
                f"{s['fp32'] * 1e3:.3f} ms, bf16 logits {s['bf16_logits'] * 1e3:.3f} ms, bf16 "
                f"logits and log-softmax {s['bf16_loss'] * 1e3:.3f} ms; the fp32 loss is "
                f"{v['fp32_share_of_step']:.2%} of the step, so bf16 would save at most "
                f"{max(v['bf16_saving_share_of_step'], 0):.2%} of it (loss change "
                f"{v['abs_diff_vs_fp32']['bf16_loss']:.1e})."]
    elif v.get('type') == 'dpo' and v.get('status') == 'ok':
      lines += ['', f"Ranked DPO ({v['preset']}, {v['groups']} group, {v['pairs_per_step']} "
                f"pairs): listwise {v['listwise_pairs_per_s']:.0f} vs pairwise "
                f"{v['pairwise_pairs_per_s']:.0f} pairs/s = **{v['listwise_over_pairwise']:.1f}x**"
                f" ({v['listwise_over_pairwise_online_ref']:.1f}x with an online reference)."]
  other = [v for v in r['variants'] if v.get('type') != 'step' and v.get('status') != 'ok']
  if other:
    lines += [''] + [f"- {v['name']}: {v.get('status')}" for v in other]
  failed = [g for g in r['groups'] if g.get('status') not in ('ok', 'pending')]
  if failed:
    lines += [''] + [f"- group {g['name']} (`{g['xla_flags']}`): {g['status']}" for g in failed]
  return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--plan', default='full', choices=('full', 'tiny', 'single'))
  parser.add_argument('--out', default='')
  parser.add_argument('--budget-s', type=float, default=None)
  parser.add_argument('--trace-dir', default='')
  parser.add_argument('--cache-dir', default=None,
                      help='persistent compilation cache (full plan default '
                      '/tmp/aesalign_gpu_step_cache: a rerun on the same machine skips '
                      'compiles); "" = none')
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--substitute', default='',
                      help='e.g. vit_b16=tiny,vit_l14=tiny: the plan\'s actions at another '
                      'model (a CPU smoke test of the full plan)')
  parser.add_argument('--memory-limit-gib', type=float, default=None,
                      help='the device memory the batch fitting may use (default: the '
                      'device\'s bytes_limit; none on CPU)')
  parser.add_argument('--groups', default='',
                      help='run only these groups of the plan (e.g. l14,no_triton_gemm)')
  parser.add_argument('--context', default='',
                      help='an earlier run\'s results JSON: its measured variants are kept '
                      'and decide "best" (for a --groups follow-up run)')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  # --plan single (the previous script)
  parser.add_argument('--preset', default='vit_b16')
  parser.add_argument('--batches', default='1024,768,512,256')
  parser.add_argument('--kinds', default='pretrain,align,dpo')
  args = parser.parse_args(argv)
  if args.child:
    return child_main(args.child)
  if args.plan == 'single':
    on_gpu = jax.default_backend() == 'gpu'
    cfg = clip.preset(args.preset, dtype='bfloat16' if on_gpu else 'float32')
    result = run(cfg, [int(b) for b in args.batches.split(',')], steps=args.steps or 10,
                 kinds=args.kinds.split(','))
    result['preset'] = args.preset
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != 'dpo_listwise_vs_pairwise'}))
    return 0
  # The parent only orchestrates: should anything touch jax here, it must not take the GPU
  # (jax preallocates most of its memory) from the children that measure.
  jax.config.update('jax_platforms', 'cpu')
  out = args.out or (os.path.join(REPO, 'benchmarks', 'results_gpu.json') if args.plan == 'full'
                     else os.path.join(tempfile.mkdtemp(prefix='gpu_step_'), 'results.json'))
  cache = (args.cache_dir if args.cache_dir is not None else
           ('/tmp/aesalign_gpu_step_cache' if args.plan == 'full' else ''))
  r = run_plan(args.plan, out, budget_s=args.budget_s, trace_dir=args.trace_dir or None,
               cache_dir=cache, steps=args.steps,
               substitute=dict(kv.split('=') for kv in args.substitute.split(',') if kv),
               memory_limit_bytes=(int(args.memory_limit_gib * GIB)
                                   if args.memory_limit_gib else None),
               only_groups=[g for g in args.groups.split(',') if g],
               context=_load(args.context) if args.context else None)
  print()
  print(markdown(r))
  print(f'wrote {out} and {os.path.splitext(out)[0]}.md')
  return 0


if __name__ == '__main__':
  sys.exit(main())
