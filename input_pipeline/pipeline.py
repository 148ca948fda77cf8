"""grain pipelines: shard, shuffle, repeat, load, drop bad records, batch, prefetch.

    ds = make_pipeline(source, batch_size=128, seed=0)
    it = iter(ds)                  # a grain.DatasetIterator
    batch = next(it)               # {'image': uint8 [B,S,S,3], 'caption': str [B], 'id': ...}

The chain, in order:
  MapDataset.source(source)
  [shard_index::shard_count]     each process reads its own disjoint slice (strided, so the
                                 shards cover the source and differ in size by at most one)
  .shuffle(seed)                 a global shuffle of the shard, deterministic in the seed
  .repeat(num_epochs)            None = forever; each epoch is shuffled differently
  (a never-ending stream on several processes instead shuffles the whole source and gives
  each process its block of every global batch: the batches of a step are the same on any
  number of processes, see _ProcessBlocks)
  .map(t) for t in transforms    element transforms (e.g. augmentation)
  .to_iter_dataset(ReadOptions)  `read_threads` threads read/decode records in order
  .mp_prefetch(...)              if worker_count > 0: that much runs in worker processes
  .filter(...)                   drops records a source flagged valid=False, reporting each
                                 to source.record_read_failure (count + warning); it runs
                                 in the main process so the counts reach source.stats()
  .batch(batch_size)             dict of numpy arrays; strings become numpy str arrays
  .map(normalize), .map(tokenize)  optional, on whole batches
  ThreadPrefetchIterDataset      `prefetch_buffer_size` batches ready ahead in a thread

Batching runs in the main process, after the filter, so that a batch is always full of
valid records; workers ship single records (fine for image decoding, whose cost dwarfs
the transfer).

Checkpointing the position: `it.get_state()` returns a JSON-serialisable dict and
`it.set_state(state)` restores it, on an iterator of a pipeline built with the same
arguments (the same worker_count included); the restored iterator yields exactly what the
uninterrupted one would have. With orbax, save the iterator as one item of a
CheckpointManager step with grain's handler:

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # restores `it` in place

grain writes one JSON file per process (process_<i>-of-<n>.json).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags
from grain.experimental import ThreadPrefetchIterDataset

from input_pipeline import images as images_lib
from input_pipeline import sources as sources_lib

log = logging.getLogger(__name__)

# Keys sources use to flag bad records; the pipeline consumes and removes them.
VALID_KEY = "valid"
ERROR_KEY = "error"
TOKENS_KEY = "tokens"

Tokenizer = Callable[[list[str]], Any]  # captions -> int token ids [B, L]


def default_config() -> ml_collections.ConfigDict:
  """Defaults of a data section: which source, and how fast it is read. What a use reads
  (batch size, seed, epochs, shuffling) is that use's own setting (e.g. pretrain.batch_size)."""
  c = ml_collections.ConfigDict()
  c.source = "jsonl"            # 'world' (the embedded world: config.world) | 'folder' |
                                # 'jsonl' | 'csv' | 'tfds'
  c.path = ""                   # folder, .jsonl or .csv file (folder/jsonl/csv)
  c.root = ""                   # corpus root for jsonl/csv image paths; '' = the file's folder
  c.image_size = 224            # S: records are uint8 [S, S, 3] (short side resize + crop)
  c.max_pixels = images_lib.DEFAULT_MAX_PIXELS  # larger images are skipped, undecoded
  c.tfds_name = ""              # tfds dataset name, e.g. 'cifar10' (prepared as ArrayRecord)
  c.tfds_split = "train"        # tfds split string
  c.tfds_data_dir = ""          # tfds data_dir; '' = tfds default (~/tensorflow_datasets)
  c.caption_key = ""            # tfds text feature for captions; '' = from the label
  c.label_key = "label"         # tfds ClassLabel feature that names the class
  c.caption_template = "a photo of a {}."  # caption from the class name
  c.worker_count = 0            # grain worker processes (0 = decode in this process)
  c.worker_buffer_size = 16     # records each worker keeps ready
  c.read_threads = 8            # threads reading/decoding records in each process
  c.read_buffer_size = 64       # records read ahead per process
  c.prefetch_buffer_size = 2    # batches prepared ahead in a background thread
  return c


def make_source(config: ml_collections.ConfigDict,
                world: ml_collections.ConfigDict | None = None):
  """The random-access record source the data config section names: the embedded world's
  training split (source 'world'; `world` is the config's world section), or a folder /
  JSONL / CSV / tfds source. Stages read it as a corpus (input_pipeline.corpus)."""
  kind = config.source
  if kind == "world":
    from input_pipeline import world as world_lib  # pylint: disable=g-import-not-at-top
    if world is None:
      raise ValueError("config.data.source='world' needs the config's `world` section")
    return world_lib.World(world).split("train")
  common = dict(image_size=config.image_size)
  if kind in ("folder", "jsonl", "csv"):
    if not config.path:
      raise ValueError(f"config.source={kind!r} needs config.path")
    if kind == "folder":
      return sources_lib.FolderSource(config.path, max_pixels=config.max_pixels, **common)
    cls = sources_lib.JsonlSource if kind == "jsonl" else sources_lib.CsvSource
    return cls(config.path, root=config.root or None, max_pixels=config.max_pixels, **common)
  if kind == "tfds":
    if not config.tfds_name:
      raise ValueError("config.source='tfds' needs config.tfds_name")
    return sources_lib.TfdsSource(
        config.tfds_name, split=config.tfds_split, data_dir=config.tfds_data_dir or None,
        caption_key=config.caption_key or None, label_key=config.label_key or None,
        caption_template=config.caption_template, **common)
  raise ValueError(f"config.source={kind!r}: expected 'world', 'folder', 'jsonl', 'csv' or "
                   "'tfds'")


def pipeline_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """make_pipeline's reading keyword arguments (workers, threads, buffers) from a data section.

  Usage: make_pipeline(make_source(config), batch_size=..., seed=...,
  **pipeline_kwargs(config)). What the use decides (batch size, seed, epochs, shuffling,
  normalisation, the tokenizer, transforms) is passed beside them.
  """
  return dict(worker_count=config.worker_count, worker_buffer_size=config.worker_buffer_size,
              read_threads=config.read_threads, read_buffer_size=config.read_buffer_size,
              prefetch_buffer_size=config.prefetch_buffer_size)


def _absl_flags_usable() -> None:
  """grain reads its options from absl flags when it starts worker processes; a library
  caller that never ran absl's app.run (a plain script, a notebook) would get
  UnparsedFlagAccessError there, so the flags' defaults are taken as parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _DropInvalid(grain.transforms.Filter):
  """Keeps records not flagged invalid; reports the others to the source."""

  def __init__(self, source: Any):
    self._report = getattr(source, "record_read_failure", None)

  def filter(self, element: dict[str, Any]) -> bool:
    if element.get(VALID_KEY, True):
      return True
    if self._report is not None:
      self._report(str(element.get(ERROR_KEY, "unnamed record")))
    return False


def _strip_flags(element: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in element.items() if k not in (VALID_KEY, ERROR_KEY)}


def _normalize_batch(batch: dict[str, Any]) -> dict[str, Any]:
  return {**batch, "image": images_lib.normalize(batch["image"])}


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenize: Tokenizer):
    self._tokenize = tokenize

  def map(self, batch: dict[str, Any]) -> dict[str, Any]:
    tokens = self._tokenize([str(c) for c in batch["caption"]])
    if isinstance(tokens, dict):   # e.g. ClipTokenizer: {'ids': [B, L], 'eos_index': [B]}
      return {**batch, **{k: np.asarray(v) for k, v in tokens.items()}}
    return {**batch, TOKENS_KEY: np.asarray(tokens)}


class _ProcessBlocks(grain.MapDataset):
  """Process `index` of `count`'s records of a never-ending stream: record i is record
  (i // block) * block * count + index * block + i % block of the parent, so batch j of every
  process together (in process order) is the one-process run's batch j of block * count
  records. Each process reads only its own records; the data of a training step does not
  depend on the number of processes (a strided shard of the source would: each process would
  shuffle its own shard)."""

  def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count

  def __len__(self) -> int:
    return len(self._parent) // (self._block * self._count) * self._block

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    step, offset = divmod(i, self._block)
    return self._parent[(step * self._count + self._index) * self._block + offset]

  def __str__(self) -> str:
    return f"ProcessBlocks(block={self._block}, index={self._index}, count={self._count})"


def make_pipeline(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    transforms: Sequence[Callable[[dict[str, Any]], dict[str, Any]]] = (),
    normalize: bool = False,
    tokenize: Tokenizer | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 16,
    read_threads: int = 8,
    read_buffer_size: int = 64,
    prefetch_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
  """A grain IterDataset of batches (dicts of numpy arrays) from a random-access source.

  Args:
    source: anything with __len__ and __getitem__ returning dicts (sources.py, the world).
      Records flagged valid=False are dropped and reported (see the module docstring).
    batch_size: records per batch, per process.
    seed: shuffle seed, 0 <= seed < 2**32.
    shuffle: shuffle each epoch (False: source order within the shard).
    num_epochs: passes over the shard; None repeats forever.
    transforms: element transforms (record dict -> record dict), applied in order before
      batching (in the worker processes when worker_count > 0; must then pickle).
    normalize: replace 'image' by CLIP-normalised float32 (images.normalize).
    tokenize: captions (list of str) -> int token ids [B, L], stored under 'tokens', or a
      dict of arrays (ClipTokenizer's ids and eos_index) merged into the batch.
    worker_count: grain worker processes for reading/decoding; 0 = this process.
    worker_buffer_size: records each worker keeps ready.
    read_threads, read_buffer_size: threads and read-ahead per process (grain ReadOptions).
    prefetch_buffer_size: batches prepared ahead in a background thread (0: none).
    shard_index, shard_count: this process's shard; default jax.process_index() and
      jax.process_count(), so each process of a multi-host job reads a disjoint slice.
    drop_remainder: drop a last partial batch (only matters with a finite num_epochs).

  Returns:
    A grain.IterDataset; iter() of it is a checkpointable grain.DatasetIterator.
  """
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only needed for the defaults)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if len(source) < shard_count:
    raise ValueError(f"source {source!r} has {len(source)} records, fewer than the "
                     f"{shard_count} shards")

  ds = grain.MapDataset.source(source)
  if num_epochs is None and shard_count > 1:   # a training stream: P-independent batches
    ds = ds.shuffle(seed=seed) if shuffle else ds
    ds = _ProcessBlocks(ds.repeat(None), batch_size, shard_index, shard_count)
  else:
    ds = ds[shard_index::shard_count]
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
  for transform in transforms:
    ds = ds.map(transform)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    _absl_flags_usable()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  ds = ds.filter(_DropInvalid(source)).map(_strip_flags)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if normalize:
    ds = ds.map(_normalize_batch)
  if tokenize is not None:
    ds = ds.map(_Tokenize(tokenize))
  if prefetch_buffer_size > 0:
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_buffer_size)
  return ds


def make_batched_source_pipeline(
    index_range: tuple[int, int],
    load_batch: Callable[[np.ndarray], dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    tokenize: Tokenizer | None = None,
    worker_count: int = 0,
    prefetch_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
  """Like make_pipeline, for sources that load a whole batch at once (the embedded world).

  Indices are sharded, shuffled and batched first, then `load_batch(indices)` renders the batch
  in one vectorised pass: grain fetches a batch of a record source one record at a time,
  several times slower for a procedural source. Records are never invalid here, so nothing is
  filtered; the iterator is checkpointable like make_pipeline's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  ds = grain.MapDataset.range(*index_range)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Batches of the global stream (every process's share after the other), this process's
  # block of each: the data of a step does not depend on the number of processes.
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)[shard_index::shard_count]
  ds = ds.map(lambda idx: load_batch(np.asarray(idx)))
  if tokenize is not None:
    ds = ds.map(_Tokenize(tokenize))
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    _absl_flags_usable()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  if prefetch_buffer_size > 0:
    it_ds = ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch_buffer_size)
  return it_ds


# ------------------------------------------------------------------------------ corpus access
# The mining stage and the D_po image lookup read a corpus source by record (not as a
# shuffled stream): ids without decoding, and images of given records, decoded in threads.

def source_ids(source: Any) -> list[str]:
  """The record ids of a corpus source, in record order, read without decoding any image.

  `source.ids` if the source has it (a folder / JSONL / CSV source: from its index); "name:i"
  for a tfds source without an id feature (TfdsSource's default id). Any other source is read
  record by record (every image decoded once), with a warning.
  """
  ids = getattr(source, "ids", None)
  if ids is not None:
    return [str(i) for i in ids]
  if isinstance(source, sources_lib.TfdsSource) and source.id_key is None:
    return [f"{source.name}:{i}" for i in range(len(source))]
  log.warning("%r has no `ids`: reading every record once to index them (this "
              "decodes every image)", source)
  return [str(source[i]["id"]) for i in range(len(source))]


class RecordImages:
  """Images of a corpus source's records by position, decoded by a pool of threads.

      images, valid = RecordImages(source)(positions)   # uint8 [n, S, S, 3], bool [n]

  A record the source flags invalid (an undecodable or oversized image) comes back black with
  valid False, and is reported once to `source.record_read_failure` (counted in
  source.stats()) and to `on_invalid(position, error)` if given.
  """

  def __init__(self, source: Any, *, threads: int = 8,
               on_invalid: Callable[[int, str], None] | None = None):
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    self.source = source
    self._on_invalid = on_invalid
    self._report = getattr(source, "record_read_failure", None)
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads),
                                                       thread_name_prefix="record_images")

  def __call__(self, positions) -> tuple[np.ndarray, np.ndarray]:
    positions = [int(p) for p in np.asarray(positions).reshape(-1)]
    records = list(self._pool.map(self.source.__getitem__, positions))
    valid = np.array([bool(r.get(VALID_KEY, True)) for r in records], bool)
    for position, record, ok in zip(positions, records, valid):
      if not ok:
        error = str(record.get(ERROR_KEY, f"record {position}"))
        if self._report is not None:
          self._report(error)
        if self._on_invalid is not None:
          self._on_invalid(position, error)
    if not records:
      return np.zeros((0, 0, 0, 3), np.uint8), valid
    return np.stack([np.asarray(r["image"], np.uint8) for r in records]), valid

  def close(self) -> None:
    self._pool.shutdown(wait=False)
