"""Retrieval speed: corpus embedding throughput, and top-K search ours (on device) vs faiss-cpu.

  python -m benchmarks.retrieval_speed [--quick]

1. Corpus embedding with the tiny CLIP on embedded-world images: images/s for rendering alone,
   the jitted embedding alone, and embed_corpus end to end (render, embed, write shards).
2. Top-K for 1,000 queries over 100,000 x 512 unit embeddings (k = 100 and 10): our chunked
   topk with the corpus on the host (numpy, sent chunk by chunk) and already on device, against
   faiss-cpu IndexFlatIP, timed in alternation in one run. Prints faiss_time / our_time
   (> 1: ours is faster) and how many of the returned ids agree.
"""

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from aesalign_jax.models import clip
from aesalign_jax.retrieval import index, search
from benchmarks.timing import interleaved_medians
from input_pipeline import world as world_lib


def embed_throughput(num_images: int, batch_size: int = 256, **overrides) -> dict:
  """overrides: ClipConfig fields changed from the tiny preset (e.g. vision_layers=1)."""
  cfg = clip.preset('tiny', **overrides)
  params = clip.init_params(cfg, seed=0)
  world = world_lib.World(num_train=0, num_eval=num_images, num_hpir_pool=0)
  ids = world.split_indices('eval')
  fn = index.image_embed_fn(cfg, params)
  jax.block_until_ready(fn(np.zeros((batch_size, 32, 32, 3), np.uint8)))   # compile

  start = time.perf_counter()
  images = np.concatenate([world.render_batch(ids[i:i + batch_size])
                           for i in range(0, num_images, batch_size)])
  render_s = time.perf_counter() - start
  batches = [images[i:i + batch_size] for i in range(0, num_images - batch_size + 1, batch_size)]
  start = time.perf_counter()
  for b in batches:
    out = fn(b)
  jax.block_until_ready(out)
  embed_s = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    summary = index.embed_corpus(fn, lambda rows: world.render_batch(ids[rows]), ids, tmp,
                                 fingerprint='bench', shard_size=4096, batch_size=batch_size,
                                 progress=False)
  return {'images': num_images, 'batch_size': batch_size, 'model': 'tiny',
          'render_images_per_s': num_images / render_s,
          'embed_images_per_s': len(batches) * batch_size / embed_s,
          'embed_corpus_images_per_s': summary['images_per_s']}


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def topk_speed(n: int, dim: int, num_queries: int, k: int, repeats: int,
               chunk_size: int = 65536, max_seconds: float | None = None) -> dict:
  rng = np.random.default_rng(0)
  corpus = _unit(rng.normal(size=(n, dim)).astype(np.float32))
  queries = _unit(rng.normal(size=(num_queries, dim)).astype(np.float32))
  on_device = jax.block_until_ready(jnp.asarray(corpus))
  fns = {
      'ours_host_corpus': lambda: search.topk(queries, corpus, k, chunk_size=chunk_size),
      'ours_device_corpus': lambda: search.topk(queries, on_device, k, chunk_size=chunk_size),
  }
  row = {'corpus': n, 'dim': dim, 'queries': num_queries, 'k': k, 'chunk_size': chunk_size,
         'device': str(jax.devices()[0].device_kind)}
  try:
    import faiss  # pylint: disable=g-import-not-at-top
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    fns['faiss_flat_ip'] = lambda: flat.search(queries, k)
    row['faiss_threads'] = faiss.omp_get_max_threads()
  except ImportError:
    row['faiss'] = 'not installed (pip install aesalign[faiss])'
  t = interleaved_medians(fns, warmup=1, repeats=repeats, max_seconds=max_seconds)
  row.update({f'{name}_s': s for name, s in t.items()})
  ours = fns['ours_device_corpus']()[1]
  if 'faiss_flat_ip' in fns:
    theirs = fns['faiss_flat_ip']()[1]
    row['ids_agree'] = float(np.mean(ours == theirs))
    row['faiss_over_ours_host'] = t['faiss_flat_ip'] / t['ours_host_corpus']
    row['faiss_over_ours_device'] = t['faiss_flat_ip'] / t['ours_device_corpus']
  return row


def topk_crossover(sizes=(2_000, 10_000, 30_000, 100_000, 300_000), dim: int = 512,
                   num_queries: int = 1000, k: int = 100, repeats: int = 3) -> list:
  """Ours (corpus on device) vs faiss-cpu IndexFlatIP at each corpus size, each size timed
  in alternation in this run: where faiss starts to win (the 'auto' backend's rule)."""
  import faiss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  queries = _unit(rng.normal(size=(num_queries, dim)).astype(np.float32))
  rows = []
  for n in sizes:
    corpus = _unit(rng.normal(size=(n, dim)).astype(np.float32))
    on_device = jax.block_until_ready(jnp.asarray(corpus))
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    kk = min(k, n)
    t = interleaved_medians({'ours': lambda: search.topk(queries, on_device, kk),
                             'faiss': lambda: flat.search(queries, kk)},
                            warmup=1, repeats=repeats)
    rows.append({'corpus': n, 'k': kk, 'ours_s': t['ours'], 'faiss_s': t['faiss'],
                 'faiss_over_ours': t['faiss'] / t['ours']})
  return rows


def run(quick: bool = False) -> dict:
  repeats = 2 if quick else 5
  return {
      'corpus_embedding': embed_throughput(2048 if quick else 8192),
      'topk_vs_faiss': [topk_speed(100_000, 512, 1000, k, repeats) for k in (100, 10)],
  }


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  result = run(parser.parse_args().quick)
  e = result['corpus_embedding']
  print(f"corpus embedding ({e['model']} CLIP, {e['images']} world images, batch "
        f"{e['batch_size']}): render {e['render_images_per_s']:.0f} img/s, embed "
        f"{e['embed_images_per_s']:.0f} img/s, embed_corpus end to end "
        f"{e['embed_corpus_images_per_s']:.0f} img/s")
  for row in result['topk_vs_faiss']:
    line = (f"top-{row['k']} of {row['corpus']} x {row['dim']} for {row['queries']} queries on "
            f"{row['device']}: ours {row['ours_host_corpus_s']*1e3:.0f} ms (host corpus), "
            f"{row['ours_device_corpus_s']*1e3:.0f} ms (device corpus)")
    if 'faiss_flat_ip_s' in row:
      line += (f"; faiss IndexFlatIP {row['faiss_flat_ip_s']*1e3:.0f} ms "
               f"({row['faiss_threads']} threads); ratio faiss/ours "
               f"{row['faiss_over_ours_host']:.2f} (host) {row['faiss_over_ours_device']:.2f} "
               f"(device); ids agree {row['ids_agree']:.4f}")
    print(line)
  print(json.dumps(result))
