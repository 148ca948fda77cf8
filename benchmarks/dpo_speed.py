"""Ranked DPO computed listwise vs pairwise (as TRL concatenates chosen and rejected), and
pairwise with an online reference forward pass; plus the step's MFU against a matmul peak
measured in the same run.

  python -m benchmarks.dpo_speed [--quick]

Same model, same groups (u = v = 5, product order: 200 pairs per group). Listwise encodes each
group's query once and its 25 images once; pairwise encodes, for every pair, the query twice
and both images (4 encodings per pair); the online-reference variant repeats that with the
frozen model.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aesalign_jax import losses, metrics, optim, train
from aesalign_jax.models import clip
from benchmarks.timing import interleaved_medians


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
  """Measured fp32 matmul throughput of this machine through XLA (GFLOP/s)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  t = interleaved_medians({'mm': lambda: f(a).block_until_ready()}, warmup=2, repeats=repeats)
  return 2 * n ** 3 / t['mm'] / 1e9


def _pairwise_step(cfg, c, tx, online: bool):
  """TRL-style: every pair is a (query, chosen image) and (query, rejected image) row."""

  def loss_fn(params, ref_params, b):
    model = clip.bind(cfg, params)
    def scores(m):
      ids = jnp.concatenate([b['ids'], b['ids']])
      eos = jnp.concatenate([b['eos_index'], b['eos_index']])
      img = m.encode_image(train.normalize_on_device(
          jnp.concatenate([b['chosen'], b['rejected']])))
      txt = m.encode_text(ids, eos)
      s = jnp.sum(img * txt, -1)
      return s[:len(b['ids'])], s[len(b['ids']):]
    sw, sl = scores(model)
    if online:
      rw, rl = jax.lax.stop_gradient(scores(clip.bind(cfg, ref_params)))
    else:
      rw, rl = b['ref_w'], b['ref_l']
    scale = jax.lax.stop_gradient(jnp.exp(params['logit_scale']))
    delta = scale * ((sw - sl) - (rw - rl))
    return jnp.mean(losses.preference_loss(delta, beta=c.beta, loss_type='sigmoid'))

  def step(params, opt_state, ref_params, b):
    loss, grads = jax.value_and_grad(loss_fn)(params, ref_params, b)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def compare(groups: int, repeats: int, cfg: clip.ClipConfig | None = None,
            peak_gflops: float | None = None, max_seconds: float | None = None) -> dict:
  """Times the three steps in alternation (`repeats` rounds, fewer once max_seconds passed)."""
  c = train.default_config('align')
  c.u = c.v = 5
  c.lam = 0.0
  cfg = cfg or clip.preset('tiny')
  params = clip.init_params(cfg)
  tx, lr = optim.make_optimizer(c.optim, 100, params)
  n = c.u * c.v
  mask = losses.pair_mask(c.u, c.v, 'product')
  k, l = np.nonzero(mask)
  pairs = groups * len(k)
  rng = np.random.default_rng(0)
  size = cfg.image_size
  images = rng.integers(0, 255, (groups, n, size, size, 3), dtype=np.uint8)
  ids = rng.integers(0, 1000, (groups, cfg.context_length)).astype(np.int32)
  eos = np.full((groups,), cfg.context_length - 1, np.int32)
  ref = rng.normal(0, 0.1, (groups, n)).astype(np.float32)

  # Listwise: the align train step itself, with the contrastive term switched off.
  list_step = jax.jit(train.make_train_step(cfg, c, 'align', tx, lr), donate_argnums=(0,))
  empty_pairs = {'image': np.zeros((0, size, size, 3), np.uint8),
                 'ids': np.zeros((0, cfg.context_length), np.int32),
                 'eos_index': np.zeros((0,), np.int32)}
  list_batch = {'pairs': empty_pairs, 'groups': {'images': images, 'ids': ids,
                                                 'eos_index': eos, 'ref_scores': ref}}
  g_idx = np.repeat(np.arange(groups), len(k))
  pair_batch = {'chosen': images[g_idx, np.tile(k, groups)],
                'rejected': images[g_idx, np.tile(l, groups)],
                'ids': ids[g_idx], 'eos_index': eos[g_idx],
                'ref_w': ref[g_idx, np.tile(k, groups)], 'ref_l': ref[g_idx, np.tile(l, groups)]}
  state = {'s': train.init_state(jax.tree.map(jnp.array, params), tx, 0)}
  pw = {'p': (jax.tree.map(jnp.array, params), tx.init(params))}
  pwo = {'p': (jax.tree.map(jnp.array, params), tx.init(params))}
  pair_step, pair_online = _pairwise_step(cfg, c, tx, False), _pairwise_step(cfg, c, tx, True)

  def run_list():
    state['s'], m = list_step(state['s'], list_batch)
    jax.block_until_ready(m['loss'])

  def run_pair(store, fn):
    def run():
      p, o, loss = fn(*store['p'], params, pair_batch)
      store['p'] = (p, o)
      loss.block_until_ready()
    return run

  t = interleaved_medians({'listwise': run_list, 'pairwise': run_pair(pw, pair_step),
                           'pairwise_online_ref': run_pair(pwo, pair_online)},
                          warmup=1, repeats=repeats, max_seconds=max_seconds)
  flops = metrics.clip_flops(cfg, images=groups * n, texts=groups)
  peak = peak_gflops or matmul_peak_gflops()
  return {
      'groups': groups, 'pairs_per_step': pairs, 'u': c.u, 'v': c.v,
      'listwise_s': t['listwise'], 'pairwise_s': t['pairwise'],
      'pairwise_online_ref_s': t['pairwise_online_ref'],
      'listwise_pairs_per_s': pairs / t['listwise'],
      'pairwise_pairs_per_s': pairs / t['pairwise'],
      'listwise_over_pairwise': t['pairwise'] / t['listwise'],
      'listwise_over_pairwise_online_ref': t['pairwise_online_ref'] / t['listwise'],
      'matmul_peak_gflops': peak,
      'listwise_step_gflops': flops / t['listwise'] / 1e9,
      'listwise_mfu': flops / t['listwise'] / 1e9 / peak,
  }


def run(quick: bool = False) -> dict:
  return {'dpo_listwise_vs_pairwise': compare(groups=2, repeats=3 if quick else 7)}


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  r = run(parser.parse_args().quick)['dpo_listwise_vs_pairwise']
  print(f"{r['pairs_per_step']} pairs/step: listwise {r['listwise_pairs_per_s']:.0f} pairs/s, "
        f"pairwise {r['pairwise_pairs_per_s']:.0f} pairs/s -> {r['listwise_over_pairwise']:.1f}x; "
        f"vs pairwise + online reference {r['listwise_over_pairwise_online_ref']:.1f}x; "
        f"listwise step {r['listwise_step_gflops']:.1f} GFLOP/s = {100 * r['listwise_mfu']:.0f}% "
        f"of the measured {r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak")
  print(json.dumps(r))
