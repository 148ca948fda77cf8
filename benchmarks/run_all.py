"""Every benchmark of the project in one run: a results table of ratios, each measured within
this run (two things timed in alternation, so that a noisy, shared machine slows both alike).

  python -m benchmarks.run_all [--quick] [--out benchmarks/results.json] [--only NAME,...]

Writes the results as JSON (`--out`; default benchmarks/results.json, or
benchmarks/results_quick.json with --quick, so a quick run never overwrites full results)
and the table as Markdown beside it (same name, .md), and prints the table.

A row: name, what was compared, the two measurements (label, value, unit), their ratio and
what it means, the target where the design sets one, the settings, the machine (cores, jax
version, backend, load average), the raw details, and a status: 'ok', 'skipped: <why>'
(an optional dependency such as faiss-cpu, torch or open_clip is missing, or no GPU) or
'error: <what>' (the run then exits 1 after writing everything else).

Rows (full run; --quick runs the same rows at tiny sizes, 1-layer models, for the tests;
the settings of each row say its sizes):
  dpo_listwise_vs_pairwise      ranked DPO pairs/s, listwise vs pairwise, u = v = 5, the align
                                stage's 8 groups per step (>= 14x; encode ratio 16x)
  dpo_listwise_vs_online_ref    the same vs pairwise with an online reference model
  train_step_mfu_tiny           tiny model's train step at batch 128: FLOP/s vs an fp32 matmul's
  train_step_mfu_vit_b32        ViT-B/32's train step at batch 8: FLOP/s vs an fp32 matmul's
  train_step_vs_open_clip       that ViT-B/32 step, ours vs open_clip (PyTorch), batch 8
  train_step_bf16_vs_fp32       that step with model.dtype bfloat16 vs float32 (>= 2)
  train_step_vs_open_clip_bf16  ours bf16 vs open_clip under bf16 autocast (>= 1)
  malloc_tunables               tiny pretrain step, cpu_malloc's glibc settings vs system malloc
  malloc_tunables_job           the same in the default job's pretrain stage (main.py)
  xla_cpu_bf16_dot              bf16 vs fp32 matmul through XLA:CPU, best XLA_FLAGS (>= 2)
  train_step_bf16_host_matmul   ViT-B/32 step with Dense matmuls on torch's bf16 kernel
  corpus_embedding              embed_corpus end to end vs the jitted embedding alone
  topk_vs_faiss                 top-100 of 100k x 512 for 1,000 queries, ours vs faiss-cpu
  pairs_pipeline_vs_pretrain_step  world input pipeline batches/s vs pretrain steps/s (>= 2)
  groups_pipeline_vs_align_step    preference-group pipeline vs align steps/s (>= 2)
  fwd_bwd_vs_transformers       forward + backward at batch 8, ours vs transformers' CLIPModel
  gpu_step                      ViT-B/16 bf16 MFU on a GPU (skipped on CPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from typing import Callable, Optional

import jax
import numpy as np

from aesalign_jax.models import clip

TINY_QUICK = dict(vision_layers=1, text_layers=1)   # --quick: 1-layer towers, fast compiles


# ------------------------------------------------------------------------------------ rows


def measure(label: str, value: float, unit: str) -> dict:
  return {'label': label, 'value': float(value), 'unit': unit}


def row(name: str, compared: str, a: dict, b: dict, ratio: float, ratio_is: str, *,
        settings: dict, target_min: Optional[float] = None, details: Optional[dict] = None
        ) -> dict:
  """One result: measurements a and b, ratio (as `ratio_is` says), optional target."""
  out = {'name': name, 'status': 'ok', 'compared': compared, 'a': a, 'b': b,
         'ratio': float(ratio), 'ratio_is': ratio_is, 'settings': settings}
  if target_min is not None:
    out['target'] = f'>= {target_min:g}'
    out['meets_target'] = bool(ratio >= target_min)
  out['details'] = details or {}
  return out


def not_run(name: str, compared: str, status: str, settings: Optional[dict] = None) -> dict:
  return {'name': name, 'status': status, 'compared': compared, 'settings': settings or {}}


# ------------------------------------------------------------------------------ benchmarks


def bench_dpo(quick: bool) -> list:
  from benchmarks import dpo_speed  # pylint: disable=g-import-not-at-top
  from aesalign_jax import train  # pylint: disable=g-import-not-at-top
  cfg = clip.preset('tiny', **(TINY_QUICK if quick else {}))
  # The align stage's own step: its default groups per step (8: 200 images). The listwise
  # step costs about 29 ms fixed (AdamW over 1.8M parameters, the guard, launch costs) plus
  # 52 ms per group (fit over 1-16 groups in one run, loaded machine): 22% of a 2-group step,
  # 6.5% of an 8-group one, so the ratio at 8 groups is the one the stage sees.
  groups = 1 if quick else train.default_config('align').groups_per_step
  repeats = 1 if quick else 5
  r = dpo_speed.compare(groups=groups, repeats=repeats, cfg=cfg,
                        max_seconds=None if quick else 45)
  settings = {'model': 'tiny', 'layers': [cfg.vision_layers, cfg.text_layers], 'u': r['u'],
              'v': r['v'], 'pair_rule': 'product', 'groups': groups,
              'pairs_per_step': r['pairs_per_step'], 'max_repeats': repeats}
  compared = 'ranked DPO train step, pairs/s: listwise (each image encoded once) vs '
  return [
      row('dpo_listwise_vs_pairwise', compared + 'pairwise (chosen and rejected per pair, as TRL)',
          measure('listwise', r['listwise_pairs_per_s'], 'pairs/s'),
          measure('pairwise', r['pairwise_pairs_per_s'], 'pairs/s'),
          r['listwise_over_pairwise'], 'listwise / pairwise pairs/s', settings=settings,
          target_min=14.0, details=r),
      row('dpo_listwise_vs_online_ref', compared + 'pairwise with an online reference model',
          measure('listwise', r['listwise_pairs_per_s'], 'pairs/s'),
          measure('pairwise + online ref', r['pairs_per_step'] / r['pairwise_online_ref_s'],
                  'pairs/s'),
          r['listwise_over_pairwise_online_ref'], 'listwise / pairwise-online-ref pairs/s',
          settings=settings),
  ]


def _mfu_row(name: str, model: str, r: dict, *, step_key: str, settings: dict) -> dict:
  step_gflops = r['flops_per_step'] / r[step_key] / 1e9
  return row(name, f'{model} train step (fwd + bwd + AdamW, fp32) FLOP/s vs an fp32 '
             f'{r["matmul_n"]}^2 matmul\'s, timed in alternation (FLOPs: metrics.clip_flops)',
             measure('train step', step_gflops, 'GFLOP/s'),
             measure('matmul peak', r['matmul_peak_gflops'], 'GFLOP/s'),
             step_gflops / r['matmul_peak_gflops'], 'MFU (step / matmul FLOP/s)',
             settings=settings, details=r)


def bench_vit_b32(quick: bool) -> list:
  from benchmarks import open_clip_speed  # pylint: disable=g-import-not-at-top
  cfg = clip.preset('tiny', **TINY_QUICK) if quick else clip.preset('vit_b32')
  model, batch = ('tiny-1-layer' if quick else 'vit_b32'), 8
  kw = dict(repeats=2, matmul_n=512) if quick else dict(repeats=5, max_seconds=60)
  r = open_clip_speed.compare(cfg, batch, bf16=True, **kw)
  settings = {'model': model, 'batch': batch, 'dtype': 'float32', 'repeats':
              r['timings']['ours']['n']}
  rows = [_mfu_row('train_step_mfu_vit_b32', model, r, step_key='ours_s', settings=settings)]
  name = 'train_step_vs_open_clip'
  compared = ('contrastive train step (fwd + bwd + AdamW), same weights and loss: ours (JAX) '
              'vs open_clip (PyTorch)')
  if 'open_clip_skipped' in r:
    rows.append(not_run(name, compared, f"skipped: {r['open_clip_skipped']}", settings))
  else:
    rows.append(row(name, compared, measure('ours', r['ours_s'], 's/step'),
                    measure('open_clip', r['open_clip_s'], 's/step'),
                    r['open_clip_over_ours'], 'open_clip s / ours s (> 1: ours faster)',
                    settings={**settings, 'open_clip': r['open_clip_version'],
                              'torch': r['torch_version'], 'torch_threads': r['torch_threads']},
                    details=r))
  b = r['bf16']
  bf16_settings = {**settings, 'dtype': 'bfloat16'}
  rows.append(row('train_step_bf16_vs_fp32', f'our {model} train step, model.dtype bfloat16 vs '
                  'float32 (XLA:CPU)', measure('bf16', b['ours_s'], 's/step'),
                  measure('fp32', r['ours_s'], 's/step'), b['ours_f32_over_ours_bf16'],
                  'fp32 s / bf16 s (> 1: bf16 faster)', settings=bf16_settings,
                  target_min=2.0, details=b))
  name = 'train_step_vs_open_clip_bf16'
  compared = (f'{model} train step in bf16: ours (model.dtype bfloat16) vs open_clip under '
              "torch.autocast('cpu', bfloat16), its best CPU setting")
  if 'open_clip_skipped' in r:
    rows.append(not_run(name, compared, f"skipped: {r['open_clip_skipped']}", bf16_settings))
  else:
    rows.append(row(name, compared, measure('ours bf16', b['ours_s'], 's/step'),
                    measure('open_clip bf16', b['open_clip_s'], 's/step'),
                    b['open_clip_over_ours'], 'open_clip s / ours s (> 1: ours faster)',
                    settings={**bf16_settings, 'torch_threads': b['torch_threads']},
                    target_min=1.0, details=b))
  return rows


def bench_malloc(quick: bool) -> list:
  from benchmarks import malloc_speed  # pylint: disable=g-import-not-at-top
  from aesalign_jax import cpu_malloc  # pylint: disable=g-import-not-at-top
  name, job_name = 'malloc_tunables', 'malloc_tunables_job'
  compared = ('tiny pretrain step (batch 128) alone in child processes, alternated: the opt-in '
              'glibc malloc settings of aesalign_jax/cpu_malloc.py vs the system malloc')
  job_compared = ("the default job's pretrain stage (main.py, 100 steps, data pipeline "
                  'running), alternated: the same settings vs the system malloc')
  if not cpu_malloc.supported():
    return [not_run(n, c, 'skipped: needs Linux with glibc')
            for n, c in ((name, compared), (job_name, job_compared))]
  if quick:   # more jax processes; tests/test_cpu_malloc.py runs the step comparison
    return [not_run(n, c, 'skipped: a quick run (tests/test_cpu_malloc.py measures the step)')
            for n, c in ((name, compared), (job_name, job_compared))]
  r = malloc_speed.compare()
  j = malloc_speed.compare_job()
  return [row(name, compared, measure('tuned', r['tuned']['step_s'], 's/step'),
              measure('system malloc', r['system']['step_s'], 's/step'),
              r['system_over_tuned'], 'system s / tuned s (> 1: the settings are faster)',
              settings={'batch': r['batch'], 'steps': r['steps'], 'rounds': r['rounds'],
                        'faults_per_step': [round(r['tuned']['minor_faults']),
                                            round(r['system']['minor_faults'])]},
              details=r),
          row(job_name, job_compared, measure('tuned', j['tuned_step_s'], 's/step'),
              measure('system malloc', j['system_step_s'], 's/step'),
              j['system_over_tuned'], 'system s / tuned s (> 1: the settings are faster)',
              settings={'steps': j['steps'], 'rounds': j['rounds']}, details=j)]


def bench_cpu_bf16(quick: bool) -> list:
  from benchmarks import cpu_bf16  # pylint: disable=g-import-not-at-top
  r = cpu_bf16.run(quick)
  probes = [p for p in r['xla_flags'] if 'error' not in p]
  bf16_dots = [p['xla_flags'] for p in probes if 'bf16' in p['dot_types']]
  best = max(probes, key=lambda p: p['bf16_gflops'] / p['f32_gflops'])
  n = '256' if quick else '2048'
  rows = [row('xla_cpu_bf16_dot', f'bf16 {n}^2 matmul vs fp32 through XLA:CPU, best of '
              f'{len(r["xla_flags"])} XLA_FLAGS settings (oneDNN, XNNPACK, YNNPACK); settings '
              f'that keep a bf16 dot after compiling: {bf16_dots or "none"}',
              measure('bf16', best['bf16_gflops'], 'GFLOP/s'),
              measure('fp32', best['f32_gflops'], 'GFLOP/s'),
              best['bf16_gflops'] / best['f32_gflops'], 'bf16 / fp32 GFLOP/s',
              settings={'cpu': r['cpu']['model'], 'amx_bf16': r['cpu'].get('amx_bf16'),
                        'avx512_bf16': r['cpu'].get('avx512_bf16'),
                        'best_flags': best['xla_flags'] or '(none)'}, target_min=2.0,
              details=r)]
  t = r['train_step']
  rows.append(row('train_step_bf16_host_matmul', f"{t['preset']} train step with every Dense "
                  'matmul handed to torch\'s bf16 kernel (jax.pure_callback with its own '
                  'gradient) vs fp32 XLA', measure('bf16 host matmul',
                                                   t['step_s']['bf16_host_matmul'], 's/step'),
                  measure('fp32', t['step_s']['f32'], 's/step'),
                  t['f32_over_bf16_host_matmul'], 'fp32 s / host-matmul s (> 1: faster)',
                  settings={'model': t['preset'], 'batch': t['batch'],
                            'overrides': t['overrides']}, details=t))
  return rows


def bench_transformers(quick: bool) -> list:
  from benchmarks import model_speed  # pylint: disable=g-import-not-at-top
  r = model_speed.compare('tiny', 8, 3 if quick else 10, **(TINY_QUICK if quick else {}))
  return [row('fwd_bwd_vs_transformers',
              "contrastive loss forward + backward, same weights: ours (JAX) vs transformers' "
              'PyTorch CLIPModel', measure('ours', r['ours_s'], 's/step'),
              measure('transformers', r['torch_s'], 's/step'), r['torch_over_ours'],
              'transformers s / ours s (> 1: ours faster)',
              settings={'model': 'tiny', 'batch': 8, 'overrides': r['overrides'],
                        'torch_threads': r['torch_threads']}, details=r)]


def bench_retrieval(quick: bool) -> list:
  from benchmarks import retrieval_speed  # pylint: disable=g-import-not-at-top
  e = retrieval_speed.embed_throughput(1024 if quick else 8192,
                                       **(TINY_QUICK if quick else {}))
  rows = [row('corpus_embedding', 'corpus embedding of world images, images/s: embed_corpus '
              'end to end (render, embed, write shards) vs the jitted embedding alone',
              measure('end to end', e['embed_corpus_images_per_s'], 'images/s'),
              measure('embedding alone', e['embed_images_per_s'], 'images/s'),
              e['embed_corpus_images_per_s'] / e['embed_images_per_s'],
              'end to end / embedding alone', settings={'model': 'tiny', 'images': e['images'],
                                                         'batch': e['batch_size']}, details=e)]
  n, queries, k = (10_000, 100, 10) if quick else (100_000, 1000, 100)
  t = retrieval_speed.topk_speed(n, 512, queries, k, repeats=2 if quick else 5,
                                 max_seconds=None if quick else 45)
  settings = {'corpus': n, 'dim': 512, 'queries': queries, 'k': k, 'device': t['device']}
  compared = (f'exact top-{k} by inner product: ours (chunked, corpus on device) vs faiss-cpu '
              'IndexFlatIP')
  if 'faiss' in t:
    rows.append(not_run('topk_vs_faiss', compared, f"skipped: faiss-cpu {t['faiss']}",
                        settings))
  else:
    rows.append(row('topk_vs_faiss', compared,
                    measure('ours', t['ours_device_corpus_s'], 's'),
                    measure('faiss', t['faiss_flat_ip_s'], 's'), t['faiss_over_ours_device'],
                    'faiss s / ours s (> 1: ours faster)',
                    settings={**settings, 'faiss_threads': t['faiss_threads']}, details=t))
  return rows


def bench_input(quick: bool) -> list:
  from benchmarks import input_speed  # pylint: disable=g-import-not-at-top
  s = input_speed.make_setup(quick)
  kw = dict(repeats=2, matmul_n=512) if quick else dict(repeats=5, max_seconds=40)
  p = input_speed.pairs_vs_pretrain(s, batches=4 if quick else 16, **kw)
  batch = p['batch_size']
  settings = {'model': 'tiny', 'layers': p['model_layers'], 'batch': batch,
              'image_size': p['image_size'], 'worker_count': p['worker_count'],
              'batches_per_pipeline_run': p['batches_per_pipeline_run'],
              'repeats': p['timings']['train_step']['n']}
  rows = [
      _mfu_row('train_step_mfu_tiny', 'tiny', {
          'flops_per_step': p['train_step_flops'], 'matmul_n': p['matmul_n'],
          'matmul_peak_gflops': p['matmul_peak_gflops'], 'step_s': p['train_step_s'],
          'timings': p['timings']}, step_key='step_s', settings=settings),
      row('pairs_pipeline_vs_pretrain_step',
          'world image-text input pipeline as the pretrain stage builds it, alone, vs the '
          'pretrain steps it feeds', measure('pipeline', p['pipeline_batches_per_s'], 'batches/s'),
          measure('train', p['train_steps_per_s'], 'steps/s'), p['pipeline_over_train'],
          'pipeline batches/s / train steps/s', settings=settings, target_min=2.0, details=p),
  ]
  g = input_speed.groups_vs_align(s, batches=2 if quick else 8,
                                  max_queries=24 if quick else None, **kw)
  rows.append(row('groups_pipeline_vs_align_step',
                  'preference-group input pipeline as the align stage builds it, alone, vs the '
                  'align steps it feeds (pairs + groups)',
                  measure('pipeline', g['pipeline_batches_per_s'], 'batches/s'),
                  measure('train', g['train_steps_per_s'], 'steps/s'), g['pipeline_over_train'],
                  'pipeline batches/s / train steps/s',
                  settings={'model': 'tiny', 'groups_per_step': g['groups_per_step'],
                            'u': g['u'], 'v': g['v'], 'pairs_per_step': g['pairs_per_step'],
                            'batches_per_pipeline_run': g['batches_per_pipeline_run']},
                  target_min=2.0, details=g))
  return rows


def bench_gpu(quick: bool) -> list:
  compared = 'ViT-B/16 bf16 train steps vs a bf16 matmul (MFU), and listwise vs pairwise DPO'
  if jax.default_backend() not in ('gpu', 'tpu') or quick:
    why = ('a quick run' if quick else f'needs a GPU (backend is {jax.default_backend()})')
    return [not_run('gpu_step', compared, f'skipped: {why}; run python -m '
                    'benchmarks.gpu_step on one')]
  from benchmarks import gpu_step  # pylint: disable=g-import-not-at-top
  r = gpu_step.run(clip.preset('vit_b16', dtype='bfloat16'), [1024, 768, 512, 256])
  rows = []
  for kind in ('pretrain', 'align'):
    k = r[kind]
    rows.append(row(f'gpu_step_mfu_{kind}', f'ViT-B/16 bf16 {kind} step FLOP/s vs a bf16 '
                    'matmul\'s', measure('train step', k['tflops_per_s'], 'TFLOP/s'),
                    measure('matmul peak', r['matmul_peak_tflops'], 'TFLOP/s'), k['mfu'],
                    'MFU', settings={'batch': k['batch'], 'groups': k['groups'],
                                     'device': r['device']}, details=k))
  d = r['dpo_listwise_vs_pairwise']
  rows.append(row('gpu_dpo_listwise_vs_pairwise', 'ViT-B/16 ranked DPO pairs/s, listwise vs '
                  'pairwise', measure('listwise', d['listwise_pairs_per_s'], 'pairs/s'),
                  measure('pairwise', d['pairwise_pairs_per_s'], 'pairs/s'),
                  d['listwise_over_pairwise'], 'listwise / pairwise pairs/s',
                  settings={'groups': d['groups'], 'device': r['device']}, target_min=8.0,
                  details=d))
  return rows


# name -> (function, the rows it writes, what they compare: for skipped / error rows)
BENCHMARKS: dict[str, tuple[Callable[[bool], list], tuple, str]] = {
    'dpo': (bench_dpo, ('dpo_listwise_vs_pairwise', 'dpo_listwise_vs_online_ref'),
            'ranked DPO pairs/s, listwise vs pairwise'),
    'input': (bench_input, ('train_step_mfu_tiny', 'pairs_pipeline_vs_pretrain_step',
                            'groups_pipeline_vs_align_step'),
              'input pipelines vs train steps; tiny train-step MFU'),
    'vit_b32': (bench_vit_b32, ('train_step_mfu_vit_b32', 'train_step_vs_open_clip',
                                'train_step_bf16_vs_fp32', 'train_step_vs_open_clip_bf16'),
                'ViT-B/32 train step: MFU, ours vs open_clip, fp32 and bf16'),
    'retrieval': (bench_retrieval, ('corpus_embedding', 'topk_vs_faiss'),
                  'corpus embedding; top-K vs faiss-cpu'),
    'transformers': (bench_transformers, ('fwd_bwd_vs_transformers',),
                     'forward + backward, ours vs transformers'),
    'gpu': (bench_gpu, ('gpu_step',), 'GPU train-step MFU'),
    'malloc': (bench_malloc, ('malloc_tunables', 'malloc_tunables_job'),
               'glibc malloc settings vs system malloc'),
    'cpu_bf16': (bench_cpu_bf16, ('xla_cpu_bf16_dot', 'train_step_bf16_host_matmul'),
                 'bf16 on the CPU: XLA flags, a host matmul through torch'),
}
# Table order: the list.
ORDER = ('dpo_listwise_vs_pairwise', 'dpo_listwise_vs_online_ref', 'train_step_mfu_tiny',
         'train_step_mfu_vit_b32', 'train_step_vs_open_clip', 'train_step_bf16_vs_fp32',
         'train_step_vs_open_clip_bf16', 'malloc_tunables_job', 'malloc_tunables',
         'xla_cpu_bf16_dot',
         'train_step_bf16_host_matmul',
         'corpus_embedding', 'topk_vs_faiss',
         'pairs_pipeline_vs_pretrain_step', 'groups_pipeline_vs_align_step',
         'fwd_bwd_vs_transformers', 'gpu')


def _order(r: dict) -> int:
  return next((i for i, prefix in enumerate(ORDER) if r['name'].startswith(prefix)), len(ORDER))


# ---------------------------------------------------------------------------------- machine

# A row is "quiet" when other processes used at most this share of the machine's CPU time
# while it ran. The load average cannot say it: the benchmark's own threads count in it
# (one row alone lifts a 2-core machine's 1-minute average to about 2), and it lags a minute.
QUIET_OTHERS_SHARE = 0.10


class OthersCpu:
  """CPU time used by processes other than this one (and its children) since construction,
  as a share of the machine's cores x wall time: from /proc/stat's busy jiffies minus this
  process's own user + system time."""

  def __init__(self):
    self._start = self._read()

  @staticmethod
  def _read():
    try:
      with open('/proc/stat', encoding='ascii') as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
      return None
    hz = os.sysconf('SC_CLK_TCK')
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / hz  # - idle, iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

  def share(self) -> Optional[float]:
    end = self._read()
    if self._start is None or end is None:
      return None
    busy, ours, wall = (e - s for e, s in zip(end, self._start))
    return max(0.0, busy - ours) / max(wall * (os.cpu_count() or 1), 1e-9)


def _pct(share: Optional[float]) -> str:
  return 'unknown' if share is None else f'{100 * share:.0f}%'



def _version(module: str) -> Optional[str]:
  try:
    return __import__(module).__version__
  except Exception:  # pylint: disable=broad-except  (absent or broken: just not reported)
    return None


def machine_info() -> dict:
  return {'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'python': platform.python_version(),
          'platform': platform.platform(), 'numpy': np.__version__,
          'torch': _version('torch'), 'faiss': _version('faiss'),
          'load_average_1m': os.getloadavg()[0]}


# ------------------------------------------------------------------------------------- run


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def run(quick: bool = False, only: Optional[list] = None, log=print) -> dict:
  """Runs the benchmarks (all, or those named in `only`); returns the results dict."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()   # grain reads absl flags
  names = list(BENCHMARKS) if not only else only
  unknown = set(names) - set(BENCHMARKS)
  if unknown:
    raise ValueError(f'unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHMARKS)}')
  machine = machine_info()
  started = time.perf_counter()
  rows = []
  for name in names:
    fn, row_names, compared = BENCHMARKS[name]
    log(f'[run_all] {name} ...', flush=True)
    load_before = os.getloadavg()[0]
    others_cpu = OthersCpu()
    t0 = time.perf_counter()
    try:
      new = fn(quick)
    except ImportError as e:
      new = [not_run(n, compared, f'skipped: {e}') for n in row_names]
    except Exception as e:  # pylint: disable=broad-except  (one failure must not hide the rest)
      traceback.print_exc()
      new = [not_run(n, compared, f'error: {type(e).__name__}: {e}') for n in row_names]
    seconds = time.perf_counter() - t0
    others = others_cpu.share()
    load_after = os.getloadavg()[0]
    for r in new:
      r['seconds'] = seconds
      r['machine'] = {'cpu_count': machine['cpu_count'], 'jax': machine['jax'],
                      'backend': machine['backend'], 'load_average_1m_before': load_before,
                      'load_average_1m_after': load_after, 'others_cpu_share': others,
                      'quiet': others is not None and others <= QUIET_OTHERS_SHARE}
      if r['status'] == 'ok' and not all(_finite(x) for x in
                                         (r['a']['value'], r['b']['value'], r['ratio'])):
        r['status'] = 'error: a measurement is not finite'
    rows.extend(new)
    log(f'[run_all] {name}: {seconds:.0f} s; load average {load_before:.1f} -> '
        f'{load_after:.1f}; other processes used {_pct(others)} of the CPUs', flush=True)
  rows.sort(key=_order)
  machine['load_average_1m_end'] = os.getloadavg()[0]
  machine['quiet'] = all(r['machine']['quiet'] for r in rows)
  return {'quick': quick, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'total_seconds': time.perf_counter() - started, 'machine': machine, 'rows': rows}


def _fmt(x: float) -> str:
  if x == 0 or not math.isfinite(x):
    return str(x)
  if abs(x) >= 100:
    return f'{x:,.0f}'
  return f'{x:.3g}'


def markdown(result: dict) -> str:
  """The results as a Markdown table with a line on the machine."""
  m = result['machine']
  lines = [
      f"Benchmarks ({'quick' if result['quick'] else 'full'} run, {result['date']}, "
      f"{result['total_seconds'] / 60:.1f} min): {m['cpu_count']} CPU cores, jax {m['jax']} "
      f"({m['backend']}, {m['device']}), torch {m['torch']}, faiss {m['faiss']}; load average "
      f"{m['load_average_1m']:.1f} at the start, {m['load_average_1m_end']:.1f} at the end. "
      'Each ratio is measured within this run, its two sides timed in alternation. '
      + ('A quiet run: ' if m.get('quiet') else '**Not a quiet run**: ')
      + f'a row is quiet when other processes used at most {QUIET_OTHERS_SHARE:.0%} of the '
      'CPUs while it ran (column "others").', '',
      '| benchmark | compared | A | B | ratio | target | load before -> after; others |'
      ' settings |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in result['rows']:
    settings = ', '.join(f'{k} {v}' for k, v in r.get('settings', {}).items())
    mach = r.get('machine', {})
    load = (f"{mach.get('load_average_1m_before', float('nan')):.1f} -> "
            f"{mach.get('load_average_1m_after', float('nan')):.1f}; "
            f"{_pct(mach.get('others_cpu_share'))}" + ('' if mach.get('quiet') else ' (busy)'))
    if r['status'] != 'ok':
      lines.append(f"| {r['name']} | {r['compared']} | | | {r['status']} | | {load} | "
                   f"{settings} |")
      continue
    a, b = r['a'], r['b']
    target = r.get('target', '')
    if target:
      target += ' (met)' if r['meets_target'] else ' (**not met**)'
    lines.append(f"| {r['name']} | {r['compared']} | {a['label']}: {_fmt(a['value'])} "
                 f"{a['unit']} | {b['label']}: {_fmt(b['value'])} {b['unit']} | "
                 f"**{_fmt(r['ratio'])}** ({r['ratio_is']}) | {target} | {load} | {settings} |")
  return '\n'.join(lines) + '\n'


def write(result: dict, out: str) -> str:
  """Writes out (JSON) and the Markdown table beside it; returns the Markdown path."""
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  result = json.loads(json.dumps(result, default=float))   # the table shows what the JSON holds
  with open(out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
    f.write('\n')
  md = os.path.splitext(out)[0] + '.md'
  with open(md, 'w', encoding='utf-8') as f:
    f.write(markdown(result))
  return md


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny sizes (for the tests)')
  parser.add_argument('--out', default='', help='results JSON (default benchmarks/results.json,'
                      ' benchmarks/results_quick.json with --quick)')
  parser.add_argument('--only', default='', help=f'comma-separated subset of {list(BENCHMARKS)}')
  args = parser.parse_args(argv)
  here = os.path.dirname(os.path.abspath(__file__))
  out = args.out or os.path.join(here, 'results_quick.json' if args.quick else 'results.json')
  result = run(args.quick, [n for n in args.only.split(',') if n] or None)
  md = write(result, out)
  with open(md, encoding='utf-8') as f:
    print(f.read())
  print(f'wrote {out} and {md} in {result["total_seconds"]:.0f} s')
  return 1 if any(r['status'].startswith('error') for r in result['rows']) else 0


if __name__ == '__main__':
  sys.exit(main())
