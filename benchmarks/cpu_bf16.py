"""Can XLA:CPU run the model's bf16 matmuls on the CPU's bf16 units (AMX-BF16, AVX512-BF16)?

  python -m benchmarks.cpu_bf16 [--quick] [--preset vit_b32 --batch 8]

Three measurements, each in one run:
  1. xla_flags: for each XLA_FLAGS setting that names a oneDNN / XNNPACK / YNNPACK path, a
     subprocess compiles a bf16 [n, n] x [n, n] dot and reports the operand type of the dot
     XLA:CPU actually emits, and bf16 and fp32 GFLOP/s. In jaxlib 0.10.2 every setting emits
     convert(bf16 -> f32), an f32 dot, convert back: bf16 compute never reaches the matrix
     units, so bf16 is no faster than fp32.
  2. matmul_rates: GFLOP/s at the model's own shapes of jax fp32, jax bf16, torch fp32, torch
     bf16 (oneDNN: AMX where the CPU has it, else AVX512-BF16) and jax with the matmul handed
     to torch's bf16 kernel through `host_bf16_matmul` (a jax.pure_callback with its own
     gradient: the custom-call route without writing a C++ extension).
  3. train_step: our contrastive train step (fwd + bwd + AdamW) in fp32, in bf16 as XLA
     compiles it, and in bf16 with every Dense layer's matmul through host_bf16_matmul,
     timed in alternation.
The answer decides `model.dtype` on CPU: bf16 is worth using there only if (3) shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing

# XLA_FLAGS settings whose names promise another matmul library (all exist in jaxlib 0.10.2:
# an unknown flag aborts the process, which the probe reports).
FLAG_SETS = (
    '',
    '--xla_cpu_use_onednn=true',
    '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
    '--xla_cpu_experimental_onednn_fusion_type=dot',
    '--xla_cpu_use_xnnpack=true',
    '--xla_cpu_experimental_xnn_fusion_type=dot',
    '--xla_cpu_experimental_ynn_fusion_type=dot',
    '--xla_cpu_use_xnnpack=false --xla_cpu_experimental_ynn_fusion_type=',
    '--xla_cpu_max_isa=AVX512_BF16',
    '--xla_cpu_strict_dot_conv_math=true',
)


def cpu_features() -> dict:
  """The CPU's model name and whether it has the bf16 matrix/vector instructions."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      text = f.read()
  except OSError:
    return {'model': 'unknown'}
  model = re.search(r'model name\s*:\s*(.*)', text)
  flags = set((re.search(r'^flags\s*:\s*(.*)$', text, re.M) or [None, ''])[1].split())
  return {'model': model.group(1).strip() if model else 'unknown',
          'amx_bf16': 'amx_bf16' in flags, 'avx512_bf16': 'avx512_bf16' in flags}


# --------------------------------------------------------------------- 1. XLA flag settings


def probe_this_process(n: int) -> dict:
  """The dot XLA:CPU compiles for a bf16 matmul in this process (its XLA_FLAGS), and the
  bf16 and fp32 rates."""
  bf16 = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  hlo = f.lower(bf16, bf16).compile().as_text()
  dot_operands = sorted(set(re.findall(r'\bdot\((bf16|f32|f16)\[', hlo)) |
                        set(re.findall(r' (bf16|f32)\[[^\]]*\][^ ]* dot\(', hlo)))
  rates = {}
  for name, dtype in (('bf16', jnp.bfloat16), ('f32', jnp.float32)):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    rates[name] = 2.0 * n ** 3 / timing.median_seconds(
        lambda: f(x, x).block_until_ready(), warmup=2, repeats=5) / 1e9
  return {'dot_types': dot_operands, 'custom_calls': sorted(set(re.findall(
      r'custom_call_target="([^"]+)"', hlo))), 'bf16_gflops': rates['bf16'],
      'f32_gflops': rates['f32']}


def xla_flags(n: int = 2048, flag_sets=FLAG_SETS, timeout: float = 180) -> list:
  """probe_this_process under each XLA_FLAGS setting, each in a fresh subprocess."""
  rows = []
  for flags in flag_sets:
    env = dict(os.environ, XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.cpu_bf16', '--probe', str(n)],
                          env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {'xla_flags': flags}
    if proc.returncode:
      out['error'] = (proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]
    else:
      out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows.append(out)
  return rows


# ------------------------------------------------- 2. the custom-call route through torch


def _torch_bf16_matmul(a, b):
  import torch  # pylint: disable=g-import-not-at-top
  # The callback's arrays are read-only; torch only reads them (its warning says it could
  # write).
  warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
  # ml_dtypes' bfloat16 and torch's share the bit layout: view through int16, no copy.
  ta = torch.from_numpy(np.array(a, copy=False).view(np.int16)).view(torch.bfloat16)
  tb = torch.from_numpy(np.array(b, copy=False).view(np.int16)).view(torch.bfloat16)
  return (ta @ tb).view(torch.int16).numpy().view(jnp.bfloat16)


def _host_matmul(a, b):
  out = jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.bfloat16)
  return jax.pure_callback(_torch_bf16_matmul, out, a.astype(jnp.bfloat16),
                           b.astype(jnp.bfloat16))


@jax.custom_vjp
def host_bf16_matmul(a, b):
  """a [m, k] @ b [k, n] in bf16 by torch's CPU kernel (fp32 accumulation, bf16 result)."""
  return _host_matmul(a, b)


def _fwd(a, b):
  return _host_matmul(a, b), (a, b)


def _bwd(res, g):
  a, b = res
  return (_host_matmul(g, b.T).astype(a.dtype), _host_matmul(a.T, g).astype(b.dtype))


host_bf16_matmul.defvjp(_fwd, _bwd)


def matmul_rates(shapes, repeats: int = 5) -> list:
  """GFLOP/s of each route at each (m, k, n), timed in alternation."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = []
  for m, k, n in shapes:
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    f32 = jax.jit(lambda x, y: x @ y)
    bf16 = jax.jit(lambda x, y: x.astype(jnp.bfloat16) @ y.astype(jnp.bfloat16))
    host = jax.jit(host_bf16_matmul)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    fns = {'jax_f32': lambda: f32(ja, jb).block_until_ready(),
           'jax_bf16': lambda: bf16(ja, jb).block_until_ready(),
           'jax_host_bf16': lambda: host(ja, jb).block_until_ready(),
           'torch_f32': lambda: ta @ tb, 'torch_bf16': lambda: ta16 @ tb16}
    med = timing.interleaved_medians(fns, warmup=2, repeats=repeats)
    rows.append({'shape': [m, k, n], **{name: 2.0 * m * k * n / s / 1e9
                                        for name, s in med.items()}})
  return rows


# ------------------------------------------------------------------------- 3. train steps


@contextlib.contextmanager
def dense_through_host_matmul():
  """While open, models built and traced use host_bf16_matmul in every Dense layer."""
  from aesalign_jax.models import clip  # pylint: disable=g-import-not-at-top
  original = clip.Dense.__call__

  def call(self, x):
    y = host_bf16_matmul(x.reshape(-1, x.shape[-1]), self.kernel[...]).astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])

  clip.Dense.__call__ = call
  try:
    yield
  finally:
    clip.Dense.__call__ = original


def train_steps(preset: str, batch: int, repeats: int = 3, **overrides) -> dict:
  """Our train step in fp32, bf16 (XLA) and bf16 with the host matmul, in alternation."""
  from aesalign_jax import train  # pylint: disable=g-import-not-at-top
  from aesalign_jax.models import clip  # pylint: disable=g-import-not-at-top
  from benchmarks import steps  # pylint: disable=g-import-not-at-top
  c = train.default_config('pretrain')
  c.batch_size = batch
  fp32 = clip.preset(preset, **overrides)
  pairs = steps.random_pairs(fp32, batch)
  params = clip.init_params(fp32, 0)
  bf16 = clip.preset(preset, dtype='bfloat16', **overrides)
  own = lambda: jax.tree.map(jnp.copy, params)   # each step donates (deletes) its own
  fns = {'f32': steps.TrainStep(fp32, c, 'pretrain', {'pairs': pairs}, params=own()),
         'bf16_xla': steps.TrainStep(bf16, c, 'pretrain', {'pairs': pairs}, params=own())}
  with dense_through_host_matmul():
    fns['bf16_host_matmul'] = steps.TrainStep(bf16, c, 'pretrain', {'pairs': pairs},
                                              params=own())
  first = timing.interleaved_times(fns, warmup=0, repeats=1)   # at the shared initial weights
  losses = {name: fn.loss for name, fn in fns.items()}
  times = timing.interleaved_times(fns, warmup=0, repeats=repeats)
  med = {name: float(np.median(t)) for name, t in times.items()}
  return {'preset': preset, 'batch': batch, 'overrides': overrides, 'first_loss': losses,
          'step_s': med, 'f32_over_bf16_xla': med['f32'] / med['bf16_xla'],
          'f32_over_bf16_host_matmul': med['f32'] / med['bf16_host_matmul'],
          'first_round_s': {k: v[0] for k, v in first.items()},
          'timings': {name: timing.spread(t) for name, t in times.items()}}


def run(quick: bool = False, preset: str = 'vit_b32', batch: int = 8) -> dict:
  from benchmarks import run_all  # pylint: disable=g-import-not-at-top
  shapes = [(2176, 128, 512), (2176, 512, 128), (400, 768, 3072), (2048, 2048, 2048)]
  if quick:
    return {'cpu': cpu_features(), 'xla_flags': xla_flags(256, FLAG_SETS[1:2]),
            'matmul_rates': matmul_rates([(64, 32, 48)], repeats=2),
            'train_step': train_steps('tiny', 4, repeats=1, **run_all.TINY_QUICK)}
  return {'cpu': cpu_features(), 'xla_flags': xla_flags(),
          'matmul_rates': matmul_rates(shapes), 'train_step': train_steps(preset, batch)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--probe', type=int, default=0, help='(internal) probe this process')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--preset', default='vit_b32')
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args()
  if args.probe:
    print(json.dumps(probe_this_process(args.probe)))
    return
  start = time.perf_counter()
  print(json.dumps(run(args.quick, args.preset, args.batch), indent=1, default=float))
  print(f'{time.perf_counter() - start:.0f} s', file=sys.stderr)


if __name__ == '__main__':
  main()
