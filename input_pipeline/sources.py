"""Random-access image-caption sources for grain: folders, JSON Lines, CSV and tfds.

Every source has `__len__` and `__getitem__(i)`, so `grain.MapDataset.source(src)` takes it,
and returns records

    {'image': uint8 [S, S, 3], 'caption': str, 'id': str,
     'valid': bool, 'error': str}          # (+ 'label': int for TfdsSource)

Where bad data is caught
- At index time (the constructor): everything visible without decoding pixels. A malformed
  JSON line or CSV row, a missing field, an empty or non-UTF-8 caption, a path that escapes
  the corpus root (`../..`, an absolute path elsewhere, a symlink pointing out), a missing
  file. Such records are left out of the index, so `len(source)` counts only usable ones;
  each is listed in `source.skipped` (origin "file:line" or the image path, kind, detail)
  and named in one warning per source.
- At read time (`__getitem__`): pixel problems (truncated or corrupt data, a zero-byte or
  non-image file, an image over `max_pixels`). Decoding lazily keeps indexing cheap, so the
  source returns the record with `valid=False`, a black image and `error` naming the file
  and the reason, instead of raising inside a grain worker. `pipeline.make_pipeline`
  filters such records out and reports each to `source.record_read_failure`, which counts
  it once (a record failing every epoch counts once) and names it in a warning.
`source.stats()` gives the counts of both kinds.

Corpus root: paths in a JSONL/CSV file are relative to `root` (default: the folder that
holds the file); absolute paths are allowed only inside the root.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from input_pipeline import images as images_lib

log = logging.getLogger(__name__)

# Images a FolderSource indexes (matched case-insensitively); other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"

# How many bad records one warning names; all of them are in `source.skipped`.
MAX_NAMED_IN_WARNING = 20


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
  """A record left out: where it is, what kind of problem, and the details."""
  origin: str  # "captions.jsonl:17", "data.csv:4" or an image path
  kind: str    # e.g. 'malformed_json', 'path_escapes_root', 'undecodable_image'
  detail: str


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: str     # real path, inside the root
  caption: str
  id: str
  origin: str


class _Skip(Exception):
  """Internal: this record is unusable for reason `kind`."""

  def __init__(self, kind: str, detail: str):
    super().__init__(detail)
    self.kind = kind
    self.detail = detail


def _clean_caption(caption: Any) -> str:
  if not isinstance(caption, str):
    raise _Skip("missing_field", f"caption is not a string: {caption!r:.60}")
  try:
    # Files are read with errors='surrogateescape': invalid UTF-8 bytes become lone
    # surrogates, which cannot be encoded back. A JSON "\udcxx" escape lands here too.
    caption.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _Skip("non_utf8_caption", "caption is not valid UTF-8") from e
  caption = caption.strip()
  if not caption:
    raise _Skip("empty_caption", "caption is empty")
  return caption


def _resolve_under_root(root: str, rel_path: Any) -> str:
  """Real path of `rel_path` under `root` (itself a real path), or _Skip."""
  if not isinstance(rel_path, str) or not rel_path or "\x00" in rel_path:
    raise _Skip("missing_field", f"image path is not a non-empty string: {rel_path!r:.60}")
  # os.path.join keeps an absolute rel_path; realpath resolves '..' and symlinks.
  path = os.path.realpath(os.path.join(root, rel_path))
  if os.path.commonpath([root, path]) != root:
    raise _Skip("path_escapes_root", f"{rel_path} resolves to {path}, outside root {root}")
  if not os.path.isfile(path):
    raise _Skip("missing_file", f"{rel_path}: no such file")
  return path


def warn_skipped(source_name: str, skipped: Sequence[SkippedRecord], total: int):
  """Logs one warning counting the records skipped of `total`, by kind, naming the first."""
  if not skipped:
    return
  kinds = collections.Counter(s.kind for s in skipped)
  named = "\n".join(f"  {s.origin}: {s.kind}: {s.detail}"
                    for s in skipped[:MAX_NAMED_IN_WARNING])
  more = len(skipped) - MAX_NAMED_IN_WARNING
  tail = f"\n  ... and {more} more (see .skipped)" if more > 0 else ""
  log.warning("%s: skipped %d of %d records (%s):\n%s%s", source_name, len(skipped), total,
              ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), named, tail)


class ReadFailureLog:
  """Counts and names records that failed at read time (reported by the pipeline); a base
  class of sources: call its __init__ with the records skipped at index time."""

  name: str

  def __init__(self, index_skipped: Sequence[SkippedRecord] = ()):
    self._index_skipped = list(index_skipped)
    self._read_failures: dict[str, SkippedRecord] = {}
    self._lock = threading.Lock()

  def record_read_failure(self, error: str) -> None:
    """Counts a record flagged invalid, given its 'error' ("origin: kind: detail").

    Called by the pipeline's filter in the main process. A record failing in every epoch
    is counted and named once.
    """
    with self._lock:
      if error in self._read_failures:
        return
      origin, kind, detail = (error.split(": ", 2) + ["", ""])[:3]
      self._read_failures[error] = SkippedRecord(origin, kind, detail)
      count = len(self._read_failures)
    if count <= MAX_NAMED_IN_WARNING:
      log.warning("%s: skipped a record at read time: %s", self.name, error)
    elif count == MAX_NAMED_IN_WARNING + 1:
      log.warning("%s: more records failed at read time; further ones are counted in "
                  "stats() without a warning", self.name)

  @property
  def skipped(self) -> list[SkippedRecord]:
    """Every record left out so far: at index time, then those that failed at read time."""
    with self._lock:
      return self._index_skipped + list(self._read_failures.values())

  def stats(self) -> dict[str, Any]:
    """Counts: usable records indexed, records skipped at index / read time, per kind."""
    skipped = self.skipped
    return {
        "records": len(self),
        "skipped_at_index": len(self._index_skipped),
        "skipped_at_read": len(skipped) - len(self._index_skipped),
        "skipped_by_kind": dict(collections.Counter(s.kind for s in skipped)),
    }

  def __getstate__(self):
    # grain pickles the source into worker processes; a lock does not pickle, and the
    # workers never count failures (the pipeline does that in the main process).
    state = self.__dict__.copy()
    del state["_lock"]
    state["_read_failures"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class _PathCaptionSource(ReadFailureLog):
  """Shared machinery of the (image path, caption) sources; see the module docstring."""

  def __init__(self, name: str, entries: list[_Entry], skipped: list[SkippedRecord], *,
               root: str, image_size: int, max_pixels: int | None):
    self.name = name
    self.root = root   # real path; every entry's image is inside it
    self.image_size = image_size
    self.max_pixels = max_pixels
    self._entries = entries
    super().__init__(skipped)
    warn_skipped(name, skipped, len(entries) + len(skipped))

  def __len__(self) -> int:
    return len(self._entries)

  @property
  def ids(self) -> list[str]:
    """The records' ids in record order, from the index (no image is decoded)."""
    return [entry.id for entry in self._entries]

  @property
  def captions(self) -> list[str]:
    """The records' captions in record order, from the index (no image is decoded)."""
    return [entry.caption for entry in self._entries]

  @property
  def origins(self) -> list[str]:
    """Where each record is written ("file:line", or the image path), in record order."""
    return [entry.origin for entry in self._entries]

  def image_file(self, index: int) -> str:
    """The real path of record `index`'s image file (inside `root` when indexed)."""
    return self._entries[index].path

  def __getitem__(self, index: int) -> dict[str, Any]:
    entry = self._entries[index]
    record = {"image": None, "caption": entry.caption, "id": entry.id,
              "valid": True, "error": ""}
    try:
      record["image"] = images_lib.load_image(
          entry.path, self.image_size, max_pixels=self.max_pixels)
    except images_lib.ImageDecodeError as e:
      # Flag, do not raise: raising would stop the grain pipeline (see module docstring).
      record["image"] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      record["valid"] = False
      record["error"] = f"{entry.origin}: undecodable_image: {e.reason} ({entry.path})"
    return record

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {len(self)} records)"


class JsonlSource(_PathCaptionSource):
  """(image, caption) records from a JSON Lines file.

  Each non-blank line is an object {"image": "rel/path.jpg", "caption": "...", "id": "..."}
  ("id" optional, default: the image path as written; key names configurable). Image paths
  are relative to `root` (default: the file's folder). Origins are "file:line".
  """

  def __init__(self, path: str | os.PathLike, *, root: str | os.PathLike | None = None,
               image_size: int = 224, max_pixels: int | None = images_lib.DEFAULT_MAX_PIXELS,
               image_key: str = "image", caption_key: str = "caption", id_key: str = "id"):
    path = os.fspath(path)
    root = os.path.realpath(root if root is not None else os.path.dirname(os.path.abspath(path)))
    entries, skipped = [], []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        origin = f"{path}:{line_number}"
        try:
          try:
            obj = json.loads(line)
          except json.JSONDecodeError as e:
            raise _Skip("malformed_json", str(e)) from e
          if not isinstance(obj, dict):
            raise _Skip("malformed_json", "line is not a JSON object")
          if image_key not in obj or caption_key not in obj:
            raise _Skip("missing_field", f"needs keys {image_key!r} and {caption_key!r}")
          caption = _clean_caption(obj[caption_key])
          real = _resolve_under_root(root, obj[image_key])
          record_id = obj.get(id_key, obj[image_key])
          entries.append(_Entry(real, caption, str(record_id), origin))
        except _Skip as s:
          skipped.append(SkippedRecord(origin, s.kind, s.detail))
    super().__init__(path, entries, skipped, root=root, image_size=image_size,
                     max_pixels=max_pixels)


class CsvSource(_PathCaptionSource):
  """(image, caption) records from a CSV file with a header row naming the columns.

  Required columns `image_key` and `caption_key` (default "image", "caption"); an `id_key`
  column is optional (default id: the image path). Paths are relative to `root` (default:
  the file's folder). Origins are "file:line", the physical line where the row starts (a
  quoted field may span lines). Parsing is strict: a quote that is never closed (which would
  swallow every later row into one field) or text after a closing quote is a malformed row.
  """

  def __init__(self, path: str | os.PathLike, *, root: str | os.PathLike | None = None,
               image_size: int = 224, max_pixels: int | None = images_lib.DEFAULT_MAX_PIXELS,
               image_key: str = "image", caption_key: str = "caption", id_key: str = "id"):
    path = os.fspath(path)
    root = os.path.realpath(root if root is not None else os.path.dirname(os.path.abspath(path)))
    entries, skipped = [], []
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
      lines = _RowLines(f)
      reader = csv.DictReader(lines, strict=True)
      columns = reader.fieldnames or []
      if image_key not in columns or caption_key not in columns:
        raise ValueError(f"{path}: the CSV header must name columns {image_key!r} and "
                         f"{caption_key!r}; it has {columns}")
      while True:
        lines.start_row()
        try:
          row = next(reader)
        except StopIteration:
          break
        except csv.Error as e:
          first = lines.row_start or lines.number
          where = f" (the row runs to line {lines.number})" if lines.number > first else ""
          skipped.append(SkippedRecord(f"{path}:{first}", "malformed_csv", f"{e}{where}"))
          continue
        origin = f"{path}:{lines.row_start}"
        try:
          if row.get(image_key) is None or row.get(caption_key) is None:
            raise _Skip("missing_field", f"row lacks {image_key!r} or {caption_key!r}")
          caption = _clean_caption(row[caption_key])
          real = _resolve_under_root(root, row[image_key])
          record_id = row.get(id_key) or row[image_key]
          entries.append(_Entry(real, caption, record_id, origin))
        except _Skip as s:
          skipped.append(SkippedRecord(origin, s.kind, s.detail))
    super().__init__(path, entries, skipped, root=root, image_size=image_size,
                     max_pixels=max_pixels)


class _RowLines:
  """A CSV file's lines, numbered, noting the line where the current row starts: csv's
  line_num is the line where a row ends (or where a parse error was found), which for a row
  spanning lines is not the line a reader of the file should be sent to."""

  def __init__(self, f):
    self._f = f
    self.number = 0
    self.row_start: int | None = None

  def start_row(self) -> None:
    self.row_start = None

  def __iter__(self):
    return self

  def __next__(self) -> str:
    line = next(self._f)
    self.number += 1
    # csv yields no row for a blank line (DictReader skips it): a row starts at a line
    # with text.
    if self.row_start is None and line.strip("\r\n"):
      self.row_start = self.number
    return line


class FolderSource(_PathCaptionSource):
  """(image, caption) records from a folder tree with sidecar caption files.

  Convention: every image `a/b/x.jpg` (extensions IMAGE_EXTENSIONS, any case) has its
  caption in `a/b/x.txt` next to it (UTF-8, whitespace stripped). The id is the image's
  path relative to the root ("a/b/x.jpg"). Images without a caption file, and symlinks
  (image or caption) that point outside the root, are skipped. Symlinked folders are not
  followed. Records are in sorted path order, so indices are stable.
  """

  def __init__(self, root: str | os.PathLike, *, image_size: int = 224,
               max_pixels: int | None = images_lib.DEFAULT_MAX_PIXELS):
    root = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root):
      raise ValueError(f"FolderSource root {root} is not a folder")
    entries, skipped = [], []
    for rel in _image_files(root):
      try:
        real = _resolve_under_root(root, rel)
        caption_rel = os.path.splitext(rel)[0] + CAPTION_SUFFIX
        try:
          caption_path = _resolve_under_root(root, caption_rel)
        except _Skip as s:
          if s.kind == "missing_file":
            raise _Skip("missing_caption_file", f"no caption file {caption_rel}") from s
          raise
        with open(caption_path, "rb") as f:
          raw = f.read()
        try:
          caption = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
          raise _Skip("non_utf8_caption", f"{caption_rel} is not valid UTF-8 ({e})") from e
        entries.append(_Entry(real, _clean_caption(caption), rel, rel))
      except _Skip as s:
        skipped.append(SkippedRecord(rel, s.kind, s.detail))
    super().__init__(root, entries, skipped, root=root, image_size=image_size,
                     max_pixels=max_pixels)


def _image_files(root: str) -> Iterable[str]:
  """Image paths under root, relative, '/'-separated, sorted; symlinked dirs not followed."""
  found = []
  for directory, subdirs, files in os.walk(root, followlinks=False):
    subdirs.sort()
    for name in files:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        rel = os.path.relpath(os.path.join(directory, name), root)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def _nested_get(example: dict[str, Any], key: str) -> Any:
  """example['a/b'] -> example['a']['b'] (tfds nests features, e.g. 'captions/text')."""
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


class TfdsSource(ReadFailureLog):
  """A tfds image dataset read through `tfds.data_source` (ArrayRecord; no TensorFlow).

  The dataset must already be prepared in `data_dir` in the array_record file format
  (`tfds build --file_format=array_record`); nothing is downloaded. Each example becomes
  {'image': uint8 [S, S, 3], 'caption', 'id', 'label', 'valid', 'error'}:
  - image: `image_key` feature, converted to RGB (gray repeated, alpha over white, uint16
    scaled), then resized and centre-cropped to `image_size`;
  - caption: the `caption_key` text feature ('a/b' reaches nested features; if it holds
    several texts the first is used), or, without one, `caption_template` filled with the
    class name of the `label_key` ClassLabel ("a photo of a {}.");
  - id: the `id_key` feature if given, else "name:split:index";
  - label: the `label_key` integer, or -1 without one.
  Examples whose caption is empty or not UTF-8 come back with valid=False.
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None,
               image_size: int = 224, image_key: str = "image",
               caption_key: str | None = None, label_key: str | None = "label",
               caption_template: str = "a photo of a {}.", id_key: str | None = None,
               builder_kwargs: dict[str, Any] | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = f"{name}:{split}"
    self.image_size = image_size
    self.image_key = image_key
    self.caption_key = caption_key
    self.label_key = label_key
    self.caption_template = caption_template
    self.id_key = id_key
    self._data = tfds.data_source(name, split=split, data_dir=data_dir,
                                  builder_kwargs=builder_kwargs)
    self._label_names = None
    if caption_key is None:
      if label_key is None:
        raise ValueError(f"TfdsSource({name}): give caption_key or label_key")
      self._label_names = self.class_names()
    super().__init__()

  def class_names(self) -> list[str]:
    """The class names of the `label_key` ClassLabel feature (the builder's info), by label."""
    if self.label_key is None:
      raise ValueError(f"TfdsSource({self.name}): no label_key, so no class names")
    return list(self._data.dataset_info.features[self.label_key].names)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._data[index]
    image = images_lib.to_rgb_uint8(_nested_get(example, self.image_key))
    image = images_lib.resize_and_center_crop(image, self.image_size)
    label = int(_nested_get(example, self.label_key)) if self.label_key else -1
    record_id = (_as_text(_nested_get(example, self.id_key)) if self.id_key
                 else f"{self.name}:{index}")
    record = {"image": image, "caption": "", "id": record_id, "label": label,
              "valid": True, "error": ""}
    try:
      if self.caption_key is None:
        record["caption"] = self.caption_template.format(self._label_names[label])
      else:
        caption = _nested_get(example, self.caption_key)
        if not isinstance(caption, (str, bytes)):
          if np.ndim(caption) == 0:
            caption = np.asarray(caption).item()
          elif len(caption) == 0:
            raise _Skip("empty_caption", f"no text in {self.caption_key!r}")
          else:
            caption = caption[0]  # several captions per image: the first
        try:
          caption = _as_text(caption)
        except UnicodeDecodeError as e:
          raise _Skip("non_utf8_caption", "caption is not valid UTF-8") from e
        record["caption"] = _clean_caption(caption)
    except _Skip as s:
      record["valid"] = False
      record["error"] = f"{self.name}:{index}: {s.kind}: {s.detail}"
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} records)"


def _as_text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)
