"""The pieces a multi-process run splits its work with, in one process: blocks of work, the
exact top-K merge, index rows read from the shard files, the data order of a training step,
and the distributed config's refusals (tests/test_multiprocess.py runs the real thing)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from aesalign_jax import config_checks, multihost, retrieval
from aesalign_jax.retrieval import index as retrieval_index
from aesalign_jax.retrieval import search
from configs import common
from input_pipeline import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('n, processes', [(0, 2), (5, 2), (60, 2), (7, 3), (2, 4)])
def test_shares_are_contiguous_in_process_order_and_cover_everything(n, processes):
  blocks = [multihost.share(n, p, processes) for p in range(processes)]
  assert blocks[0][0] == 0 and blocks[-1][1] == n
  assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
  sizes = [stop - start for start, stop in blocks]
  assert max(sizes) - min(sizes) <= 1


def test_one_process_gathers_itself():
  assert multihost.allgather({'a': [1.5]}) == [{'a': [1.5]}]
  assert multihost.concat_shares([1, 2]) == [1, 2]
  x = np.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(multihost.allgather_arrays(x)[0], x)


@pytest.mark.parametrize('processes', [2, 3])
def test_merged_per_process_topk_equals_one_search_ties_included(processes):
  rng = np.random.default_rng(0)
  corpus = rng.standard_normal((500, 16)).astype(np.float32)
  corpus[300] = corpus[10]          # exact ties across blocks: the lower row must win
  corpus[450] = corpus[10]
  queries = np.concatenate([corpus[10:11], rng.standard_normal((7, 16)).astype(np.float32)])
  want_scores, want_rows = search.topk(queries, corpus, 20)
  scores, rows = [], []
  for p in range(processes):
    start, stop = multihost.share(len(corpus), p, processes)
    s, r = search.topk(queries, corpus[start:stop], 20)
    scores.append(s)
    rows.append(r + start)
  got_scores, got_rows = retrieval.merge_topk(scores, rows, 20)
  np.testing.assert_array_equal(got_rows, want_rows)
  # Each block is scored by matmuls of another shape: the same scores to float32 rounding.
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)
  assert got_rows[0, :3].tolist() == [10, 300, 450]


@pytest.fixture(scope='module')
def index_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('index'))
  rng = np.random.default_rng(1)
  table = rng.standard_normal((1000, 8)).astype(np.float32)
  retrieval_index.embed_corpus(lambda x: x[:, 0, 0, :].astype(np.float32) / 1.0,
                               lambda rows: table[rows][:, None, None, :], np.arange(1000) * 3,
                               folder, fingerprint='t', shard_size=128, batch_size=64,
                               progress=False)
  return folder


def test_index_rows_read_from_the_files_equal_the_loaded_index(index_dir):
  emb, ids = retrieval_index.load_index(index_dir)
  rows = retrieval_index.open_index(index_dir)
  assert rows.shape == emb.shape and len(rows.shards()) == 8
  np.testing.assert_array_equal(rows.ids, ids)
  pick = np.asarray([999, 0, 127, 128, 500, 500, 3])
  np.testing.assert_array_equal(rows[pick], emb[pick])
  np.testing.assert_array_equal(rows[100:300], emb[100:300])
  np.testing.assert_array_equal(rows[-1], emb[-1])
  mask = np.zeros(1000, bool)
  mask[::7] = True
  view = rows.take(mask)
  np.testing.assert_array_equal(view[:], emb[mask])
  np.testing.assert_array_equal(view.take([2, 0])[:], emb[mask][[2, 0]])
  np.testing.assert_array_equal(view.ids, ids[mask])
  # search.topk streams through it chunk by chunk: the same rows as over the array.
  q = emb[[5, 600]]
  np.testing.assert_array_equal(search.topk(q, rows, 10, chunk_size=100)[1],
                                search.topk(q, emb, 10, chunk_size=100)[1])


def test_two_process_training_batches_are_the_one_process_batches():
  load = lambda idx: {'i': np.asarray(idx)}

  def batches(processes, index):
    it = iter(pipeline.make_batched_source_pipeline(
        (0, 100), load, batch_size=12 // processes, seed=3, shard_index=index,
        shard_count=processes, prefetch_buffer_size=0))
    return [next(it)['i'] for _ in range(20)]   # past one epoch

  one = batches(1, 0)
  for processes in (2, 3):
    parts = [batches(processes, p) for p in range(processes)]
    for step, want in enumerate(one):
      np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), want)


def test_two_process_record_streams_are_the_one_process_stream():
  class Source:
    def __len__(self):
      return 50

    def __getitem__(self, i):
      return {'id': i}

  def batches(processes, index):
    it = iter(pipeline.make_pipeline(Source(), batch_size=6 // processes, seed=5,
                                     shard_index=index, shard_count=processes, read_threads=1,
                                     prefetch_buffer_size=0))
    return [next(it)['id'] for _ in range(12)]

  one, parts = batches(1, 0), [batches(2, p) for p in (0, 1)]
  for step, want in enumerate(one):
    np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), want)


@pytest.mark.parametrize('changes, message', [
    ({'coordinator_address': '127.0.0.1:1234'}, 'given together'),
    ({'coordinator_address': 'localhost', 'num_processes': 2, 'process_id': 0}, 'host:port'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2}, 'process_id=2'),
    ({'coordinator_address': 'h:1', 'num_processes': 0, 'process_id': 0}, 'num_processes=0'),
    ({'cpu_collectives': 'nccl'}, 'cpu_collectives'),
    ({'initialize': 'maybe'}, 'initialize'),
    ({'initialize': 'off', 'coordinator_address': 'h:1', 'num_processes': 2,
      'process_id': 1}, "initialize='off'"),
])
def test_bad_distributed_settings_are_refused_naming_the_key(changes, message):
  c = common.distributed_config()
  c.update(changes)
  with pytest.raises(ValueError, match=message):
    config_checks.check_distributed(c)


def test_main_refuses_a_bad_process_id_before_starting(tmp_path):
  out = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py:smoke', f'--workdir={tmp_path}',
       '--config.distributed.coordinator_address=127.0.0.1:1',
       '--config.distributed.num_processes=2', '--config.distributed.process_id=5'],
      capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'config.distributed.process_id=5' in out.stderr and not os.listdir(tmp_path)
