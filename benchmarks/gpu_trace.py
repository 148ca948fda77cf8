"""The top kernels of a jax.profiler trace: total time per kernel name from the Perfetto JSON
that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes.

The file (`perfetto_trace.json.gz`, also `<host>.trace.json.gz`) is gzip JSON with
'traceEvents': 'M' events name the processes and threads, 'X' events are spans with 'dur' in
microseconds. On a GPU the kernels are the spans on the device process's stream lines
('/device:GPU:0', threads 'Stream #N(...)'); the device's derived lines ('XLA Ops', 'XLA
Modules', ...) repeat the same time grouped differently and are read apart ('XLA Ops' gives the
top HLO ops). On the CPU the kernels run on XLA's host threads among the runtime's own spans
(ThunkExecutor, PjitFunction, Python frames '$file:line'), which are left out by name.

Used by benchmarks/gpu_step.py (the profile of the best ViT-B/16 step); pure Python, so the
tests run it on CPU traces and on a synthetic GPU-shaped trace.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from typing import Optional

# Spans of the runtime, not kernels (host traces).
HOST_SKIP_PREFIXES = ('ThunkExecutor', '$', 'PjitFunction', 'ThreadpoolListener', 'end: ',
                      'CommonPjRt', 'PjRt', 'TfrtCpu', 'PythonRefManager', 'ParseArguments')
# Lines of a device process that re-present its stream activity (not more kernels).
DERIVED_LINES = ('XLA Modules', 'XLA Ops', 'XLA TraceMe', 'Steps', 'Launch Stats',
                 'TensorFlow Ops', 'TensorFlow Name Scope', 'Framework Ops',
                 'Framework Name Scope', 'Source code', 'Async XLA Ops', 'SparseCore')

# Kernel families by name (a kernel's name says what produced it).
CATEGORIES = (
    ('attention', ('fmha', 'flash', 'cudnn', 'attention', 'sdpa', 'softmax')),
    ('gemm', ('gemm', 'xmma', 'cutlass', 'nvjet', 'cublas', 'sm90_', 'sm80_', 'ampere_',
              'dot', 'matmul', 'wgmma')),
    ('memcpy', ('memcpy', 'memset', 'copy')),
    ('fusion', ('fusion', 'reduce', 'loop_', 'input_', 'transpose', 'convert', 'broadcast',
                'concatenate', 'slice', 'scatter', 'gather')),
)


def find_trace(log_dir: str) -> Optional[str]:
  """The newest Perfetto trace under `log_dir` (perfetto_trace.json.gz preferred)."""
  for pattern in ('**/perfetto_trace.json.gz', '**/*.trace.json.gz'):
    found = glob.glob(os.path.join(log_dir, pattern), recursive=True)
    if found:
      return max(found, key=os.path.getmtime)
  return None


def load(path: str):
  """(X events, {pid: process name}, {(pid, tid): thread name})."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  processes, threads, spans = {}, {}, []
  for e in events:
    ph = e.get('ph')
    if ph == 'M' and e.get('name') == 'process_name':
      processes[e.get('pid')] = str(e.get('args', {}).get('name', ''))
    elif ph == 'M' and e.get('name') == 'thread_name':
      threads[(e.get('pid'), e.get('tid'))] = str(e.get('args', {}).get('name', ''))
    elif ph == 'X' and 'dur' in e and 'name' in e:
      spans.append(e)
  return spans, processes, threads


def is_host_kernel(name: str) -> bool:
  """A host span that is an XLA kernel ('ynn_fusion.136', 'dot.3'), not a runtime span."""
  return (bool(name) and not name.startswith(HOST_SKIP_PREFIXES) and ' ' not in name
          and '::' not in name and '(' not in name)


def category(name: str) -> str:
  low = name.lower()
  for cat, keys in CATEGORIES:
    if any(k in low for k in keys):
      return cat
  return 'other'


def _aggregate(spans, top: int, steps: Optional[int]) -> dict:
  total_us = collections.defaultdict(float)
  count = collections.Counter()
  hlo = collections.defaultdict(list)
  for e in spans:
    total_us[e['name']] += float(e['dur'])
    count[e['name']] += 1
    op = (e.get('args') or {}).get('hlo_op')
    if op and len(hlo[e['name']]) < 3 and op not in hlo[e['name']]:
      hlo[e['name']].append(str(op))
  grand = sum(total_us.values())
  rows = []
  for name, us in sorted(total_us.items(), key=lambda kv: -kv[1])[:top]:
    r = {'name': name[:160], 'total_ms': us / 1e3, 'count': count[name],
         'share': us / grand if grand else 0.0, 'category': category(name)}
    if steps:
      r['ms_per_step'] = us / 1e3 / steps
    if hlo[name]:
      r['hlo_ops'] = hlo[name]
    rows.append(r)
  cats = collections.defaultdict(float)
  for name, us in total_us.items():
    cats[category(name)] += us
  start = min((float(e['ts']) for e in spans if 'ts' in e), default=0.0)
  end = max((float(e['ts']) + float(e['dur']) for e in spans if 'ts' in e), default=0.0)
  return {'rows': rows, 'kernels': len(total_us), 'spans': len(spans), 'total_ms': grand / 1e3,
          'window_ms': (end - start) / 1e3,
          'category_shares': {k: v / grand for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
                             if grand else {}}


def top_kernels(path: str, top: int = 15, steps: Optional[int] = None) -> dict:
  """The `top` kernels by total time in the trace at `path`, with their share of all kernel
  time; 'source' says which spans were counted (device streams, or host XLA threads)."""
  spans, processes, threads = load(path)
  device = {pid for pid, name in processes.items() if name.startswith('/device:')}
  out = {'trace': path}
  if device:
    lines = {key: name for key, name in threads.items() if key[0] in device}
    streams = {k for k, n in lines.items() if n.startswith('Stream')}
    if not streams:
      streams = {k for k, n in lines.items() if not n.startswith(DERIVED_LINES)}
    kernel_spans = [e for e in spans if (e.get('pid'), e.get('tid')) in streams]
    out['source'] = 'device streams: ' + ', '.join(sorted({lines.get(k, str(k)) for k in streams}))
    ops = {k for k, n in lines.items() if n == 'XLA Ops'}
    if ops:
      out['xla_ops'] = _aggregate([e for e in spans if (e.get('pid'), e.get('tid')) in ops],
                                  top, steps)['rows']
  else:
    kernel_spans = [e for e in spans if is_host_kernel(e['name'])]
    out['source'] = 'host XLA threads (runtime spans left out)'
  agg = _aggregate(kernel_spans, top, steps)
  # Kernel time over the span of the traced window: on one GPU stream, the device's busy share.
  busy = agg['total_ms'] / agg['window_ms'] if agg['window_ms'] else None
  out.update(top=agg['rows'], kernels=agg['kernels'], kernel_spans=agg['spans'],
             kernel_total_ms=agg['total_ms'], window_ms=agg['window_ms'],
             kernel_time_over_window=busy, category_shares=agg['category_shares'])
  return out
