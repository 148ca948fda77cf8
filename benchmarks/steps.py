"""Building blocks the benchmarks time: our jitted train step on a fixed batch, and a matmul
whose throughput is the machine's practical peak (MFU = step FLOP/s / that peak).

    step = TrainStep(clip.preset('tiny'), train.default_config('pretrain'), 'pretrain',
                     {'pairs': random_pairs(cfg, 128)})
    peak = Matmul(2048)
    t = interleaved_medians({'step': step, 'matmul': peak})
    mfu = (step.flops / t['step']) / (peak.flops / t['matmul'])
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from aesalign_jax import metrics, optim, train
from aesalign_jax.models import clip


class Matmul:
  """One n x n fp32 (or `dtype`) matmul through XLA; calling it runs one and waits."""

  def __init__(self, n: int = 2048, dtype=jnp.float32):
    self.n = n
    self.flops = 2.0 * n ** 3
    self._a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    self._f = jax.jit(lambda x: x @ x)
    self._f(self._a).block_until_ready()   # compile

  def __call__(self):
    self._f(self._a).block_until_ready()


def random_pairs(cfg: clip.ClipConfig, batch: int, seed: int = 0) -> dict:
  """An image-text batch of the train step's layout: uint8 images, ids, end positions."""
  rng = np.random.default_rng(seed)
  s, length = cfg.image_size, cfg.context_length
  ids = rng.integers(0, cfg.vocab_size - 1, (batch, length)).astype(np.int32)
  eos = rng.integers(1, length, batch).astype(np.int32)
  ids[np.arange(batch), eos] = cfg.eos_token_id
  return {'image': rng.integers(0, 255, (batch, s, s, 3), dtype=np.uint8), 'ids': ids,
          'eos_index': eos}


class TrainStep:
  """Our train step (train.make_train_step: loss, grads, AdamW, guards) jitted and compiled
  once for a fixed batch kept on the device; calling it runs one step and waits for it."""

  def __init__(self, cfg: clip.ClipConfig, c, kind: str, batch: dict, *, seed: int = 0,
               params=None):
    """batch: {'pairs': ...} (pretrain) or {'pairs': ..., 'groups': ...} (align), numpy."""
    self.cfg, self.kind = cfg, kind
    params = clip.init_params(cfg, seed) if params is None else params
    tx, lr = optim.make_optimizer(c.optim, max(c.steps, 2), params)
    self.state = train.init_state(params, tx, seed)
    keys = train.DEVICE_KEYS
    self.batch = jax.device_put({name: {k: part[k] for k in keys[name]}
                                 for name, part in batch.items()})
    step = jax.jit(train.make_train_step(cfg, c, kind, tx, lr), donate_argnums=(0,))
    start = time.perf_counter()
    self._compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    pairs = len(batch['pairs']['ids']) if kind == 'pretrain' or c.lam > 0 else 0
    groups = batch.get('groups')
    images = pairs + (groups['images'].shape[0] * groups['images'].shape[1] if groups else 0)
    texts = pairs + (groups['ids'].shape[0] if groups else 0)
    self.examples = images
    self.flops = metrics.clip_flops(cfg, images=images, texts=texts)
    self.last_loss = None

  def __call__(self):
    self.state, m = self._compiled(self.state, self.batch)
    self.last_loss = m['loss']
    jax.block_until_ready(m['loss'])
    return None

  @property
  def loss(self) -> float:
    return float(self.last_loss)
