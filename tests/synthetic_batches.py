"""Hand-made, checkpointable grain iterators of image-text pairs and D_po groups for train tests.

Every batch is a pure function of (seed, batch index), so two iterators built alike yield the
same data, and a restored iterator continues exactly where the saved one stopped.
"""

import grain
import numpy as np


def _tokens(rng, n: int, length: int, vocab: int, eos: int):
  ids = rng.integers(3, vocab - 2, (n, length)).astype(np.int32)
  eos_index = rng.integers(2, length, (n,)).astype(np.int32)
  ids[np.arange(n), eos_index] = eos
  return ids, eos_index


def pairs_iterator(cfg, batch_size: int, seed: int = 0, num_batches: int = 1000):
  """Batches {'image' uint8 [B, S, S, 3], 'ids', 'eos_index', 'index' [B]} for a ClipConfig."""
  s = cfg.image_size

  def make(i):
    rng = np.random.default_rng([seed, int(i)])
    ids, eos = _tokens(rng, batch_size, cfg.context_length, cfg.vocab_size, cfg.eos_token_id)
    return {'image': rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8),
            'ids': ids, 'eos_index': eos, 'index': np.full((batch_size,), i, np.int64)}

  return iter(grain.MapDataset.range(num_batches).map(make).to_iter_dataset())


def groups_iterator(cfg, groups: int, u: int, v: int, seed: int = 1, num_batches: int = 1000):
  """Batches of D_po groups {'images' uint8 [G, u*v, S, S, 3], 'ids', 'eos_index',
  'ref_scores' float32 [G, u*v]} as make_preference_pipeline yields them."""
  s, n = cfg.image_size, u * v

  def make(i):
    rng = np.random.default_rng([seed, int(i)])
    ids, eos = _tokens(rng, groups, cfg.context_length, cfg.vocab_size, cfg.eos_token_id)
    return {'images': rng.integers(0, 256, (groups, n, s, s, 3), dtype=np.uint8),
            'ids': ids, 'eos_index': eos,
            'ref_scores': rng.normal(0.2, 0.05, (groups, n)).astype(np.float32)}

  return iter(grain.MapDataset.range(num_batches).map(make).to_iter_dataset())
