"""Retrieval: corpus embedding shards on disk, top-K on device in chunks, FAISS."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from aesalign_jax.retrieval import faiss_index, index, search

HERE = os.path.dirname(os.path.abspath(__file__))


def _random(n, d, seed):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _exact_topk(queries, corpus, k):
  scores = queries @ corpus.T
  rows = np.argsort(-scores, axis=1)[:, :k]
  return np.take_along_axis(scores, rows, axis=1), rows


# --- top-K ------------------------------------------------------------------------------------

@pytest.mark.parametrize('n,chunk,k', [
    (1009, 128, 10),     # N not a multiple of the chunk (8 chunks of 127: a padded tail)
    (1009, 100, 250),    # k larger than a chunk
    (293, 64, 293),      # k == N: every row, padding never
    (50, 4096, 7),       # one chunk larger than the corpus
])
@pytest.mark.parametrize('on_device', [False, True], ids=['numpy_corpus', 'jax_corpus'])
def test_topk_equals_numpy_argsort_across_chunk_boundaries(n, chunk, k, on_device):
  corpus, queries = _random(n, 32, 0), _random(21, 32, 1)
  want_scores, want_rows = _exact_topk(queries, corpus, k)
  scores, rows = search.topk(queries, jnp.asarray(corpus) if on_device else corpus, k,
                             chunk_size=chunk, query_chunk=8)   # 21 queries: a padded block
  assert rows.shape == scores.shape == (21, k) and rows.dtype == np.int64
  np.testing.assert_array_equal(rows, want_rows)
  np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_topk_reads_a_float16_corpus():
  corpus, queries = _random(500, 16, 2).astype(np.float16), _random(5, 16, 3)
  _, want = _exact_topk(queries, corpus.astype(np.float32), 12)
  np.testing.assert_array_equal(search.topk(queries, corpus, 12, chunk_size=128)[1], want)


def test_topk_refuses_k_outside_one_to_n_and_mismatched_dims():
  corpus, queries = _random(10, 4, 0), _random(2, 4, 1)
  with pytest.raises(ValueError, match=r'k=11 must be in \[1, N=10\]'):
    search.topk(queries, corpus, 11)
  with pytest.raises(ValueError, match='same D'):
    search.topk(_random(2, 5, 1), corpus, 3)


def test_search_ids_maps_rows_to_corpus_ids():
  corpus, queries = _random(200, 8, 4), _random(3, 8, 5)
  ids = np.asarray([f'img_{i:04d}' for i in range(200)])
  _, want_rows = _exact_topk(queries, corpus, 5)
  _, found = search.search_ids(queries, corpus, ids, 5, chunk_size=64)
  np.testing.assert_array_equal(found, ids[want_rows])


def test_approx_topk_recalls_at_least_ninety_percent():
  corpus, queries = _random(3000, 32, 6), _random(40, 32, 7)
  _, want = _exact_topk(queries, corpus, 20)
  _, rows = search.topk(queries, corpus, 20, chunk_size=1024, approx=True, recall_target=0.95)
  recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(rows, want)])
  assert recall >= 0.9


@pytest.fixture(scope='module')
def eight_device_results():
  out = subprocess.run([sys.executable, os.path.join(HERE, 'topk_multidevice.py')],
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(HERE))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_topk_on_eight_devices_equals_numpy_argsort(eight_device_results):
  cases = eight_device_results['topk']
  exact = {name: r for name, r in cases.items() if not name.endswith('approx_recall')}
  assert len(exact) == 8
  for name, r in exact.items():
    assert r['ids_equal'], name
    assert r['max_score_err'] < 1e-4, name
  assert cases['data8/approx_recall'] >= 0.9


def test_corpus_embedded_over_eight_devices_equals_one_device(eight_device_results):
  assert eight_device_results['embed_ids_equal']
  assert eight_device_results['embed_max_err'] < 1e-5
  # Every batch arrived split over the batch axes, not replicated.
  assert eight_device_results['embed_batch_specs'] == ["P(('data', 'fsdp'), None, None, None)"]


# --- FAISS ------------------------------------------------------------------------------------

def test_faiss_flat_returns_the_same_ids_as_topk(tmp_path):
  pytest.importorskip('faiss')
  corpus, queries = _random(2000, 32, 8), _random(30, 32, 9)
  ids = np.arange(5000, 7000)
  flat = faiss_index.FaissIndex.build(corpus, ids, kind='flat_ip')
  scores, found = flat.search(queries, 25)
  ours_scores, ours = search.search_ids(queries, corpus, ids, 25, chunk_size=512)
  np.testing.assert_array_equal(found, ours)
  np.testing.assert_allclose(scores, ours_scores, atol=1e-4)
  flat.save(str(tmp_path / 'faiss'))
  loaded = faiss_index.FaissIndex.load(str(tmp_path / 'faiss'))
  np.testing.assert_array_equal(loaded.search(queries, 25)[1], ours)


def test_faiss_index_from_embedding_shards_keeps_string_ids(tmp_path):
  pytest.importorskip('faiss')
  images = _images(40)
  ids = np.asarray([f'photo/{i}.jpg' for i in range(40)])
  index.embed_corpus(_fake_embed(), lambda rows: images[rows], ids, str(tmp_path),
                     fingerprint='m', shard_size=16, batch_size=8, progress=False)
  emb, _ = index.load_index(str(tmp_path))
  flat = faiss_index.FaissIndex.from_shards(str(tmp_path))
  _, found = flat.search(emb[:3], 1)
  np.testing.assert_array_equal(found[:, 0], ids[:3])


def test_faiss_missing_names_the_extra_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'faiss', None)   # import faiss now raises ImportError
  with pytest.raises(ImportError, match=r'pip install aesalign\[faiss\]'):
    faiss_index.FaissIndex.build(_random(4, 3, 0), np.arange(4))


# --- corpus embedding shards ------------------------------------------------------------------

def _images(n, size=4):
  rows = np.arange(n)[:, None, None, None]
  pattern = np.arange(size * size * 3).reshape(1, size, size, 3)
  return ((rows * 37 + pattern * 11) % 256).astype(np.uint8)


def _fake_embed(calls=None, dim=6):
  """A deterministic stand-in for the model: first pixels of each image, counted per call."""
  def fn(x):
    if calls is not None:
      calls.append(len(x))
    x = np.asarray(x, np.float32).reshape(len(x), -1)[:, :dim]
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)
  return fn


def _build(out_dir, images, ids, calls=None, **kw):
  kw = {'fingerprint': 'model-a', 'shard_size': 10, 'batch_size': 4, 'progress': False, **kw}
  return index.embed_corpus(_fake_embed(calls), lambda rows: images[rows], ids, str(out_dir),
                            **kw)


@pytest.mark.parametrize('ids,dtype', [(np.arange(100, 137), 'float32'),
                                       ([f'img-{i}' for i in range(37)], 'float16')])
def test_load_index_round_trips_embeddings_and_ids(tmp_path, ids, dtype):
  images = _images(37)
  summary = _build(tmp_path, images, ids, dtype=dtype)
  assert summary['shards'] == summary['computed_shards'] == 4 and summary['dim'] == 6
  emb, got_ids = index.load_index(str(tmp_path))
  assert emb.dtype == np.dtype(dtype) and emb.shape == (37, 6)
  np.testing.assert_allclose(emb.astype(np.float32), _fake_embed()(images),
                             atol=1e-3 if dtype == 'float16' else 0)
  np.testing.assert_array_equal(got_ids, np.asarray(ids))
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  assert manifest['complete'] and manifest['count'] == 37 and manifest['dim'] == 6
  assert [s['file'] for s in manifest['shards']] == [f'shard_0000{j}.npz' for j in range(4)]
  # Shards load without pickle and stream in corpus order.
  starts = [start for _, _, start in index.iter_shards(str(tmp_path))]
  assert starts == [0, 10, 20, 30]
  with np.load(tmp_path / 'shard_00003.npz', allow_pickle=False) as z:
    assert z['ids'].dtype.kind in 'iU' and len(z['ids']) == 7


def test_rerun_after_losing_the_last_shard_recomputes_only_that_shard(tmp_path):
  images, ids = _images(37), np.arange(37)
  _build(tmp_path, images, ids)
  os.remove(tmp_path / 'shard_00003.npz')   # the run was killed before this shard landed
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  manifest['shards'] = manifest['shards'][:3]
  manifest['complete'] = False
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match='incomplete'):
    index.load_index(str(tmp_path))
  calls = []
  summary = _build(tmp_path, images, ids, calls)
  assert calls == [4, 4]   # rows 30..36: two batches of 4 (the last padded); nothing else
  assert summary['computed_shards'] == 1 and summary['reused_shards'] == 3
  emb, _ = index.load_index(str(tmp_path))
  np.testing.assert_array_equal(emb, _fake_embed()(images))


def test_shard_renamed_into_place_but_missing_from_manifest_is_reused(tmp_path):
  images, ids = _images(37), np.arange(37)
  _build(tmp_path, images, ids)
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  manifest['shards'] = manifest['shards'][:2]   # killed between the rename and the manifest
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  calls = []
  summary = _build(tmp_path, images, ids, calls)
  assert calls == [] and summary['reused_shards'] == 4
  assert json.loads((tmp_path / 'manifest.json').read_text())['complete']


def test_a_failed_shard_write_leaves_no_partial_file_and_a_rerun_finishes(tmp_path, monkeypatch):
  images, ids = _images(37), np.arange(37)
  real_savez, written = np.savez, []

  def savez_that_dies_on_third_shard(f, **arrays):
    if len(written) == 2:
      f.write(b'PK\x03\x04 half a zip')   # bytes reached the disk, then the process "died"
      raise KeyboardInterrupt
    written.append(1)
    real_savez(f, **arrays)

  monkeypatch.setattr(np, 'savez', savez_that_dies_on_third_shard)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path, images, ids)
  monkeypatch.setattr(np, 'savez', real_savez)
  assert sorted(os.listdir(tmp_path)) == ['manifest.json', 'shard_00000.npz', 'shard_00001.npz']
  calls = []
  summary = _build(tmp_path, images, ids, calls)
  assert summary['reused_shards'] == 2 and summary['computed_shards'] == 2
  assert sum(calls) == 20   # shards 2 and 3 only: 3 + 2 batches of 4
  np.testing.assert_array_equal(index.load_index(str(tmp_path))[0], _fake_embed()(images))


def test_a_corrupt_shard_on_disk_is_recomputed(tmp_path):
  images, ids = _images(37), np.arange(37)
  _build(tmp_path, images, ids)
  (tmp_path / 'shard_00001.npz').write_bytes(b'not a zip file')
  calls = []
  assert _build(tmp_path, images, ids, calls)['computed_shards'] == 1
  assert sum(calls) == 12


def test_index_of_another_model_is_refused_unless_rebuild(tmp_path):
  images, ids = _images(25), np.arange(25)
  _build(tmp_path, images, ids)
  with pytest.raises(index.IndexMismatchError, match="fingerprint 'model-a', not 'model-b'"):
    _build(tmp_path, images, ids, fingerprint='model-b')
  calls = []
  summary = _build(tmp_path, images, ids, calls, fingerprint='model-b', rebuild=True)
  assert summary['computed_shards'] == 3 and sum(calls) == 32   # 8 batches of 4
  assert index.read_manifest(str(tmp_path))['fingerprint'] == 'model-b'


def test_index_of_another_corpus_or_embedding_size_is_refused(tmp_path):
  images = _images(25)
  _build(tmp_path, images, np.arange(25))
  with pytest.raises(index.IndexMismatchError, match='corpus ids'):
    _build(tmp_path, images, np.arange(1, 26))
  with pytest.raises(index.IndexMismatchError, match='shard size'):
    _build(tmp_path, images, np.arange(25), shard_size=5)
  os.remove(tmp_path / 'shard_00002.npz')
  with pytest.raises(index.IndexMismatchError, match='dim=6 but the model embeds to 5'):
    index.embed_corpus(_fake_embed(dim=5), lambda rows: images[rows], np.arange(25),
                       str(tmp_path), fingerprint='model-a', shard_size=10, batch_size=4,
                       progress=False)


def test_shards_without_a_manifest_are_not_trusted(tmp_path):
  images, ids = _images(25), np.arange(25)
  _build(tmp_path, images, ids)
  os.remove(tmp_path / 'manifest.json')    # nothing vouches for the model that wrote them
  calls = []
  assert _build(tmp_path, images, ids, calls)['computed_shards'] == 3


def test_a_stream_of_batches_gives_the_same_index_and_resumes(tmp_path):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from input_pipeline import pipeline
  images, ids = _images(40), np.arange(40)
  _build(tmp_path / 'rows', images, ids)

  def stream():   # the corpus in order, batches of 8 that straddle shards of 10
    return iter(pipeline.make_batched_source_pipeline(
        (0, 40), lambda rows: {'image': images[rows]}, batch_size=8, seed=0, shuffle=False,
        num_epochs=1, shard_index=0, shard_count=1))

  kw = dict(fingerprint='model-a', shard_size=10, batch_size=4, progress=False)
  index.embed_corpus(_fake_embed(), stream(), ids, str(tmp_path / 'stream'), **kw)
  np.testing.assert_array_equal(index.load_index(str(tmp_path / 'stream'))[0],
                                index.load_index(str(tmp_path / 'rows'))[0])
  os.remove(tmp_path / 'stream' / 'shard_00002.npz')
  calls = []
  summary = index.embed_corpus(_fake_embed(calls), stream(), ids, str(tmp_path / 'stream'), **kw)
  assert summary['computed_shards'] == 1 and sum(calls) == 12
  np.testing.assert_array_equal(index.load_index(str(tmp_path / 'stream'))[0],
                                index.load_index(str(tmp_path / 'rows'))[0])
  with pytest.raises(ValueError, match='ended after 40 images'):
    index.embed_corpus(_fake_embed(), stream(), np.arange(48), str(tmp_path / 'short'), **kw)


def test_clip_image_embed_fn_matches_the_model_on_normalised_pixels(tmp_path):
  from input_pipeline import images as images_lib
  from aesalign_jax.models import clip
  from input_pipeline import world as world_lib
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  params = clip.init_params(cfg, seed=0)
  world = world_lib.World(num_train=64, num_eval=20, num_hpir_pool=0)
  ids = world.split_indices('eval')
  index.embed_corpus(index.image_embed_fn(cfg, params), lambda r: world.render_batch(ids[r]),
                     ids, str(tmp_path), fingerprint=index.fingerprint_params(params),
                     shard_size=8, batch_size=8, progress=False)
  emb, got_ids = index.load_index(str(tmp_path))
  # Independent of image_embed_fn (which Embedder also uses): the host-side CLIP
  # normalisation, then the model's own encode_image on the whole batch.
  pixels = images_lib.normalize(world.render_batch(ids))
  want = np.asarray(clip.bind(cfg, params).encode_image(pixels))
  np.testing.assert_allclose(emb, want, atol=1e-5)
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_fingerprint_changes_with_any_parameter_value():
  params = {'a': np.zeros((2, 3), np.float32), 'b': {'c': np.ones(4, np.float32)}}
  other = {'a': np.zeros((2, 3), np.float32), 'b': {'c': np.ones(4, np.float32)}}
  assert index.fingerprint_params(params) == index.fingerprint_params(other)
  other['b']['c'][2] = 1.0001
  assert index.fingerprint_params(params) != index.fingerprint_params(other)
