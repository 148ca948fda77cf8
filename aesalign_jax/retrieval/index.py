"""Corpus embeddings computed in batches and stored on disk as shards with their ids.

    summary = embed_corpus(image_embed_fn(cfg, params), lambda rows: world.render_batch(ids[rows]),
                           ids, out_dir, fingerprint=fingerprint_params(params),
                           shard_size=50_000, batch_size=256)
    embeddings, ids = load_index(out_dir)          # or: for emb, ids, start in iter_shards(out_dir)

Layout of out_dir:
  shard_00000.npz   'embeddings' [n, D] float32 or float16, 'ids' [n] int64 or fixed-width
                    unicode; rows [j * shard_size, j * shard_size + n) of the corpus
  manifest.json     {format, dim, count, dtype, shard_size, fingerprint, ids_sha256, complete,
                     shards: [{file, start, count}]}

Every file is written to a temporary name and renamed into place, so a crash leaves either the
whole shard or none of it. A rerun reuses every shard on disk whose ids are the expected ones
and whose embeddings have the right shape (listed in the manifest or not: a crash between the
rename and the manifest update loses nothing) and computes only the rest. A manifest written
for another model (fingerprint), another embedding size or another corpus (ids, shard size,
dtype) is refused with an error naming the difference, unless rebuild=True.

Multi-host: every process runs the same calls (the embedding is one global computation over
the mesh) and process 0 alone writes; out_dir must be on a file system all processes share.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aesalign_jax import sharding

MANIFEST = 'manifest.json'
FORMAT = 1
_DTYPES = ('float32', 'float16')

LoadBatch = Callable[[np.ndarray], Any]   # corpus rows int64 [B] -> uint8 [B, H, W, 3] or dict


class IndexMismatchError(ValueError):
  """An existing index in out_dir was built for another model or corpus."""


def shard_name(j: int) -> str:
  return f'shard_{j:05d}.npz'


def as_ids(ids) -> np.ndarray:
  """Corpus ids as int64 or fixed-width unicode (np.savez stores both without pickle)."""
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f'corpus ids must be one-dimensional, got shape {arr.shape}')
  if np.issubdtype(arr.dtype, np.integer):
    return arr.astype(np.int64)
  if arr.dtype.kind == 'U':
    return arr
  if arr.dtype.kind in ('S', 'O'):
    return np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in arr], dtype=str)
  raise TypeError(f'corpus ids must be integers or strings, got dtype {arr.dtype}')


def _ids_digest(ids: np.ndarray) -> str:
  h = hashlib.sha256(ids.dtype.str.encode())
  h.update(np.ascontiguousarray(ids).tobytes())
  return h.hexdigest()[:32]


def fingerprint_params(params, extra: str = '') -> str:
  """A short sha256 of a parameter tree (paths, shapes, dtypes, values) plus `extra`.

  Hashes host copies of the leaves: call it on parameters every process holds whole (before
  sharding them over a multi-host mesh).
  """
  h = hashlib.sha256(extra.encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    arr = np.asarray(leaf)
    h.update(f'{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype};'.encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()[:20]


def image_embed_fn(cfg, params, *, mesh=None, rules=None) -> Callable[[Any], jax.Array]:
  """A jitted CLIP image embedder, uint8 [B, S, S, 3] -> unit vectors float32 [B, D].

  With a mesh, the parameters are laid out by their logical axes and `rules` (defaults:
  sharding.DEFAULT_RULES) and activations are constrained the same way; the batch keeps the
  sharding it arrives with (embed_corpus puts it with sharding.batch_sharding).
  """
  from aesalign_jax.models import clip   # pylint: disable=g-import-not-at-top
  from input_pipeline import images as images_lib   # pylint: disable=g-import-not-at-top
  mean = jnp.asarray(images_lib.CLIP_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(images_lib.CLIP_STD, jnp.float32) * 255.0

  def encode(p, x):
    return clip.bind(cfg, p).encode_image((x.astype(jnp.float32) - mean) / std)

  if mesh is None:
    fn = jax.jit(encode)
    return lambda x: fn(params, x)
  rules = sharding.DEFAULT_RULES if rules is None else rules
  specs = sharding.param_specs(clip.logical_axes(cfg), params, mesh, rules)
  placed = jax.device_put(params, sharding.named(mesh, specs))

  def sharded_encode(p, x):
    with sharding.activation_rules(mesh, rules):
      return encode(p, x)

  fn = jax.jit(sharded_encode)
  return lambda x: fn(placed, x)


# --- files ------------------------------------------------------------------------------------

def atomic_write(path: str, write: Callable[[Any], None], mode: str = 'wb'):
  """write(file) to a temporary name, fsync, rename over path: all of the file or none."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_shard(path: str, embeddings: np.ndarray, ids: np.ndarray):
  atomic_write(path, lambda f: np.savez(f, embeddings=embeddings, ids=ids))


def _write_manifest(out_dir: str, manifest: dict):
  text = json.dumps(manifest, indent=1)
  atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(text), mode='w')


def read_manifest(out_dir: str) -> Optional[dict]:
  """The index's manifest.json, or None when out_dir has none."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise IndexMismatchError(f'{path} is not a readable index manifest ({e}); remove the folder '
                             f'or pass rebuild=True') from e
  if manifest.get('format') != FORMAT:
    raise IndexMismatchError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT}')
  return manifest


def _npz_array_shape(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of one array in an .npz, from its header only (no data read)."""
  with zipfile.ZipFile(path) as zf, zf.open(f'{key}.npy') as f:
    major, _ = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
  return shape, dtype


def _shard_is_complete(path: str, want_ids: np.ndarray, dim: Optional[int], dtype: str) -> bool:
  """Whether the shard file holds exactly these ids and [len(ids), dim] embeddings of dtype."""
  if not os.path.exists(path):
    return False
  try:
    with np.load(path, allow_pickle=False) as z:
      ids = z['ids']
    shape, stored = _npz_array_shape(path, 'embeddings')
  except Exception as e:  # a damaged file: say so and recompute it
    logging.warning('index shard %s is unreadable (%s); recomputing it', path, e)
    return False
  if ids.shape != want_ids.shape or not np.array_equal(ids, want_ids):
    logging.warning('index shard %s holds other ids than expected; recomputing it', path)
    return False
  if len(shape) != 2 or shape[0] != len(want_ids) or (dim is not None and shape[1] != dim) or \
      np.dtype(stored) != np.dtype(dtype):
    logging.warning('index shard %s has embeddings %s %s, expected [%d, %s] %s; recomputing it',
                    path, shape, stored, len(want_ids), dim, dtype)
    return False
  return True


def _check_compatible(old: dict, new: dict, out_dir: str):
  path = os.path.join(out_dir, MANIFEST)
  hint = 'pass rebuild=True (or use another folder) to rebuild it'
  if old.get('fingerprint') != new['fingerprint']:
    raise IndexMismatchError(
        f'{path} was built with model fingerprint {old.get("fingerprint")!r}, not '
        f'{new["fingerprint"]!r}: its embeddings belong to another model; {hint}')
  for key, what in (('count', 'corpus size'), ('ids_sha256', 'corpus ids'),
                    ('shard_size', 'shard size'), ('dtype', 'storage dtype')):
    if old.get(key) != new[key]:
      raise IndexMismatchError(f'{path} has {what} {key}={old.get(key)!r}, this run asks for '
                               f'{new[key]!r}; {hint}')
  if new.get('dim') is not None and old.get('dim') not in (None, new['dim']):
    raise IndexMismatchError(f'{path} has embedding size dim={old.get("dim")}, this run asks '
                             f'for {new["dim"]}; {hint}')


def _clear(out_dir: str):
  """Removes the index files (manifest, shards, leftover temporaries) and nothing else."""
  for name in sorted(os.listdir(out_dir)):
    if name.startswith(MANIFEST) or (name.startswith('shard_') and '.npz' in name):
      logging.warning('index %s: removing %s', out_dir, name)
      os.remove(os.path.join(out_dir, name))


# --- reading images ---------------------------------------------------------------------------

def _images_of(batch) -> np.ndarray:
  images = batch['image'] if isinstance(batch, dict) else batch
  return np.asarray(images)


class _RowReader:
  """Images of corpus rows [start, stop), from load_batch(rows) or a stream of batches.

  A stream (e.g. a grain iterator over the corpus in order, not shuffled, not repeated) can
  only move forward: rows of shards already on disk are read and dropped.
  """

  def __init__(self, source: Union[LoadBatch, Iterable]):
    if callable(source) and not hasattr(source, '__next__'):
      self._load, self._stream = source, None
    else:
      self._load, self._stream = None, iter(source)
      self._buffer, self._pos = [], 0   # images read but not yet used; first row they hold

  def read(self, start: int, stop: int) -> np.ndarray:
    if self._load is not None:
      images = _images_of(self._load(np.arange(start, stop, dtype=np.int64)))
      if len(images) != stop - start:
        raise ValueError(f'load_batch(rows {start}..{stop - 1}) returned {len(images)} images, '
                         f'expected {stop - start}')
      return images
    if start < self._pos:
      raise ValueError(f'a stream of batches cannot go back to row {start} (at {self._pos})')
    self._fill(stop)
    images = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
    out = images[start - self._pos:stop - self._pos]
    self._buffer, self._pos = [images[stop - self._pos:]], stop
    return out

  def skip(self, stop: int):
    """Moves a stream past rows < stop (their images are read and dropped)."""
    if self._load is None and stop > self._pos:
      self.read(self._pos, stop)

  def _fill(self, stop: int):
    have = self._pos + sum(len(b) for b in self._buffer)
    while have < stop:
      try:
        batch = _images_of(next(self._stream))
      except StopIteration:
        raise ValueError(f'the stream of image batches ended after {have} images; the corpus '
                         f'has at least {stop} (a grain pipeline with drop_remainder drops the '
                         f'last partial batch: use load_batch instead)') from None
      self._buffer.append(batch)
      have += len(batch)


# --- embedding --------------------------------------------------------------------------------

def _sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def embed_corpus(embed_images_fn: Callable[[Any], Any], images: Union[LoadBatch, Iterable],
                 ids, out_dir: str, *, fingerprint: str, shard_size: int = 50_000,
                 batch_size: int = 256, dtype: str = 'float32', mesh=None, rules=None,
                 rebuild: bool = False, progress: bool = True) -> dict:
  """Embeds a corpus in batches and stores the embeddings as shards with ids (resumable).

  Args:
    embed_images_fn: uint8 [B, H, W, 3] (numpy, or a jax array sharded over the mesh) ->
      embeddings [B, D]; called with exactly batch_size images every time (the last batch is
      padded), so a jitted function compiles once. image_embed_fn(cfg, params) makes one.
    images: load_batch(rows int64 [B]) -> uint8 [B, H, W, 3] (or a dict with 'image'), where
      rows index `ids`; or an iterable of such batches covering the corpus in order.
    ids: [N] corpus ids (integers or strings), stored beside the embeddings.
    out_dir: folder of the index (created if missing).
    fingerprint: a string identifying the model (e.g. fingerprint_params(params)); an index
      built with another one is refused.
    shard_size: corpus rows per shard file.
    batch_size: images per embedding call.
    dtype: 'float32' or 'float16' storage.
    mesh, rules: put each batch with sharding.batch_sharding(mesh, rules) (batch_size must be
      a multiple of the devices on the batch axes); rules default to sharding.DEFAULT_RULES.
    rebuild: delete an incompatible index in out_dir instead of refusing it.
    progress: show a tqdm progress bar.

  Returns:
    A summary: count, dim, shards, computed_shards, reused_shards, seconds, images_per_s.
  """
  from tqdm.auto import tqdm   # pylint: disable=g-import-not-at-top
  if dtype not in _DTYPES:
    raise ValueError(f'embed_corpus: dtype={dtype!r}; expected one of {_DTYPES}')
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f'embed_corpus: shard_size={shard_size} and batch_size={batch_size} must '
                     f'be positive')
  ids = as_ids(ids)
  n = len(ids)
  if n == 0:
    raise ValueError(f'embed_corpus: the corpus for {out_dir} has no ids')
  put = None
  if mesh is not None:
    rules = sharding.DEFAULT_RULES if rules is None else rules
    ndev = sharding.batch_devices(mesh, rules)
    if batch_size % ndev:
      raise ValueError(f'embed_corpus: batch_size={batch_size} is not a multiple of the '
                       f'{ndev} devices on the mesh\'s batch axes')
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, rules, x.ndim))
  writer = jax.process_index() == 0

  os.makedirs(out_dir, exist_ok=True)
  manifest = {'format': FORMAT, 'dim': None, 'count': n, 'dtype': dtype,
              'shard_size': int(shard_size), 'fingerprint': str(fingerprint),
              'ids_sha256': _ids_digest(ids), 'complete': False, 'shards': []}
  old = read_manifest(out_dir)
  trusted = old is not None   # shards on disk belong to this model and corpus
  if old is not None:
    try:
      _check_compatible(old, manifest, out_dir)
      manifest['dim'] = old.get('dim')
    except IndexMismatchError:
      if not rebuild:
        raise
      logging.warning('index %s: rebuilding (it was built for another model or corpus)', out_dir)
      trusted = False
  plan = [(j, s, min(s + shard_size, n)) for j, s in enumerate(range(0, n, shard_size))]
  done = {j for j, s, e in plan
          if trusted and _shard_is_complete(os.path.join(out_dir, shard_name(j)), ids[s:e],
                                            manifest['dim'], dtype)}
  manifest['shards'] = [{'file': shard_name(j), 'start': s, 'count': e - s}
                        for j, s, e in plan if j in done]
  manifest['complete'] = len(done) == len(plan)
  _sync_processes('embed_corpus:checked')   # every process has read the files before any write
  if writer:
    if not trusted:   # without a compatible manifest nothing on disk is known to be ours
      _clear(out_dir)
    for name in os.listdir(out_dir):   # temporaries of a killed run: never a finished file
      if name.startswith('shard_') and '.npz.tmp' in name:
        os.remove(os.path.join(out_dir, name))
    # Written before any new shard: a shard on disk always has a manifest vouching for it.
    _write_manifest(out_dir, manifest)
  _sync_processes('embed_corpus:planned')

  reader = _RowReader(images)
  start_time, computed = time.perf_counter(), 0
  bar = tqdm(total=n, initial=sum(e - s for j, s, e in plan if j in done), unit='img',
             desc=f'embedding {os.path.basename(os.path.normpath(out_dir))}',
             disable=not progress)
  with bar:
    for j, s, e in plan:
      if j in done:
        reader.skip(e)
        continue
      parts = []
      for b in range(s, e, batch_size):
        batch = reader.read(b, min(b + batch_size, e))
        real = len(batch)
        if real < batch_size:    # one compiled shape: pad with copies of the last image
          batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        x = put(batch) if put is not None else batch
        if mesh is not None:
          with sharding.activation_rules(mesh, rules):
            out = embed_images_fn(x)
        else:
          out = embed_images_fn(x)
        out = _to_host(out)[:real]
        if out.ndim != 2 or len(out) != real:
          raise ValueError(f'embed_images_fn returned shape {out.shape} for {real} images; '
                           f'expected [{real}, D]')
        if manifest['dim'] is None:
          manifest['dim'] = int(out.shape[1])
        elif out.shape[1] != manifest['dim']:
          raise IndexMismatchError(
              f'{os.path.join(out_dir, MANIFEST)} has dim={manifest["dim"]} but the model '
              f'embeds to {out.shape[1]} under the same fingerprint {fingerprint!r}: the '
              f'fingerprint must identify the model; delete {out_dir} to rebuild it')
        parts.append(out.astype(dtype))
        bar.update(real)
      if writer:
        _write_shard(os.path.join(out_dir, shard_name(j)), np.concatenate(parts), ids[s:e])
        manifest['shards'].append({'file': shard_name(j), 'start': s, 'count': e - s})
        manifest['shards'].sort(key=lambda r: r['start'])
        manifest['complete'] = len(manifest['shards']) == len(plan)
        _write_manifest(out_dir, manifest)
      computed += 1
  seconds = time.perf_counter() - start_time
  rows_computed = sum(e - s for j, s, e in plan if j not in done)
  return {'out_dir': out_dir, 'count': n, 'dim': manifest['dim'], 'shards': len(plan),
          'computed_shards': computed, 'reused_shards': len(done), 'seconds': seconds,
          'images_per_s': rows_computed / seconds if rows_computed and seconds > 0 else None}


# --- reading the index ------------------------------------------------------------------------

def _complete_manifest(out_dir: str) -> dict:
  manifest = read_manifest(out_dir)
  if manifest is None:
    raise FileNotFoundError(f'no index in {out_dir} (no {MANIFEST}); build it with embed_corpus')
  if not manifest.get('complete'):
    have = sum(r['count'] for r in manifest['shards'])
    raise ValueError(f'index {out_dir} is incomplete ({have} of {manifest["count"]} rows '
                     f'embedded); rerun embed_corpus to finish it')
  return manifest


def iter_shards(out_dir: str) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Yields (embeddings [n, D], ids [n], first corpus row) shard by shard, in corpus order."""
  manifest = _complete_manifest(out_dir)
  for rec in manifest['shards']:
    path = os.path.join(out_dir, rec['file'])
    with np.load(path, allow_pickle=False) as z:
      emb, ids = z['embeddings'], z['ids']
    if emb.shape != (rec['count'], manifest['dim']) or len(ids) != rec['count']:
      raise ValueError(f'index shard {path}: embeddings {emb.shape} and {len(ids)} ids, the '
                       f'manifest says [{rec["count"]}, {manifest["dim"]}]')
    yield emb, ids, rec['start']


def load_index(out_dir: str, dtype=None) -> tuple[np.ndarray, np.ndarray]:
  """The whole index in memory: (embeddings [N, D] (stored dtype unless given), ids [N])."""
  manifest = _complete_manifest(out_dir)
  dtype = np.dtype(manifest['dtype'] if dtype is None else dtype)
  embeddings = np.empty((manifest['count'], manifest['dim']), dtype)
  ids = []
  for emb, shard_ids, start in iter_shards(out_dir):
    embeddings[start:start + len(emb)] = emb
    ids.append(shard_ids)
  return embeddings, np.concatenate(ids)
