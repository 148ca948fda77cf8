"""A corpus: the images a run trains on, mines, searches and evaluates, addressed by row.

One interface for every kind of data (DESIGN.md's data flow): the embedded world is one
corpus, a folder / JSON Lines / CSV / tfds source (config.data) another. Stages and evaluators
take a Corpus and never ask which kind it is; what only a world with known answers can measure
comes from the optional ground truth (`corpus.truth`).

    corpus = open_corpus(config.data, world=config.get('world'))   # the training corpus
    len(corpus), corpus.ids                 # [N] record ids (D_po names images by str(id))
    images, valid = corpus.images(rows)     # uint8 [n, S, S, 3], bool [n] (False: undecodable)
    corpus.captions(rows)                   # list[str]
    corpus.truth                            # None, or GroundTruth (aesthetic, relevance)
    corpus.held_out                         # a corpus of held-out images, or None
    corpus.pairs_pipeline(tok, batch_size=..., seed=..., data=config.data)
    corpus.image_lookup()                   # ids -> images (the D_po pipeline)
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Optional, Protocol

import numpy as np
from absl import logging

from input_pipeline import pipeline, preference
from input_pipeline import world as world_lib
from input_pipeline import world_text


class GroundTruth(Protocol):
  """What a corpus with known answers adds (the embedded world): by corpus row."""

  def aesthetic(self, rows) -> np.ndarray: ...              # float [n] in [0, 1]
  def relevant(self, query: str, rows) -> np.ndarray: ...   # bool [n]


class WorldTruth:
  """The world's ground truth for corpus rows whose images are the world indices `index`.
  `world` is the simulator itself, for measurements that need more than scores (simulated
  rating studies, an HPIR benchmark drawn from its pool, the ground-truth judge)."""

  def __init__(self, world: world_lib.World, index: np.ndarray):
    self.world, self.index = world, np.asarray(index, np.int64)

  def aesthetic(self, rows) -> np.ndarray:
    return self.world.aesthetic(self.index[np.asarray(rows)])

  def relevant(self, query: str, rows) -> np.ndarray:
    """KeyError for a query that is neither one of the world's nor names one object."""
    known = self._queries.get(query) or world_text.parse_query(query)
    if known is None:
      raise KeyError(query)
    return np.asarray(self.world.is_relevant(known, self.index[np.asarray(rows)]))

  @functools.cached_property
  def _queries(self) -> dict:
    return {q.text: q for q in self.world.queries}


class Corpus:
  """Base: ids, images and captions by row; `truth`, `held_out`, `queries` where known."""
  name: str = 'corpus'             # also the key under which systems' embeddings are cached
  ids: np.ndarray                  # [N] record ids: str, or int (the world's indices)
  truth: Optional[GroundTruth] = None
  summary: dict                    # counts quoted in stage summaries and the report (each
                                   # subclass sets its own dict)
  # Images are decoded from files, so some may fail: mining and the report count records,
  # unreadable and indexed images.
  decodes_files: bool = False
  # The reference (PT) model's image embeddings of the rows [N, D], once computed (the corpus
  # index; the IAP head reads them).
  embeddings: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.ids)

  def images(self, rows) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def captions(self, rows) -> list[str]:
    raise NotImplementedError

  def reader(self, on_invalid: Optional[Callable[[int, str], None]] = None) -> Callable:
    """rows -> (images, valid) like `images`, reporting each image that fails to decode to
    on_invalid(row, error)."""
    del on_invalid   # (a corpus whose images always load)
    return self.images

  def stats(self) -> dict:
    """Read counts (records, skipped, failed) for summaries; {} when there is nothing to
    count."""
    return {}

  @property
  def held_out(self) -> Optional['Corpus']:
    """Images kept out of training and mining, to evaluate on; None: evaluate on this one."""
    return None

  def queries(self, kind: str) -> list[str]:
    """The corpus's own search queries ('mining' or 'eval'); [] when it has none (a real
    corpus: the queries come from files)."""
    del kind
    return []

  def fingerprint(self) -> dict:
    """What decides the corpus's records, for the stage cache."""
    raise NotImplementedError

  def pairs_pipeline(self, tok, *, batch_size: int, seed: int, data) -> Any:
    """A never-ending, shuffled stream of tokenised image-caption batches of `batch_size`
    (this process's share), sharded over processes (a grain IterDataset)."""
    raise NotImplementedError

  def image_lookup(self) -> preference.ImageLookup:
    raise NotImplementedError


class WorldCorpus(Corpus):
  """One split of the embedded world: row j is the split's record j."""

  def __init__(self, world: world_lib.World, split: str = 'train'):
    self.world, self.split = world, split
    self.index = world.split_indices(split)
    self.ids = self.index   # the world's ids are its record indices (D_po: their str)
    self.truth = WorldTruth(world, self.index)
    self.name = f'world:{split}:{len(self.index)}'
    self.summary = {}

  def images(self, rows) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows)
    return self.world.render_batch(self.index[rows]), np.ones(len(rows), bool)

  def captions(self, rows) -> list[str]:
    return self.world.captions(self.index[np.asarray(rows)])

  @property
  def held_out(self) -> Optional[Corpus]:
    return WorldCorpus(self.world, 'eval') if self.split == 'train' else None

  def queries(self, kind: str) -> list[str]:
    queries = {'mining': self.world.mining_queries, 'eval': self.world.eval_queries}[kind]
    return [q.text for q in queries]

  def fingerprint(self) -> dict:
    return {'world': self.world.config.to_dict()}

  def pairs_pipeline(self, tok, *, batch_size: int, seed: int, data) -> Any:
    # Indices are batched first and each batch rendered in one vectorised pass (grain would
    # fetch a procedural source one record at a time).
    return pipeline.make_batched_source_pipeline(
        self.world.split_range(self.split), self.world.batch, batch_size=batch_size,
        seed=seed, tokenize=tok, worker_count=data.worker_count)

  def image_lookup(self) -> preference.ImageLookup:
    return preference.world_image_lookup(self.world)


# The keys of config.data that decide which records a source holds (its fingerprint); the
# others (workers, buffers) only change how fast they are read.
SOURCE_KEYS = ('source', 'path', 'root', 'image_size', 'max_pixels', 'tfds_name', 'tfds_split',
               'tfds_data_dir', 'caption_key', 'label_key', 'caption_template')


class SourceCorpus(Corpus):
  """A folder / JSON Lines / CSV / tfds source (config.data), every record a row. Images
  that fail to decode come back black with valid False, counted in the source's stats."""

  decodes_files = True

  def __init__(self, data, file_fingerprint: Callable[[str], str]):
    self.data = data
    self.source = pipeline.make_source(data)
    logging.info('corpus: %s (%s)', self.source, self.source.stats())
    self.ids = np.asarray(pipeline.source_ids(self.source), dtype=str)
    _check_unique_ids(self.ids, data, getattr(self.source, 'origins', None))
    self.name = f'corpus:{len(self.ids)}'
    self._file_fingerprint = file_fingerprint
    self._reader = None
    self.summary = {}

  def reader(self, on_invalid: Optional[Callable[[int, str], None]] = None):
    """Images of rows, decoded by config.data.read_threads threads (pipeline.RecordImages)."""
    return pipeline.RecordImages(self.source, threads=self.data.read_threads,
                                 on_invalid=on_invalid)

  def images(self, rows) -> tuple[np.ndarray, np.ndarray]:
    if self._reader is None:
      self._reader = self.reader()
    return self._reader(rows)

  def captions(self, rows) -> list[str]:
    rows = np.asarray(rows).reshape(-1)
    indexed = getattr(self.source, 'captions', None)   # from the index: no image decoded
    if indexed is not None:
      return [str(indexed[int(r)]) for r in rows]
    return [str(self.source[int(r)]['caption']) for r in rows]

  def fingerprint(self) -> dict:
    return source_fingerprint(self.data, self._file_fingerprint)

  def pairs_pipeline(self, tok, *, batch_size: int, seed: int, data) -> Any:
    # A stream that never ends, shuffled, of full batches of uint8 images (the train step
    # normalises on device).
    return pipeline.make_pipeline(self.source, tokenize=tok, batch_size=batch_size, seed=seed,
                                  num_epochs=None, normalize=False, drop_remainder=True,
                                  **pipeline.pipeline_kwargs(data))

  def image_lookup(self) -> preference.ImageLookup:
    return preference.source_image_lookup(self.source, ids=self.ids.tolist())

  def stats(self) -> dict:
    return self.source.stats()


def _check_unique_ids(ids: np.ndarray, data, origins: Optional[list] = None) -> None:
  """Refuses a corpus whose record ids repeat (D_po records name images by id, so a repeat
  would pair a caption with another record's image), naming the first repeated id, how many
  records carry it, where they are written, and the file."""
  unique, first_row, counts = np.unique(ids, return_index=True, return_counts=True)
  if (counts == 1).all():
    return
  repeated = np.flatnonzero(counts > 1)
  first = repeated[np.argmin(first_row[repeated])]   # the repeat met first in the file
  rows = np.flatnonzero(ids == unique[first])
  where = ', '.join(origins[r] for r in rows[:5]) if origins else f'rows {rows[:5].tolist()}'
  others = f'; {len(repeated) - 1} more ids repeat too' if len(repeated) > 1 else ''
  source = (f'config.data.tfds_name={data.tfds_name!r}' if data.source == 'tfds'
            else f'config.data.path={data.path!r}')
  raise ValueError(f'corpus {source}: id {str(unique[first])!r} names {counts[first]} records '
                   f'({where}){others}; ids must be unique (D_po records name images by id): '
                   'give each record its own id (an "id" field or column) or drop the repeats')


class SubsetCorpus(Corpus):
  """Some rows of another corpus (e.g. those whose images decoded), with their own summary."""

  def __init__(self, base: Corpus, rows: np.ndarray, summary: Optional[dict] = None,
               images: Optional[Callable] = None):
    self.base, self.rows = base, np.asarray(rows, np.int64)
    self.decodes_files = base.decodes_files
    self.ids = base.ids[self.rows]
    self.name = f'{base.name}:subset:{len(self.rows)}'
    self.truth = None if base.truth is None else _SubsetTruth(base.truth, self.rows)
    self.summary = dict(summary or {})
    self._images = images or base.images

  def images(self, rows) -> tuple[np.ndarray, np.ndarray]:
    return self._images(self.rows[np.asarray(rows)])

  def captions(self, rows) -> list[str]:
    return self.base.captions(self.rows[np.asarray(rows)])

  def fingerprint(self) -> dict:
    return self.base.fingerprint()


class _SubsetTruth:
  def __init__(self, truth: GroundTruth, rows: np.ndarray):
    self.base, self.rows = truth, rows

  def aesthetic(self, rows) -> np.ndarray:
    return self.base.aesthetic(self.rows[np.asarray(rows)])

  def relevant(self, query: str, rows) -> np.ndarray:
    return self.base.relevant(query, self.rows[np.asarray(rows)])


_OPENED: dict = {}


def open_corpus(data, *, world=None, file_fingerprint: Callable[[str], str] = str) -> Corpus:
  """The corpus config.data names: source 'world' is the embedded world's training split
  (world: the config's `world` section); folder / jsonl / csv / tfds a file source. Opened
  once per process and configuration (indexing a large JSON Lines file checks every path)."""
  if data.source == 'world':
    split = pipeline.make_source(data, world)   # the world's training split
    key = json.dumps({'world': world.to_dict()}, sort_keys=True, default=str)
    return _OPENED.setdefault(key, WorldCorpus(split.world, 'train'))
  key = json.dumps(source_fingerprint(data, file_fingerprint), sort_keys=True, default=str)
  if key not in _OPENED:
    _OPENED[key] = SourceCorpus(data, file_fingerprint)
  return _OPENED[key]


def source_fingerprint(data, file_fingerprint: Callable[[str], str]) -> dict:
  """What decides a file source's records: its keys of config.data, and the file itself."""
  out = {k: data[k] for k in SOURCE_KEYS}
  if data.source in ('jsonl', 'csv'):
    out['file'] = file_fingerprint(data.path)
  return {'data': out}
