"""The on-disk layout of a corpus index: shard files and their manifest, written atomically,
checked against what a run asks for, and read back (embed_corpus in index.py writes it).

Layout of an index folder:
  shard_00000.npz   'embeddings' [n, D] float32 or float16, 'ids' [n] int64 or fixed-width
                    unicode; rows [j * shard_size, j * shard_size + n) of the corpus
  manifest.json     {format, dim, count, dtype, shard_size, fingerprint, ids_sha256, complete,
                     shards: [{file, start, count}]}

    embeddings, ids = load_index(out_dir)          # or: for emb, ids, start in iter_shards(out_dir)
    rows = open_index(out_dir)                     # read from the files on demand: rows[r],
                                                   # rows[a:b]; never the whole matrix at once

The shard files are uncompressed zips (np.savez), so open_index maps each shard's embeddings
straight from its file (np.memmap at the array's offset) for the rows asked for, and unmaps
them after: a process's memory holds the rows it reads, not the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
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


# --- reading rows on demand -------------------------------------------------------------------

def _npz_member_location(path: str, key: str) -> tuple[int, tuple, np.dtype, bool]:
  """(byte offset of the array's data in the file, shape, dtype, fortran order) of one array
  of an uncompressed .npz (np.savez), from its zip and .npy headers."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(f'{key}.npy')
  if info.compress_type != zipfile.ZIP_STORED:
    raise ValueError(f'{path}: {key} is compressed; index shards are written uncompressed')
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    local = f.read(30)   # the zip local file header: name and extra field lengths at 26..29
    name_len, extra_len = struct.unpack('<HH', local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    major, _ = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    return f.tell(), shape, dtype, fortran


class IndexRows:
  """The embeddings of a complete index as a read-only [N, D] float32 array-like whose rows are
  read from the shard files when indexed (rows[5], rows[[3, 9]], rows[1000:2000], a bool mask)
  and not kept: what search.topk streams through chunk by chunk, and what mining and the
  evaluators index. `take(rows)` is a view of some rows (the same files); `ids` their ids.
  np.asarray(rows) reads everything (e.g. to build a FAISS index)."""

  def __init__(self, out_dir: str, *, _shards=None, _select=None):
    self.out_dir = out_dir
    if _shards is None:
      manifest = _complete_manifest(out_dir)
      _shards = []
      for rec in manifest['shards']:
        path = os.path.join(out_dir, rec['file'])
        offset, shape, dtype, fortran = _npz_member_location(path, 'embeddings')
        if tuple(shape) != (rec['count'], manifest['dim']):
          raise ValueError(f'index shard {path}: embeddings {shape}, the manifest says '
                           f'[{rec["count"]}, {manifest["dim"]}]')
        _shards.append((path, rec['start'], offset, tuple(shape), dtype, fortran))
      self._dim = int(manifest['dim'])
      self._count = int(manifest['count'])
    else:
      self._dim = _shards[0][3][1]
      self._count = sum(s[3][0] for s in _shards)
    self._shards = _shards
    self._starts = np.asarray([s[1] for s in _shards], np.int64)
    self._select = None if _select is None else np.asarray(_select, np.int64)
    self.dtype = np.dtype(np.float32)

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self), self._dim)

  ndim = 2

  def __len__(self) -> int:
    return self._count if self._select is None else len(self._select)

  @property
  def ids(self) -> np.ndarray:
    parts = []
    for path, *_ in self._shards:
      with np.load(path, allow_pickle=False) as z:
        parts.append(z['ids'])
    ids = np.concatenate(parts)
    return ids if self._select is None else ids[self._select]

  def shards(self) -> list[tuple[int, int]]:
    """[start, stop) of each shard in this view's rows (a view made by take() has one)."""
    if self._select is not None:
      return [(0, len(self))]
    return [(s[1], s[1] + s[3][0]) for s in self._shards]

  def _read(self, rows: np.ndarray) -> np.ndarray:
    """Index rows (sorted or not) -> float32 [len(rows), D], a fresh array."""
    out = np.empty((len(rows), self._dim), np.float32)
    if not len(rows):
      return out
    if rows.min() < 0 or rows.max() >= self._count:
      raise IndexError(f'index {self.out_dir}: rows outside [0, {self._count})')
    which = np.searchsorted(self._starts, rows, side='right') - 1
    for j in np.unique(which):
      path, start, offset, shape, dtype, fortran = self._shards[j]
      at = np.flatnonzero(which == j)
      # Mapped for this read only: the pages read leave the process with the map.
      mapped = np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape,
                         order='F' if fortran else 'C')
      local = rows[at] - start
      lo, hi = int(local.min()), int(local.max()) + 1
      if hi - lo == len(local) and np.all(np.diff(local) == 1):   # a run: one slice
        out[at] = mapped[lo:hi]
      else:
        out[at] = mapped[local]
      del mapped
    return out

  def __getitem__(self, key) -> np.ndarray:
    n = len(self)
    if isinstance(key, tuple):   # rows[r, :] and the like
      first, rest = key[0], key[1:]
      return self[first][(slice(None),) + rest]
    if isinstance(key, slice):
      rows = np.arange(*key.indices(n), dtype=np.int64)
    else:
      arr = np.asarray(key)
      if arr.dtype == bool:
        if arr.shape != (n,):
          raise IndexError(f'boolean index of shape {arr.shape} for {n} rows')
        rows = np.flatnonzero(arr)
      else:
        rows = arr.astype(np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + n, rows)
      if arr.ndim == 0 and arr.dtype != bool:
        return self[rows][0]
    if self._select is not None:
      rows = self._select[rows]
    out = self._read(rows)
    if not isinstance(key, slice) and np.asarray(key).dtype != bool:
      out = out.reshape(np.asarray(key).shape + (self._dim,))
    return out

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def take(self, rows) -> 'IndexRows':
    """A view of these rows (indices or a bool mask into this view), in this order."""
    rows = np.asarray(rows)
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
    if self._select is not None:
      rows = self._select[rows]
    return IndexRows(self.out_dir, _shards=self._shards, _select=rows)


def open_index(out_dir: str) -> IndexRows:
  """The complete index in out_dir, rows read on demand (IndexRows)."""
  return IndexRows(out_dir)
