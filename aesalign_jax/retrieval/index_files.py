"""The on-disk layout of a corpus index: shard files and their manifest, written atomically,
checked against what a run asks for, and read back (embed_corpus in index.py writes it).

Layout of an index folder:
  shard_00000.npz   'embeddings' [n, D] float32 or float16, 'ids' [n] int64 or fixed-width
                    unicode; rows [j * shard_size, j * shard_size + n) of the corpus
  manifest.json     {format, dim, count, dtype, shard_size, fingerprint, ids_sha256, complete,
                     shards: [{file, start, count}]}

    embeddings, ids = load_index(out_dir)          # or: for emb, ids, start in iter_shards(out_dir)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any, Callable, Iterator, Optional

import numpy as np
from absl import logging

MANIFEST = 'manifest.json'
FORMAT = 1


class IndexMismatchError(ValueError):
  """An existing index in out_dir was built for another model or corpus."""


def shard_name(j: int) -> str:
  """The file name of shard j."""
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


def ids_digest(ids: np.ndarray) -> str:
  """A short sha256 of corpus ids (dtype and values): the manifest's ids_sha256."""
  h = hashlib.sha256(ids.dtype.str.encode())
  h.update(np.ascontiguousarray(ids).tobytes())
  return h.hexdigest()[:32]


# --- writing and checking ---------------------------------------------------------------------

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


def write_shard(path: str, embeddings: np.ndarray, ids: np.ndarray):
  """One shard file (embeddings and ids), atomically."""
  atomic_write(path, lambda f: np.savez(f, embeddings=embeddings, ids=ids))


def write_manifest(out_dir: str, manifest: dict):
  """out_dir/manifest.json, atomically."""
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


def shard_is_complete(path: str, want_ids: np.ndarray, dim: Optional[int], dtype: str) -> bool:
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


def check_compatible(old: dict, new: dict, out_dir: str):
  """Raises IndexMismatchError naming the first difference that makes the index in out_dir
  (manifest `old`) unusable for a run that asks for manifest `new`."""
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


def clear_index(out_dir: str):
  """Removes the index files (manifest, shards, leftover temporaries) and nothing else."""
  for name in sorted(os.listdir(out_dir)):
    if name.startswith(MANIFEST) or (name.startswith('shard_') and '.npz' in name):
      logging.warning('index %s: removing %s', out_dir, name)
      os.remove(os.path.join(out_dir, name))


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
