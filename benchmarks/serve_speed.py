"""Speed of the search server (main.py --mode=serve) over a finished default run.

  python -m benchmarks.serve_speed --workdir W [--big 100000] [--queries 200] [--out F.json]

W is a finished run of configs/default.py; it is copied under --scratch, never written. Two
indexes of the embedded world:
- default: the run's own mine/index (config.mine.corpus_size = 20,000 images);
- big: the first --big training images (100,000), embedded by the run's PT model with the mine
  stage's own code (stages/corpus_index.indexed_corpus) in a copy of W, then served with
  --config.mine.corpus_size=100000. Real images and real embeddings, not random vectors.
For each index, measured from this process, with the server as a subprocess:
- cold start: seconds from launching `python main.py --mode=serve` to its first /healthz
  answer (imports, config checks, models, indexes, compiling). `first`: a workdir whose eval
  stage kept no aligned index (every world run: eval embeds held-out images), so the server
  embeds the index images with the aligned model once, into W/serve/aligned_index; `later`:
  a restart, everything read from disk.
- per-query latency per system: p50 / p99 over --queries GET /api/search calls (k = 10, one
  client with keep-alive, the world's own queries in turn, the three systems interleaved so
  machine noise hits them alike): `http` as the client sees it, `search` the server's own time
  for the search (the answer's `seconds`: rephrasing, text tower, top-K, scores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ('pt', 'pt_rephrase', 'aligned')


def copy_run(src: str, dst: str, *, keep_index: bool) -> None:
  """A copy of a finished run without checkpoints and without any serve/ folder (so the
  first start builds the aligned index); keep_index=False also leaves out mine/index."""
  def ignore(folder, names):
    skip = {'checkpoints'}
    if os.path.abspath(folder) == os.path.abspath(src):
      skip.add('serve')
    if not keep_index and os.path.basename(folder) == 'mine':
      skip.add('index')
    return [n for n in names if n in skip]
  if os.path.exists(os.path.join(dst, 'serve')):
    shutil.rmtree(os.path.join(dst, 'serve'))
  shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)


def build_index(workdir: str, size: int) -> float:
  """The PT model's index of the first `size` world training images under workdir/mine/index,
  by the mine stage's code (reused when already complete); returns seconds."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from aesalign_jax import stages
  from aesalign_jax.stages import context, corpus_index
  from configs import default
  config = default.get_config()
  config.mine.corpus_size = size
  start = time.perf_counter()
  ctx = stages.start(config, workdir)
  cfg, params, _ = context.load_model_folder(os.path.join(workdir, 'pretrain', 'model'),
                                             config.model)
  corpus = corpus_index.indexed_corpus(ctx, cfg, params)
  assert len(corpus) == size, len(corpus)
  return time.perf_counter() - start


class Server:
  """main.py --mode=serve on a free port; `seconds`: launch to the first /healthz answer."""

  def __init__(self, workdir: str, overrides=(), timeout: float = 900):
    self.log = tempfile.NamedTemporaryFile('w+', suffix='.log', delete=False)
    start = time.perf_counter()
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/default.py',
         f'--workdir={workdir}', '--mode=serve', '--config.serve.port=0', *overrides],
        stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    self.url, ready = None, threading.Event()

    def read():
      for line in self.proc.stdout:
        if line.startswith('serving http'):
          self.url = line.split()[1]
          ready.set()
    threading.Thread(target=read, daemon=True).start()
    while not ready.wait(0.1):
      if self.proc.poll() is not None or time.perf_counter() - start > timeout:
        with open(self.log.name, encoding='utf-8') as f:
          log = f.read()[-3000:]
        self.stop()
        raise RuntimeError(f'the server did not start (exit {self.proc.returncode}):\n{log}')
    while httpx.get(self.url + 'healthz', timeout=30).status_code != 200:
      time.sleep(0.05)
    self.seconds = time.perf_counter() - start

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    os.unlink(self.log.name)


def latency(url: str, queries: list[str], k: int = 10) -> dict:
  """Per system: p50 / p99 of the client's round trip and of the server's own search time."""
  http = {s: [] for s in SYSTEMS}
  own = {s: [] for s in SYSTEMS}
  with httpx.Client(base_url=url, timeout=60) as client:
    for q in queries[:3]:   # first calls (connection, caches) are not timed
      for s in SYSTEMS:
        client.get('/api/search', params={'q': q, 'system': s, 'k': k}).raise_for_status()
    for q in queries:
      for s in SYSTEMS:
        start = time.perf_counter()
        r = client.get('/api/search', params={'q': q, 'system': s, 'k': k})
        http[s].append(time.perf_counter() - start)
        r.raise_for_status()
        own[s].append(r.json()['seconds'])
  ms = lambda xs, p: round(1000 * float(np.percentile(xs, p)), 2)
  return {s: {'http_p50_ms': ms(http[s], 50), 'http_p99_ms': ms(http[s], 99),
              'search_p50_ms': ms(own[s], 50), 'search_p99_ms': ms(own[s], 99),
              'queries': len(http[s])} for s in SYSTEMS}


def measure(workdir: str, overrides, queries: list[str]) -> dict:
  first = Server(workdir, overrides)
  first.stop()
  later = Server(workdir, overrides)
  try:
    images = httpx.get(later.url + 'healthz', timeout=30).json()['images']
    return {'images': images, 'cold_start_first_s': round(first.seconds, 1),
            'cold_start_later_s': round(later.seconds, 1),
            'latency': latency(later.url, queries)}
  finally:
    later.stop()


def markdown(results: dict) -> str:
  lines = ['| index | cold start: first / later (s) | system | p50 / p99 per query, HTTP (ms) '
           '| p50 / p99 server search (ms) |', '|---|---|---|---|---|']
  for name, r in results['indexes'].items():
    for j, s in enumerate(SYSTEMS):
      t = r['latency'][s]
      head = (f"{name}: {r['images']:,} images | {r['cold_start_first_s']} / "
              f"{r['cold_start_later_s']}") if j == 0 else ' | '
      lines.append(f"| {head} | {s} | {t['http_p50_ms']} / {t['http_p99_ms']} | "
                   f"{t['search_p50_ms']} / {t['search_p99_ms']} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished run of configs/default.py')
  parser.add_argument('--scratch', default=os.path.join(tempfile.gettempdir(),
                                                        'aesalign_serve_speed'))
  parser.add_argument('--big', type=int, default=100_000, help='images of the big index (0: skip)')
  parser.add_argument('--queries', type=int, default=200)
  parser.add_argument('--out', default=None, help='also write the results to this JSON file')
  args = parser.parse_args()
  from configs import default
  from input_pipeline import world as world_lib
  world = world_lib.World(default.get_config().world)
  queries = [q.text for q in world.queries][:args.queries]
  results = {'machine': {'cpus': os.cpu_count(), 'load_avg_at_start': os.getloadavg()[0],
                         'python': platform.python_version()},
             'queries': len(queries), 'k': 10, 'indexes': {}}
  small = os.path.join(args.scratch, 'default')
  copy_run(args.workdir, small, keep_index=True)
  results['indexes']['default world'] = measure(small, (), queries)
  if args.big:
    big = os.path.join(args.scratch, f'world_{args.big}')
    copy_run(args.workdir, big, keep_index=False)
    results['big_index_build_s'] = round(build_index(big, args.big), 1)
    results['indexes'][f'world {args.big // 1000}k'] = measure(
        big, (f'--config.mine.corpus_size={args.big}',), queries)
  results['machine']['load_avg_at_end'] = os.getloadavg()[0]
  print(json.dumps(results, indent=1))
  print(markdown(results))
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
