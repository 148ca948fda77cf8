"""Corpus embedding and top-K on 1 process vs 2 (jax.distributed on this machine, gloo):
wall time and peak host memory (RSS) per process, for corpora of N world images.

  python -m benchmarks.multihost_index [--sizes=10000,100000,1000000] [--processes=1,2]

Each configuration launches its processes afresh (P processes x 2/P CPU devices, so both use
the machine's 2 devices) and runs what the mine stage runs (stages/corpus_index.py):
retrieval.embed_corpus with the index shard size the stage uses (each process embeds and
writes its own shards on its own devices), then a Searcher with across_processes over the
on-disk index (retrieval.open_index: rows read from the shard files on demand; each process
searches its block of rows, then the per-process top-K lists are merged). The model is the
smoke job's tiny CLIP (2 + 2 layers, random weights: its speed, not its quality, matters);
500 unit-vector queries, k = 100.

Reported per process: seconds to embed, seconds to search, RSS after start-up (jax, the
model, the compiled embedding), peak RSS, and the corpus's own size (N x 128 float32). The
check that the merged top-K is exact: for 20 queries, process 0 scores every row of the index
in float64 and every returned row must be among the true top k up to float32 rounding (its
score at most 1e-5 below the k-th best). The rows themselves can differ between process
counts where scores tie to float32 rounding (random weights embed images close together):
each process scores its rows in matmuls of another shape, so the last bit of a score moves;
the fraction of rows equal to the 1-process run's is reported.
Results go to benchmarks/multihost_index.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES, K, DEVICES = 500, 100, 2


def _rss_mib() -> float:
  with open('/proc/self/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def worker(size: int, folder: str, port: int, process: int, processes: int) -> dict:
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=processes, process_id=process)
  import numpy as np
  from aesalign_jax import retrieval, sharding
  from aesalign_jax.models import clip
  from aesalign_jax.retrieval import index as retrieval_index
  from aesalign_jax.stages import corpus_index
  from configs import default
  from input_pipeline import world as world_lib

  config = default.get_config('smoke')
  cfg = clip.preset('tiny', vision_layers=2, text_layers=2)
  params = clip.init_params(cfg, seed=0)
  world = world_lib.World(config.world, num_train=size, num_eval=0, num_hpir_pool=0)
  ids = world.split_indices('train')
  mesh = sharding.make_mesh(config.mesh)
  batch = corpus_index.embed_batch_size(mesh, size)
  local = sharding.local_mesh(mesh)
  embed_fn = retrieval_index.image_embed_fn(cfg, params, mesh=local, rules=config.rules)
  per_process = batch // processes
  x = jax.device_put(np.zeros((per_process, 32, 32, 3), np.uint8),
                     sharding.batch_sharding(local, config.rules, 4))
  jax.block_until_ready(embed_fn(x))   # compiled before the clock starts
  started_mib = _rss_mib()

  start = time.perf_counter()
  retrieval_index.embed_corpus(
      embed_fn, lambda rows: world.render_batch(ids[rows]), ids, folder,
      fingerprint='bench', shard_size=corpus_index.index_shard_size(batch, size),
      batch_size=per_process, mesh=local, rules=config.rules, progress=False)
  embed_s = time.perf_counter() - start
  embed_peak = _peak_mib()

  rows = retrieval_index.open_index(folder)
  queries = np.random.default_rng(0).standard_normal((QUERIES, cfg.embed_dim)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  searcher = retrieval.make_searcher(config.retrieval, mesh, across_processes=True)
  start = time.perf_counter()
  _, top = searcher.topk(queries, rows, K)
  search_s = time.perf_counter() - start
  shortfall = _exact_shortfall(rows, queries[:20], top[:20]) if process == 0 else None
  return {'size': size, 'processes': processes, 'process': process,
          'shards': len(rows.shards()), 'embed_s': embed_s, 'search_s': search_s,
          'images_per_s': size / embed_s, 'rss_after_startup_mib': started_mib,
          'peak_rss_embed_mib': embed_peak, 'peak_rss_mib': _peak_mib(),
          'corpus_mib': size * cfg.embed_dim * 4 / 2**20,
          'shard_mib': corpus_index.index_shard_size(batch, size) * cfg.embed_dim * 4 / 2**20,
          'topk_exact_shortfall': shortfall, 'top_rows': top[:50].tolist() if process == 0
          else None}


def _exact_shortfall(rows, queries, top, chunk: int = 65536) -> float:
  """max over queries of (k-th best float64 score over the whole index) - (the lowest float64
  score among the returned rows): <= float32 rounding when the top-k is exact."""
  import numpy as np
  q = queries.astype(np.float64)
  best = np.full((len(q), top.shape[1]), -np.inf)
  for start in range(0, len(rows), chunk):
    scores = rows[start:start + chunk].astype(np.float64) @ q.T   # [c, Q]
    best = np.sort(np.concatenate([best, scores.T], axis=1), axis=1)[:, -top.shape[1]:]
  got = np.stack([rows[t].astype(np.float64) @ qi for t, qi in zip(top, q)])
  assert all(len(set(t.tolist())) == len(t) for t in top), 'a row returned twice'
  return float(np.max(best[:, 0] - got.min(axis=1)))


def run(size: int, processes: int, timeout: float = 3600) -> list[dict]:
  """Launches one configuration; each process's result dict."""
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  import launch_processes   # pylint: disable=g-import-not-at-top  (tests/launch_processes.py)
  port = launch_processes.free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES // processes}')
  with tempfile.TemporaryDirectory() as folder:
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.multihost_index', '--worker',
         f'--sizes={size}', f'--folder={folder}/index', f'--port={port}', f'--process={i}',
         f'--processes={processes}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f'worker failed (exit {p.returncode}):\n{err[-3000:]}')
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def table(results: list[dict]) -> str:
  lines = ['| images | processes | process | shards | embed s | images/s | top-K s | RSS after '
           'start-up MiB | peak RSS MiB | corpus MiB | shard MiB |', '|' + '---|' * 11]
  for r in results:
    lines.append(f"| {r['size']:,} | {r['processes']} | {r['process']} | {r['shards']} | "
                 f"{r['embed_s']:.1f} | {r['images_per_s']:.0f} | {r['search_s']:.2f} | "
                 f"{r['rss_after_startup_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                 f"{r['corpus_mib']:.0f} | {r['shard_mib']:.1f} |")
  return '\n'.join(lines)


def main():
  import numpy as np   # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='10000,100000,1000000')
  parser.add_argument('--processes', default='1,2')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'multihost_index.json'))
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--folder')
  parser.add_argument('--port', type=int)
  parser.add_argument('--process', type=int)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(int(args.sizes), args.folder, args.port, args.process,
                            int(args.processes))), flush=True)
    return
  results = []
  for size in (int(s) for s in args.sizes.split(',')):
    for processes in (int(p) for p in args.processes.split(',')):
      results += run(size, processes)
      print(table(results[-processes:]), flush=True)
    firsts = [r for r in results if r['size'] == size and r['process'] == 0]
    for r in firsts:
      if r['topk_exact_shortfall'] > 1e-5:
        raise AssertionError(f"{size} images, {r['processes']} processes: a returned row "
                             f"scores {r['topk_exact_shortfall']} below the true k-th best")
      r['rows_equal_to_first'] = float(np.mean(np.asarray(r['top_rows']) ==
                                               np.asarray(firsts[0]['top_rows'])))
  for r in results:
    r.pop('top_rows', None)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  print(table(results))


if __name__ == '__main__':
  main()
