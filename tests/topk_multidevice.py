"""Run in a subprocess with 8 fake CPU devices (tests/test_retrieval.py): top-K with the corpus
split over meshes against numpy, and a corpus embedded with batches sharded over 8 devices
against one device.

Prints one JSON object.
"""

import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ['JAX_PLATFORMS'] = 'cpu'   # the fake devices are CPU ones, also on a GPU host
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from aesalign_jax import sharding  # noqa: E402
from aesalign_jax.models import clip  # noqa: E402
from aesalign_jax.retrieval import index, search  # noqa: E402

MESHES = {'data8': {'data': 8, 'fsdp': 1, 'tensor': 1},
          'data2_fsdp2_tensor2': {'data': 2, 'fsdp': 2, 'tensor': 2}}
# (corpus rows, chunk_size, k, corpus kinds): N not a multiple of the chunk, k above a device's
# slice of a chunk and above a whole chunk, k == N; a jax corpus is sliced on device.
CASES = [(1003, 160, 40, ('numpy', 'jax')), (1003, 96, 150, ('numpy',)),
         (203, 64, 203, ('numpy',))]


def topk_results() -> dict:
  rng = np.random.default_rng(0)
  out = {}
  for mesh_name, mesh_cfg in MESHES.items():
    mesh = sharding.make_mesh(mesh_cfg)
    for n, chunk, k, kinds in CASES:
      corpus = rng.normal(size=(n, 24)).astype(np.float32)
      queries = rng.normal(size=(13, 24)).astype(np.float32)
      exact = queries @ corpus.T
      want = np.argsort(-exact, axis=1)[:, :k]
      for kind in kinds:
        c = corpus if kind == 'numpy' else jnp.asarray(corpus)
        scores, rows = search.topk(queries, c, k, chunk_size=chunk, query_chunk=8, mesh=mesh)
        out[f'{mesh_name}/{kind}/n{n}_c{chunk}_k{k}'] = {
            'ids_equal': bool(np.array_equal(rows, want)),
            'max_score_err': float(np.abs(scores - np.take_along_axis(exact, want, 1)).max())}
  mesh = sharding.make_mesh(MESHES['data8'])
  corpus = rng.normal(size=(1003, 24)).astype(np.float32)
  queries = rng.normal(size=(13, 24)).astype(np.float32)
  want = np.argsort(-(queries @ corpus.T), axis=1)[:, :20]
  _, rows = search.topk(queries, corpus, 20, chunk_size=160, mesh=mesh, approx=True)
  out['data8/approx_recall'] = float(np.mean(
      [len(set(a) & set(b)) / 20 for a, b in zip(rows, want)]))
  return out


def embed_results() -> dict:
  """The same corpus embedded on one device and with batches over 8 devices (data axis)."""
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  params = clip.init_params(cfg, seed=0)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(72, 32, 32, 3), dtype=np.uint8)
  ids = np.arange(1000, 1072)
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  rules = sharding.default_config().rules
  seen_shardings = []

  sharded_fn = index.image_embed_fn(cfg, params, mesh=mesh, rules=rules)

  def spy(x):
    seen_shardings.append(str(x.sharding.spec))
    return sharded_fn(x)

  with tempfile.TemporaryDirectory() as tmp:
    kw = dict(fingerprint='tiny', shard_size=30, batch_size=16, progress=False)
    index.embed_corpus(index.image_embed_fn(cfg, params), lambda r: images[r], ids,
                       os.path.join(tmp, 'one'), **kw)
    index.embed_corpus(spy, lambda r: images[r], ids, os.path.join(tmp, 'mesh'), mesh=mesh,
                       rules=rules, **kw)
    one, one_ids = index.load_index(os.path.join(tmp, 'one'))
    many, many_ids = index.load_index(os.path.join(tmp, 'mesh'))
  return {'embed_max_err': float(np.abs(one - many).max()),
          'embed_ids_equal': bool(np.array_equal(one_ids, many_ids) and
                                  np.array_equal(one_ids, ids)),
          'embed_batch_specs': sorted(set(seen_shardings))}


def main():
  assert jax.device_count() == 8, jax.devices()
  result = {'topk': topk_results(), **embed_results()}
  print(json.dumps(result))


if __name__ == '__main__':
  sys.exit(main())
