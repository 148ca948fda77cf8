"""ViT-B/16 training on one GPU: contrastive and align steps in bf16 at the largest batch that
fits, MFU against a bf16 matmul peak measured in the same run, and the listwise/pairwise DPO
ratio. Sized to finish in about 5 minutes on one H100.

  python -m benchmarks.gpu_step [--preset vit_b16] [--batches 1024,768,512,256] [--out FILE]

On CPU it runs at a tiny size (`--preset tiny --batches 16,8`); tests/test_benchmarks.py runs
`run` so at a tiny size, so it stays tested where no GPU is.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from aesalign_jax import metrics, optim, train
from aesalign_jax.models import clip
from benchmarks import dpo_speed


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


def _batch(cfg, kind, b, groups, rng):
  s, L = cfg.image_size, cfg.context_length
  pairs = {'image': rng.integers(0, 255, (b, s, s, 3), dtype=np.uint8),
           'ids': rng.integers(0, cfg.vocab_size - 1, (b, L)).astype(np.int32),
           'eos_index': np.full((b,), L - 1, np.int32)}
  out = {'pairs': pairs}
  if kind == 'align':
    out['groups'] = {'images': rng.integers(0, 255, (groups, 25, s, s, 3), dtype=np.uint8),
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--preset', default='vit_b16')
  parser.add_argument('--batches', default='1024,768,512,256')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--out', default='')
  parser.add_argument('--kinds', default='pretrain,align,dpo')
  args = parser.parse_args()
  on_gpu = jax.default_backend() == 'gpu'
  cfg = clip.preset(args.preset, dtype='bfloat16' if on_gpu else 'float32')
  result = run(cfg, [int(b) for b in args.batches.split(',')], steps=args.steps,
               kinds=args.kinds.split(','))
  result['preset'] = args.preset
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != 'dpo_listwise_vs_pairwise'}))


if __name__ == '__main__':
  main()
