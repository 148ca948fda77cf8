"""What gets evaluated (a System) and the evaluator base + registry (big_vision style).

    evaluators = make_evaluators(config.evals, world=world, scorers=scorers, mesh=mesh)
    for system in (pt, pt_rephrase, aligned):
      metrics[system.name] = run_evaluators(evaluators, system)   # {'retrieval/t2i_r1': ..}

Each evaluator is a small class built from its config section `config.evals.<name>`; the
section's `type` names the evaluator kind (default: the section's name), so one kind can run
on several sets (`evals.retrieval_world`, `evals.retrieval_coco`, both type 'retrieval').
A section with `enabled = False` is skipped. `run(system)` returns a dict of floats or yields
(name, value) pairs. Resources that are code, not config (the world, aesthetic scorers, the
mesh, a shared embedding cache), are passed to make_evaluators as keyword arguments; every
evaluator receives them all and takes what it needs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterable, Mapping, Protocol, Union

import ml_collections
import numpy as np

from aesalign_jax import multihost

Metrics = Union[Mapping[str, float], Iterable[tuple[str, float]]]


class Embeds(Protocol):
  """A model's two towers, returning unit vectors (aesalign_jax.embed.Embedder is one)."""

  def images(self, images_uint8: np.ndarray) -> np.ndarray: ...
  def texts(self, texts: list[str]) -> np.ndarray: ...


@dataclasses.dataclass(eq=False)
class System:
  """A retrieval system: a model's embedder, plus an optional query rephraser.

  rephrase: None (queries are used as given), a callable str -> str, a mapping from query to
  rephrased query (precomputed, e.g. a rephrase cache), or an object with
  `rephrase_batch(list[str])` returning `.texts` (aesalign_jax.rephrase.Rephraser).
  Rephrasing applies to search queries only (query_text); captions and class prompts are
  embedded as given (embed_texts).
  """
  name: str
  embedder: Embeds
  rephrase: Any = None
  # Evaluated by every process of a multi-process run at once: embed_chunks splits the images
  # over the processes (the caller's rephraser and judge split their LLM calls themselves).
  across_processes: bool = False

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 [N, D] unit vectors."""
    return np.asarray(self.embedder.images(np.asarray(images)), np.float32)

  def embed_texts(self, texts) -> np.ndarray:
    """list of M strings -> float32 [M, D] unit vectors."""
    return np.asarray(self.embedder.texts(list(texts)), np.float32)

  def query_text(self, query: str) -> str:
    """The text this system searches with for `query` (the query itself, or its rephrasing)."""
    return self.query_texts([query])[0]

  def query_texts(self, queries) -> list[str]:
    """query_text of each query; a rephraser with rephrase_batch is called once for all."""
    queries = [str(q) for q in queries]
    r = self.rephrase
    if r is None:
      return queries
    if hasattr(r, 'rephrase_batch'):
      return list(r.rephrase_batch(queries).texts)
    if isinstance(r, Mapping):
      missing = [q for q in queries if q not in r]
      if missing:
        raise KeyError(f'system {self.name!r}: no rephrasing for {len(missing)} queries, '
                       f'e.g. {missing[0]!r}')
      return [str(r[q]) for q in queries]
    return [str(r(q)) for q in queries]


def embed_chunks(system: System, n: int, batch_size: int,
                 load: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """Embeds items [0, n) chunk by chunk: load(rows) -> uint8 images [len(rows), S, S, 3].

  A system evaluated across processes splits the chunks over them (each process loads and
  embeds its own block of chunks, multihost.share) and gathers the embeddings in order. Each
  chunk is embedded as one process would embed it, so the bits do not depend on the number of
  processes. Returns float32 [n, D]."""
  chunks = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
  if not system.across_processes or len(chunks) < multihost.count():
    return np.concatenate([system.embed_images(load(rows)) for rows in chunks])
  start, stop = multihost.share(len(chunks))
  own = np.concatenate([system.embed_images(load(rows)) for rows in chunks[start:stop]])
  return np.concatenate(multihost.allgather_arrays(own))


class EmbeddingCache:
  """Image embeddings per (embedder, key): systems sharing an embedder (PT, PT + rephrasing)
  embed a corpus once. Holds a reference to each embedder, so an id is never reused."""

  def __init__(self):
    self._store: dict[tuple[int, str], tuple[Any, np.ndarray]] = {}

  def get(self, system: System, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    slot = (id(system.embedder), key)
    if slot not in self._store:
      self._store[slot] = (system.embedder, np.asarray(compute(), np.float32))
    return self._store[slot][1]


def embed_images_in_batches(system: System, batches: Iterable) -> np.ndarray:
  """Embeds every image of an iterable of batches: uint8 [B, S, S, 3] arrays or dicts with
  'image' (a grain pipeline's batches). Returns float32 [N, D]."""
  out = []
  for batch in batches:
    images = batch['image'] if isinstance(batch, Mapping) else batch
    out.append(system.embed_images(np.asarray(images)))
  if not out:
    raise ValueError('embed_images_in_batches: the image source yielded no batch')
  return np.concatenate(out)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def expected_hit(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
  """P(rank <= k) when `greater` candidates score above the target and `ties` others score
  the same, the ties broken at random: the target's rank is uniform on
  [greater + 1, greater + ties + 1]. Random tie-breaking keeps a collapsed model (every score
  equal) at chance instead of a perfect score."""
  greater, ties = np.asarray(greater, np.float64), np.asarray(ties, np.float64)
  return np.clip((k - greater) / (ties + 1.0), 0.0, 1.0)


# --- evaluator base and registry ---------------------------------------------------------------

class Evaluator:
  """Base: built from its config section (and the shared resources), run once per system."""

  def __init__(self, config: ml_collections.ConfigDict, *, name: str = '', **context):
    self.config = config
    self.name = name or type(self).__name__
    self.context = context

  def need(self, key: str):
    """A shared resource, or an error naming this evaluator's config section."""
    value = self.context.get(key)
    if value is None:
      raise ValueError(f'evals.{self.name}: needs `{key}`, which was not given to '
                       'make_evaluators')
    return value

  @property
  def cache(self) -> EmbeddingCache:
    if self.context.get('cache') is None:
      self.context['cache'] = EmbeddingCache()
    return self.context['cache']

  def run(self, system: System) -> Metrics:
    raise NotImplementedError


_REGISTRY: dict[str, type] = {}
# Where each kind is defined, imported on first use (so the registry needs no import order).
KIND_MODULES = {
    'retrieval': 'aesalign_jax.evaluation.retrieval_eval',
    'zeroshot': 'aesalign_jax.evaluation.zeroshot',
    'topk_quality': 'aesalign_jax.evaluation.topk_quality',
    'hpir': 'aesalign_jax.evaluation.hpir_eval',   # an HPIR-format file (hpir.default_config)
}


def register(kind: str):
  """Class decorator: makes `kind` usable as a config section's `type`."""
  def wrap(cls):
    _REGISTRY[kind] = cls
    cls.kind = kind
    return cls
  return wrap


def evaluator_class(kind: str) -> type:
  if kind not in _REGISTRY and kind in KIND_MODULES:
    importlib.import_module(KIND_MODULES[kind])
  if kind not in _REGISTRY:
    raise ValueError(f'unknown evaluator type {kind!r}; known: '
                     f'{sorted(set(_REGISTRY) | set(KIND_MODULES))}')
  return _REGISTRY[kind]


def make_evaluators(evals: ml_collections.ConfigDict, **context) -> dict[str, Evaluator]:
  """One evaluator per enabled section of `evals` (config.evals), in the sections' order."""
  out = {}
  context.setdefault('cache', EmbeddingCache())   # shared: each corpus embedded once per model
  for name, section in evals.items():
    if not isinstance(section, ml_collections.ConfigDict):
      raise ValueError(f'evals.{name} must be a config section, got {type(section).__name__}')
    if not section.get('enabled', True):
      continue
    cls = evaluator_class(section.get('type', name))
    out[name] = cls(section, name=name, **context)
  return out


def as_metrics(result: Metrics) -> dict[str, float]:
  """A run() result (dict, or iterator of (name, value)) as a dict of floats."""
  items = result.items() if isinstance(result, Mapping) else result
  return {str(k): float(v) for k, v in items}


def run_evaluators(evaluators: Mapping[str, Evaluator], system: System) -> dict[str, float]:
  """Every evaluator on one system: {'<section>/<metric>': value}."""
  out = {}
  for name, ev in evaluators.items():
    for metric, value in as_metrics(ev.run(system)).items():
      out[f'{name}/{metric}'] = value
  return out


def default_config() -> ml_collections.ConfigDict:
  """The `evals` section: one subsection per evaluator (the lead adds HPIR and judge ones)."""
  from aesalign_jax.evaluation import retrieval_eval, topk_quality, zeroshot  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.retrieval = retrieval_eval.default_config()
  c.zeroshot_shape = zeroshot.default_config(task='world_shape')
  c.zeroshot_colour = zeroshot.default_config(task='world_colour')
  c.topk_quality = topk_quality.default_config()
  return c
