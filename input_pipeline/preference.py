"""D_po: the preference-group record, its files, and the grain pipeline that feeds alignment.

One module for the whole life of a group (PAPER.md, "Building the partially ordered set D_po"):
the mining stage builds `PreferenceGroup`s and writes them with `GroupWriter`; training opens
them with `open_groups` and batches them with `make_preference_pipeline`. input_pipeline/world_groups.py
builds groups of the same format from the embedded world's ground truth (for tests, before a
mined file exists).

The record (one per query). A group holds N = u*v images in GRID ORDER: index k = i*v + j,
row i = the i-th semantic rank band (row 0 most relevant), column j = the aesthetic rank
within the row (column 0 best). Fields:
  query            the ORIGINAL query text (training conditions on it)
  rephrased_query  the rephrased query that widened the retrieval net
  image_ids        list[str], N corpus ids in grid order
  aesthetic_scores float64 [N]  the aesthetic scores the rows were sorted by
  semantic_scores  float64 [N]  the semantic scores the rows were banded by
  ref_scores       float64 [N]  reference model's cosine similarity of `query` to each image
  u, v, stride     the grid (u rows, v columns) and the stride of the pick
  meta             free-form JSON object (e.g. ground truth in the world)
Validation (on construction, so no invalid group exists): non-empty query texts, N distinct
non-empty ids, every score list of length u*v and finite, each row's aesthetic scores
non-increasing (best first) and each row's semantic scores all >= the next row's (the grid
order the pair mask relies on), positive u, v, stride, meta JSON-serialisable.

Files, the format picked by extension:
  .arrayrecord  one record per group, each a UTF-8 JSON object (`PreferenceGroup.to_dict`,
                with "version": 1), written with group_size 1 for cheap random access;
                read through grain's ArrayRecordDataSource (lazily, so workers pickle a path).
  .parquet      one row per group: query, rephrased_query (string), image_ids (list<string>),
                aesthetic_scores, semantic_scores, ref_scores (list<double>), u, v, stride
                (int64), meta (string: the JSON object); read into memory whole (D_po holds
                one row per query, small next to its images).
Scores are float64 in both, so float32 values from a model round-trip exactly. Writes go to
a hidden temporary file beside the target, renamed over it only when every record was
written: a crash or an invalid record never leaves a half file (an older file stays intact).
All records of a file share one (u, v): the writer and the reader both refuse a mismatch.

Batches of `make_preference_pipeline` (G = groups per step):
  'images'           uint8 [G, N, S, S, 3]
  'ids'              int32 [G, L]   tokenised ORIGINAL queries
  'eos_index'        int32 [G]
  'ref_scores', 'aesthetic_scores', 'semantic_scores'  float32 [G, N]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from input_pipeline import pipeline as pipeline_lib
from input_pipeline import sources as sources_lib

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EXTENSIONS = (".arrayrecord", ".parquet")
DPO_PATH_KEY = "align.dpo_path"  # the config key that names a D_po file, for error messages
SCORE_FIELDS = ("aesthetic_scores", "semantic_scores", "ref_scores")
_RECORD_KEYS = ("version", "query", "rephrased_query", "image_ids", *SCORE_FIELDS,
                "u", "v", "stride", "meta")

ImageLookup = Callable[[list[str]], np.ndarray]  # N ids -> uint8 [N, S, S, 3]


# ------------------------------------------------------------------------------ the record

class PreferenceGroupError(ValueError):
  """An invalid group; `record` (its number in a file or list, or None) and `field` name it."""

  def __init__(self, message: str, *, field: str | None = None, record: int | None = None,
               origin: str | None = None):
    where = " ".join(p for p in (origin, None if record is None else f"record {record}") if p)
    what = f"field {field!r}: " if field else ""
    super().__init__(f"{where + ': ' if where else ''}{what}{message}")
    self.field, self.record, self.origin, self.reason = field, record, origin, message


def positive_int(name: str, value: Any) -> int:
  """`value` as an int; PreferenceGroupError naming field `name` unless a positive int."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise PreferenceGroupError(f"must be a positive int, got {value!r}", field=name)
  return int(value)


def _text(name: str, value: Any) -> str:
  if not isinstance(value, str) or not value.strip():
    raise PreferenceGroupError(f"must be a non-empty string, got {value!r:.80}", field=name)
  return value


def _scores(name: str, value: Any, n: int) -> np.ndarray:
  try:
    arr = np.array(value, dtype=np.float64)  # a copy: the group owns its scores
  except (TypeError, ValueError) as e:
    raise PreferenceGroupError(f"must be a list of numbers ({e})", field=name) from None
  if arr.shape != (n,):
    raise PreferenceGroupError(f"must hold u*v = {n} numbers, got shape {arr.shape}",
                               field=name)
  bad = np.flatnonzero(~np.isfinite(arr))
  if len(bad):
    raise PreferenceGroupError(f"must be finite, got {arr[bad[0]]} at position {bad[0]}",
                               field=name)
  arr.setflags(write=False)
  return arr


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceGroup:
  """One query's D_po group: N = u*v images in grid order and their scores (module docstring).

  Construction validates and raises PreferenceGroupError naming the field; score lists
  become read-only float64 arrays. Equality is exact (ids, texts, every score value, meta).
  """
  query: str
  rephrased_query: str
  image_ids: list[str]
  aesthetic_scores: np.ndarray
  semantic_scores: np.ndarray
  ref_scores: np.ndarray
  u: int
  v: int
  stride: int = 1
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
    put("query", _text("query", self.query))
    put("rephrased_query", _text("rephrased_query", self.rephrased_query))
    for name in ("u", "v", "stride"):
      put(name, positive_int(name, getattr(self, name)))
    n = self.u * self.v
    ids = self.image_ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
      raise PreferenceGroupError(f"must be a list of strings, got {type(ids).__name__}",
                                 field="image_ids")
    ids = list(ids)
    if len(ids) != n:
      raise PreferenceGroupError(f"must hold u*v = {self.u}*{self.v} = {n} ids, got "
                                 f"{len(ids)}", field="image_ids")
    for k, image_id in enumerate(ids):
      if not isinstance(image_id, str) or not image_id:
        raise PreferenceGroupError(f"position {k}: must be a non-empty string, got "
                                   f"{image_id!r}", field="image_ids")
    if len(set(ids)) != n:
      dup = next(x for x in ids if ids.count(x) > 1)
      raise PreferenceGroupError(f"id {dup!r} occurs twice", field="image_ids")
    put("image_ids", ids)
    for name in SCORE_FIELDS:
      put(name, _scores(name, getattr(self, name), n))
    self._check_grid_order()
    if not isinstance(self.meta, Mapping):
      raise PreferenceGroupError(f"must be a dict, got {type(self.meta).__name__}",
                                 field="meta")
    try:  # normalised through JSON so that what is held is exactly what a file gives back
      put("meta", json.loads(json.dumps(dict(self.meta), allow_nan=False)))
    except (TypeError, ValueError) as e:
      raise PreferenceGroupError(f"must be a JSON object of finite values ({e})",
                                 field="meta") from None

  def _check_grid_order(self):
    aesthetic = self.aesthetic_scores.reshape(self.u, self.v)
    rising = np.argwhere(np.diff(aesthetic, axis=1) > 0)
    if len(rising):
      i, j = rising[0]
      raise PreferenceGroupError(
          f"row {i} is not sorted best first: column {j + 1} ({aesthetic[i, j + 1]}) > "
          f"column {j} ({aesthetic[i, j]})", field="aesthetic_scores")
    semantic = self.semantic_scores.reshape(self.u, self.v)
    for i in range(self.u - 1):
      if semantic[i].min() < semantic[i + 1].max():
        raise PreferenceGroupError(
            f"rows must be ordered by semantics: row {i}'s lowest ({semantic[i].min()}) < row "
            f"{i + 1}'s highest ({semantic[i + 1].max()})", field="semantic_scores")

  @property
  def n(self) -> int:
    """Images in the group, u*v."""
    return self.u * self.v

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (the ArrayRecord payload), with the format version."""
    return dict(version=FORMAT_VERSION, query=self.query, rephrased_query=self.rephrased_query,
                image_ids=list(self.image_ids),
                **{name: getattr(self, name).tolist() for name in SCORE_FIELDS},
                u=self.u, v=self.v, stride=self.stride, meta=self.meta)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PreferenceGroup:
    """The inverse of to_dict (the version key may be absent); unknown keys are refused."""
    if not isinstance(d, Mapping):
      raise PreferenceGroupError(f"a record must be a JSON object, got {type(d).__name__}")
    version = d.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
      raise PreferenceGroupError(f"format version {version!r}, this code reads "
                                 f"{FORMAT_VERSION}", field="version")
    unknown = sorted(set(d) - set(_RECORD_KEYS))
    if unknown:
      raise PreferenceGroupError(f"unknown field(s) {unknown}", field=unknown[0])
    missing = [k for k in _RECORD_KEYS if k not in d and k not in ("version", "stride", "meta")]
    if missing:
      raise PreferenceGroupError("missing", field=missing[0])
    return cls(**{k: v for k, v in d.items() if k != "version"})

  def __eq__(self, other) -> bool:
    if not isinstance(other, PreferenceGroup):
      return NotImplemented
    return self.to_dict() == other.to_dict()  # scores as lists of Python floats: exact

  __hash__ = None  # mutable-looking contents; never a dict key


def as_group(group: PreferenceGroup | Mapping[str, Any], *, record: int | None = None,
             origin: str | None = None) -> PreferenceGroup:
  """A PreferenceGroup from a group or a to_dict-style mapping; errors name the record."""
  try:
    return group if isinstance(group, PreferenceGroup) else PreferenceGroup.from_dict(group)
  except PreferenceGroupError as e:
    raise PreferenceGroupError(e.reason, field=e.field, record=record, origin=origin) from None
  except TypeError as e:  # e.g. a mapping with a wrongly typed value the constructor rejects
    raise PreferenceGroupError(str(e), record=record, origin=origin) from None


# ------------------------------------------------------------------------------ files

def _format_of(path: str, *, key: str | None = None) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in EXTENSIONS:
    named = f" (config key {key})" if key else ""
    raise ValueError(f"D_po file {path}{named}: unknown extension {ext!r}; use one of "
                     f"{EXTENSIONS}")
  return ext[1:]


def parquet_schema():
  """The pyarrow schema of a .parquet D_po file (one row per group)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.schema([
      ("query", pa.string()), ("rephrased_query", pa.string()),
      ("image_ids", pa.list_(pa.string())),
      *[(name, pa.list_(pa.float64())) for name in SCORE_FIELDS],
      ("u", pa.int64()), ("v", pa.int64()), ("stride", pa.int64()), ("meta", pa.string()),
  ], metadata={"aesalign.dpo.version": str(FORMAT_VERSION)})


class GroupWriter:
  """Writes groups to a .arrayrecord or .parquet file, atomically.

      with GroupWriter(path) as writer:
        for group in groups:
          writer.write(group)       # a PreferenceGroup or a to_dict-style mapping

  The file appears at `path` only when the `with` block ends without an exception (or on
  close()); an exception inside it, or an invalid record, leaves no file (and any older file
  at `path` unchanged). All records must share the first one's (u, v).
  """

  PARQUET_ROWS_PER_GROUP = 1024  # rows buffered before a Parquet row group is written

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.format = _format_of(self.path)
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    self._tmp = os.path.join(
        directory, f".{os.path.basename(self.path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    self._count = 0
    self._uv: tuple[int, int] | None = None
    self._rows: list[dict[str, Any]] = []
    self._open = True
    if self.format == "arrayrecord":
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      # group_size 1: each record is its own chunk, so reading one decompresses only it.
      self._writer = array_record_module.ArrayRecordWriter(self._tmp, "group_size:1")
    else:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      self._writer = pq.ParquetWriter(self._tmp, parquet_schema())

  def __len__(self) -> int:
    return self._count

  def write(self, group: PreferenceGroup | Mapping[str, Any]) -> None:
    """Validates and appends one group; an invalid one aborts the file and raises, naming it."""
    if not self._open:
      raise RuntimeError(f"GroupWriter for {self.path} is closed")
    record = self._count
    try:
      group = as_group(group, record=record)
      if self._uv is None:
        self._uv = (group.u, group.v)
      elif (group.u, group.v) != self._uv:
        raise PreferenceGroupError(
            f"u={group.u}, v={group.v} differ from record 0's u={self._uv[0]}, "
            f"v={self._uv[1]}; a D_po file holds one grid shape", field="u", record=record)
      payload = group.to_dict()
      if self.format == "arrayrecord":
        self._writer.write(json.dumps(payload, allow_nan=False).encode("utf-8"))
      else:
        payload.pop("version")
        payload["meta"] = json.dumps(payload["meta"], allow_nan=False)
        self._rows.append(payload)
        if len(self._rows) >= self.PARQUET_ROWS_PER_GROUP:
          self._flush_rows()
    except BaseException:
      self.abort()
      raise
    self._count += 1

  def _flush_rows(self):
    if self._rows:
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      self._writer.write_table(pa.Table.from_pylist(self._rows, schema=parquet_schema()))
      self._rows = []

  def close(self) -> str:
    """Finishes the file and moves it to `path` (replacing an older one); returns `path`."""
    if not self._open:
      raise RuntimeError(f"GroupWriter for {self.path} is closed")
    try:
      if self.format == "parquet":
        self._flush_rows()
      self._writer.close()
      with open(self._tmp, "rb") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
      os.replace(self._tmp, self.path)
    except BaseException:
      self.abort()
      raise
    self._open = False
    return self.path

  def abort(self) -> None:
    """Discards everything written; no file appears at `path`. Safe to call twice."""
    if not self._open:
      return
    self._open = False
    try:
      self._writer.close()
    except Exception:  # pylint: disable=broad-except  (the file is being thrown away)
      pass
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> GroupWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_groups(path: str | os.PathLike, groups: Iterable[PreferenceGroup | Mapping]) -> int:
  """Writes all `groups` to `path` atomically (GroupWriter); returns how many."""
  with GroupWriter(path) as writer:
    for group in groups:
      writer.write(group)
  return len(writer)


class PreferenceGroupSource(sources_lib.ReadFailureLog):
  """Random access to the groups of a D_po file: len(), [i] -> PreferenceGroup. Use open_groups.

  Records that cannot be decoded or fail validation were skipped at open (listed in
  `.skipped`, counted in `.stats()`, named in a warning); groups whose images fail to load
  in the pipeline are reported here too. `u`, `v`: the grid shared by every group.
  """

  def __init__(self, path: str, fmt: str, raw: Any, keep: list[int], uv: tuple[int, int],
               skipped: list[sources_lib.SkippedRecord]):
    self.name = self.path = path
    self.format = fmt
    self._raw = raw    # ArrayRecordDataSource (lazy; by record number) or the valid groups
    self._keep = keep  # file record numbers of the valid groups
    self.u, self.v = uv
    super().__init__(skipped)

  def __len__(self) -> int:
    return len(self._keep)

  def __getitem__(self, index: int) -> PreferenceGroup:
    if self.format == "parquet":
      return self._raw[index]
    # Validated when the file was opened, so decoding again cannot fail.
    return PreferenceGroup.from_dict(json.loads(self._raw[self._keep[index]]))

  def record_number(self, index: int) -> int:
    """The file record number of item `index` (they differ after skipped records)."""
    return self._keep[index]

  def __repr__(self) -> str:
    return f"PreferenceGroupSource({self.path!r}, {len(self)} groups, u={self.u}, v={self.v})"


def _read_records(path: str, fmt: str, key: str) -> tuple[Any, Iterable[tuple[int, Any]]]:
  """(raw store, iterator of (record number, decoded dict or the exception decoding it))."""
  if fmt == "arrayrecord":
    try:
      raw = grain.sources.ArrayRecordDataSource([path])
      num = len(raw)
    except Exception as e:  # pylint: disable=broad-except  (array_record raises RuntimeError)
      raise ValueError(f"D_po file {path} (config key {key}) is not a readable ArrayRecord "
                       f"file: {e}") from e

    def decoded():
      for start in range(0, num, 1024):  # batched reads: several times faster than one by one
        chunk = raw.__getitems__(list(range(start, min(num, start + 1024))))
        for r, payload in enumerate(chunk, start):
          try:
            yield r, json.loads(payload.decode("utf-8"))
          except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield r, e
    return raw, decoded()

  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    rows = pq.read_table(path).to_pylist()
  except Exception as e:  # pylint: disable=broad-except  (pyarrow raises several kinds)
    raise ValueError(f"D_po file {path} (config key {key}) is not a readable Parquet file: "
                     f"{e}") from e

  def decoded():
    for r, row in enumerate(rows):
      try:
        meta = row.get("meta")
        row = {**row, "meta": json.loads(meta) if isinstance(meta, str) else meta}
        yield r, row
      except json.JSONDecodeError as e:
        yield r, ValueError(f"field 'meta' is not JSON ({e})")
  return None, decoded()


def open_groups(path: str | os.PathLike, *, expect_uv: tuple[int, int] | int | None = None,
                key: str = DPO_PATH_KEY) -> PreferenceGroupSource:
  """Opens a D_po file (.arrayrecord or .parquet) as a random-access, grain-ready source.

  Every record is decoded and validated once here, so a bad file is refused before any
  compilation. Refuses (ValueError / FileNotFoundError naming `path` and the config `key`):
  a path that does not exist; an unknown extension; an unreadable file; a file with no valid
  record; records whose (u, v) differ from record 0's or from `expect_uv` (a (u, v) pair, or
  an int N compared with u*v), naming the record and `u`, `v`. Records that cannot be decoded
  or fail validation are skipped, counted and named in a warning (corrupt data).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"D_po file {path} does not exist (config key {key}); run the "
                            f"mining stage (--mode=mine) or point {key} at a mined file")
  fmt = _format_of(path, key=key)
  raw, records = _read_records(path, fmt, key)
  groups, keep, skipped = [], [], []
  uv = first = None
  for r, decoded in records:
    if isinstance(decoded, Exception):
      skipped.append(sources_lib.SkippedRecord(f"{path} record {r}", "undecodable_record",
                                               str(decoded)))
      continue
    try:
      group = as_group(decoded)
    except PreferenceGroupError as e:
      skipped.append(sources_lib.SkippedRecord(f"{path} record {r}", "invalid_record", str(e)))
      continue
    if uv is None:
      uv, first = (group.u, group.v), r
      if expect_uv is not None:
        _check_expected_uv(path, key, r, uv, expect_uv)
    elif (group.u, group.v) != uv:
      raise ValueError(f"D_po file {path} (config key {key}) record {r}: u={group.u}, "
                       f"v={group.v} (u*v={group.n}) differ from record {first}'s u={uv[0]}, "
                       f"v={uv[1]}; every group of a file must share one grid")
    keep.append(r)
    if fmt == "parquet":
      groups.append(group)
  sources_lib.warn_skipped(path, skipped, len(keep) + len(skipped))
  if not keep:
    raise ValueError(f"D_po file {path} (config key {key}) holds no valid record "
                     f"({len(skipped)} skipped)")
  return PreferenceGroupSource(path, fmt, groups if fmt == "parquet" else raw, keep, uv, skipped)


def _check_expected_uv(path, key, record, uv, expect_uv):
  u, v = uv
  if isinstance(expect_uv, (int, np.integer)) and not isinstance(expect_uv, bool):
    ok, wanted = u * v == int(expect_uv), f"u*v = {int(expect_uv)}"
  else:
    eu, ev = (int(x) for x in expect_uv)
    ok, wanted = (u, v) == (eu, ev), f"u={eu}, v={ev}"
  if not ok:
    raise ValueError(f"D_po file {path} (config key {key}) record {record}: u={u}, v={v} "
                     f"(u*v={u * v}), but the run expects {wanted}")


# ------------------------------------------------------------------------------ image lookups

class MissingImageError(LookupError):
  """An image of a group cannot be loaded (unknown id, undecodable file). The pipeline drops
  the group and reports it to the groups source; any other exception stops the pipeline."""


class _WorldImageLookup:
  """ids str(global index) -> world.render_batch; a class so that it pickles into workers."""

  def __init__(self, world):
    self.world = world

  def __call__(self, image_ids: list[str]) -> np.ndarray:
    try:
      indices = np.array([int(i) for i in image_ids], np.int64)
    except ValueError as e:
      raise MissingImageError(f"world image ids are global indices: {e}") from None
    bad = indices[(indices < 0) | (indices >= len(self.world))]
    if len(bad):
      raise MissingImageError(f"world image id {bad[0]} out of range [0, {len(self.world)})")
    return self.world.render_batch(indices)


def world_image_lookup(world) -> ImageLookup:
  """The embedded world's images by id (str of the global index), rendered in one batch."""
  return _WorldImageLookup(world)


class _SourceImageLookup:
  """ids -> images of an id-keyed corpus source (records with 'id', 'image', 'valid')."""

  def __init__(self, source, ids: Sequence[str] | None):
    ids = list(pipeline_lib.source_ids(source) if ids is None else ids)
    if len(ids) != len(source):
      raise ValueError(f"source_image_lookup: {len(ids)} ids for {len(source)} records of "
                       f"{source!r}")
    self.source = source
    self.index: dict[str, int] = {}
    for position, image_id in enumerate(ids):
      earlier = self.index.setdefault(str(image_id), position)
      if earlier != position:
        raise ValueError(f"source_image_lookup: id {image_id!r} names records {earlier} and "
                         f"{position} of {source!r}; ids must be unique")

  def __call__(self, image_ids: list[str]) -> np.ndarray:
    positions = []
    for image_id in image_ids:
      if image_id not in self.index:
        raise MissingImageError(f"image id {image_id!r} is not in {self.source!r}")
      positions.append(self.index[image_id])
    getitems = getattr(self.source, "_getitems", None)  # grain's batched-read protocol
    records = getitems(positions) if getitems else [self.source[p] for p in positions]
    for image_id, record in zip(image_ids, records):
      if not record.get(pipeline_lib.VALID_KEY, True):
        raise MissingImageError(f"image {image_id!r}: {record.get(pipeline_lib.ERROR_KEY)}")
    return np.stack([record["image"] for record in records])


def source_image_lookup(source, *, ids: Sequence[str] | None = None) -> ImageLookup:
  """Images by id from a random-access corpus source (sources.py records: 'id', 'image').

  The id -> position dict is built once, from `ids` (aligned with the source's records), else
  from pipeline.source_ids(source): the index of a folder / JSONL / CSV / tfds source, read
  without decoding; another source without `ids` is read once (slow: it decodes the images).
  Unknown ids and records flagged invalid raise MissingImageError (the group is dropped), so
  D_po mined from a corpus (config.data) finds its images in the same corpus at align time.
  """
  return _SourceImageLookup(source, ids)


# ------------------------------------------------------------------------------ the pipeline

class _LoadGroup(grain.transforms.Map):
  """PreferenceGroup -> dict of arrays (images looked up); invalid if an image is missing."""

  def __init__(self, image_lookup: ImageLookup, uv: tuple[int, int]):
    self._lookup = image_lookup
    self._uv = uv

  def map(self, group: PreferenceGroup | Mapping[str, Any]) -> dict[str, Any]:
    group = as_group(group)
    if (group.u, group.v) != self._uv:  # batches stack groups: one grid for all
      raise ValueError(f"group of query {group.query!r} has u={group.u}, v={group.v}; the "
                       f"source's first group has u={self._uv[0]}, v={self._uv[1]}")
    try:
      images = self._lookup(list(group.image_ids))
    except MissingImageError as e:
      return {pipeline_lib.VALID_KEY: False,
              pipeline_lib.ERROR_KEY: f"group of query {group.query!r}: missing_image: {e}"}
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != group.n \
        or images.shape[3] != 3:
      raise ValueError(f"image_lookup returned {images.dtype} {images.shape} for the "
                       f"{group.n} images of query {group.query!r}; expected uint8 "
                       f"[{group.n}, S, S, 3]")
    return {"images": images, "query": group.query,
            **{name: getattr(group, name).astype(np.float32) for name in SCORE_FIELDS}}


class _TokenizeQueries(grain.transforms.Map):
  """Batch 'query' (str [G]) -> 'ids' int32 [G, L], 'eos_index' int32 [G]; drops the text."""

  def __init__(self, tokenize: Callable[[list[str]], Mapping[str, np.ndarray]]):
    self._tokenize = tokenize

  def map(self, batch: dict[str, Any]) -> dict[str, Any]:
    tokens = self._tokenize([str(q) for q in batch["query"]])
    if not isinstance(tokens, Mapping) or not {"ids", "eos_index"} <= set(tokens):
      raise TypeError("tokenize must return dict(ids=[G, L], eos_index=[G]) like "
                      f"ClipTokenizer, got {type(tokens).__name__}")
    out = {k: v for k, v in batch.items() if k != "query"}
    out["ids"] = np.asarray(tokens["ids"], np.int32)
    out["eos_index"] = np.asarray(tokens["eos_index"], np.int32)
    return out


def make_preference_pipeline(
    groups_source: Any,
    image_lookup: ImageLookup,
    tokenize: Callable[[list[str]], Mapping[str, np.ndarray]],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 4,
    read_threads: int = 4,
    read_buffer_size: int = 16,
    prefetch_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
  """A grain IterDataset of preference batches (module docstring) from a source of groups.

  Args:
    groups_source: random access to PreferenceGroups of one (u, v) grid: open_groups(...)
      or a list. Groups whose images cannot be loaded (MissingImageError) are dropped and
      reported to `groups_source.record_read_failure` when it has one.
    image_lookup: N image ids -> uint8 [N, S, S, 3] (world_image_lookup, source_image_lookup
      or the caller's own; it must pickle when worker_count > 0).
    tokenize: query texts -> dict(ids=[G, L], eos_index=[G]) (a ClipTokenizer).
    batch_size: groups per batch, per process.
    Everything else: as input_pipeline.pipeline.make_pipeline, which builds the chain
      (shard, shuffle, repeat, load images, filter, batch); its iterator's get_state() /
      set_state() checkpoint the position exactly.
  """
  if len(groups_source) == 0:
    raise ValueError(f"make_preference_pipeline: {groups_source!r} holds no group")
  if hasattr(groups_source, "u") and hasattr(groups_source, "v"):
    uv = (groups_source.u, groups_source.v)
  else:
    first = as_group(groups_source[0])
    uv = (first.u, first.v)
  ds = pipeline_lib.make_pipeline(
      groups_source, batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      transforms=[_LoadGroup(image_lookup, uv)], worker_count=worker_count,
      worker_buffer_size=worker_buffer_size, read_threads=read_threads,
      read_buffer_size=read_buffer_size, prefetch_buffer_size=0, shard_index=shard_index,
      shard_count=shard_count, drop_remainder=drop_remainder)
  ds = ds.map(_TokenizeQueries(tokenize))
  if prefetch_buffer_size > 0:
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_buffer_size)
  return ds

