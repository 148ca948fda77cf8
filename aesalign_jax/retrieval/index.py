"""Corpus embeddings computed in batches and stored on disk as shards with their ids.

    summary = embed_corpus(image_embed_fn(cfg, params), lambda rows: world.render_batch(ids[rows]),
                           ids, out_dir, fingerprint=fingerprint_params(params),
                           shard_size=50_000, batch_size=256)
    embeddings, ids = load_index(out_dir)          # or: for emb, ids, start in iter_shards(out_dir)

Layout of out_dir: shard files and a manifest.json (index_files.py, which also reads them).

Every file is written to a temporary name and renamed into place, so a crash leaves either the
whole shard or none of it. A rerun reuses every shard on disk whose ids are the expected ones
and whose embeddings have the right shape (listed in the manifest or not: a crash between the
rename and the manifest update loses nothing) and computes only the rest. A manifest written
for another model (fingerprint), another embedding size or another corpus (ids, shard size,
dtype) is refused with an error naming the difference, unless rebuild=True.

Several processes: every process calls embed_corpus; each embeds the shards j with
j % process_count == process_index on its own devices (a mesh of its local devices, or none)
and writes them itself, and process 0 writes the manifest; no process holds more than one
shard's embeddings. out_dir must be on a file system all processes share. Read the index
back with open_index (rows on demand) rather than load_index (all of it in memory).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, Iterable, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aesalign_jax import multihost, sharding
# The on-disk layout and the readers, importable from here too (index.load_index...).
from aesalign_jax.retrieval.index_files import (  # noqa: F401
    FORMAT, MANIFEST, IndexMismatchError, IndexRows, as_ids, atomic_write, check_compatible,
    clear_index, ids_digest, iter_shards, load_index, open_index, read_manifest,
    shard_is_complete, shard_name, write_manifest, write_shard)

__all__ = ['FORMAT', 'MANIFEST', 'IndexMismatchError', 'IndexRows', 'LoadBatch', 'as_ids',
           'atomic_write', 'embed_corpus', 'fingerprint_params', 'image_embed_fn', 'iter_shards',
           'load_index', 'open_index', 'read_manifest', 'shard_name']

_DTYPES = ('float32', 'float16')

LoadBatch = Callable[[np.ndarray], Any]   # corpus rows int64 [B] -> uint8 [B, H, W, 3] or dict


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
      With several processes the mesh must be this process's own devices
      (sharding.local_mesh): each process embeds its own shards.
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
  processes, me = jax.process_count(), jax.process_index()
  if processes > 1 and mesh is not None and not all(
      d.process_index == me for d in mesh.devices.flat):
    raise ValueError('embed_corpus: with several processes each embeds its own shards, so the '
                     'mesh must hold this process\'s devices only (sharding.local_mesh(mesh))')
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
              'ids_sha256': ids_digest(ids), 'complete': False, 'shards': []}
  old = read_manifest(out_dir)
  trusted = old is not None   # shards on disk belong to this model and corpus
  if old is not None:
    try:
      check_compatible(old, manifest, out_dir)
      manifest['dim'] = old.get('dim')
    except IndexMismatchError:
      if not rebuild:
        raise
      logging.warning('index %s: rebuilding (it was built for another model or corpus)', out_dir)
      trusted = False
  plan = [(j, s, min(s + shard_size, n)) for j, s in enumerate(range(0, n, shard_size))]
  done = {j for j, s, e in plan
          if trusted and shard_is_complete(os.path.join(out_dir, shard_name(j)), ids[s:e],
                                            manifest['dim'], dtype)}
  manifest['shards'] = [{'file': shard_name(j), 'start': s, 'count': e - s}
                        for j, s, e in plan if j in done]
  manifest['complete'] = len(done) == len(plan)
  _sync_processes('embed_corpus:checked')   # every process has read the files before any write
  if writer:
    if not trusted:   # without a compatible manifest nothing on disk is known to be ours
      clear_index(out_dir)
    for name in os.listdir(out_dir):   # temporaries of a killed run: never a finished file
      if name.startswith('shard_') and '.npz.tmp' in name:
        os.remove(os.path.join(out_dir, name))
    # Written before any new shard: a shard on disk always has a manifest vouching for it.
    write_manifest(out_dir, manifest)
  _sync_processes('embed_corpus:planned')

  reader = _RowReader(images)
  start_time, computed = time.perf_counter(), 0
  bar = tqdm(total=n, initial=sum(e - s for j, s, e in plan if j in done), unit='img',
             desc=f'embedding {os.path.basename(os.path.normpath(out_dir))}',
             disable=not progress)
  with bar:
    for j, s, e in plan:
      if j in done or j % processes != me:   # another process's shard: it embeds it
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
      write_shard(os.path.join(out_dir, shard_name(j)), np.concatenate(parts), ids[s:e])
      if processes == 1:   # several processes: process 0 lists every shard at the end
        manifest['shards'].append({'file': shard_name(j), 'start': s, 'count': e - s})
        manifest['shards'].sort(key=lambda r: r['start'])
        manifest['complete'] = len(manifest['shards']) == len(plan)
        write_manifest(out_dir, manifest)
      computed += 1
  if processes > 1:
    dims = [d for d in multihost.allgather(manifest['dim']) if d is not None]
    manifest['dim'] = manifest['dim'] if manifest['dim'] is not None else (
        dims[0] if dims else None)
    _sync_processes('embed_corpus:embedded')   # every shard is on disk
    if writer:
      manifest['shards'] = [{'file': shard_name(j), 'start': s, 'count': e - s}
                            for j, s, e in plan]
      manifest['complete'] = True
      write_manifest(out_dir, manifest)
    _sync_processes('embed_corpus:listed')
  seconds = time.perf_counter() - start_time
  rows_computed = sum(e - s for j, s, e in plan if j not in done and j % processes == me)
  return {'out_dir': out_dir, 'count': n, 'dim': manifest['dim'], 'shards': len(plan),
          'computed_shards': computed, 'reused_shards': len(done), 'seconds': seconds,
          'images_per_s': rows_computed / seconds if rows_computed and seconds > 0 else None}
