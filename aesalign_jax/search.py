"""Search a finished run: PT, PT + rephrasing and the aligned model side by side, over the
run's own corpus index. The web server (serve.py), this module's CLI and scripts share it.

    from aesalign_jax import search
    engine = search.open_run(config, workdir)   # or search.open_workdir(workdir)
    hits = engine.search('a red circle', system='aligned', k=10)
    hits.ids, hits.scores, hits.aesthetic['iap'], hits.ground_truth, hits.on_topic
    png_bytes, media_type = engine.image(hits.ids[0])

    python -m aesalign_jax.search --workdir W --query "a red circle" --k 10 \\
        [--system aligned] [--png grid.png] [--config configs/default.py]

What is loaded, once (open_run): the PT and aligned models' text towers, jitted once for one
query; the corpus index the mine stage wrote (W/mine/index, or config.mine.embeddings_dir) for
PT, and the aligned model's index of the same rows (W/eval/aligned_index when the eval stage
wrote one; else built once under W/serve/aligned_index, since a run on the embedded world
evaluates on held-out images and keeps no aligned index); the rephraser of config.rephrase;
the aesthetic scorers (the run's IAP head, the low-level score) and the corpus's ground truth
where it has one. Nothing is re-embedded at a later start. Every query is searched for the top
config.serve.max_k with the configured top-K searcher (config.retrieval) and cut to k, so one
compiled search serves every k.

A request the engine cannot answer raises RequestError (an HTTP status and a message naming
what is wrong); a workdir it cannot serve raises NotReady naming the stage to run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import mimetypes
import os
import re
import shutil
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from aesalign_jax import mining, rephrase, retrieval, stages
from aesalign_jax.aesthetics import lowlevel
from aesalign_jax.models import clip
from aesalign_jax.retrieval import index as retrieval_index
from aesalign_jax.stages import cache, context, corpus_index
from aesalign_jax.stages import evaluate as evaluate_stage


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the `serve` section: how a finished run is searched and served."""
  c = ml_collections.ConfigDict()
  # Address of the search page and API (--mode=serve). 127.0.0.1: this machine only; the
  # server has no authentication, so bind another address only on a trusted network.
  c.host = '127.0.0.1'
  # TCP port; 0 = any free port (the URL logged at start names it).
  c.port = 8900
  # Results per system when a request names no k (the page's first k).
  c.k = 10
  # The largest k a request may ask for. Every query is searched for this many and cut to
  # k, so one compiled search serves every k.
  c.max_k = 100
  # Longer queries are refused (the tokenizer would cut them at the model's context anyway).
  c.max_query_chars = 1000
  # Index rows per top-K step of one query (backend and exactness: config.retrieval). Smaller
  # than retrieval's batch-sized chunks: on CPU, XLA's top_k for one query over 100,000 rows
  # took 7 ms in 16k-row chunks and 30 ms in retrieval's 65,536-row ones.
  c.chunk_size = 16_384
  return c


def validate(c) -> None:
  """Refuses a `serve` section that cannot be served, naming the key."""
  if not isinstance(c.host, str) or not c.host.strip():
    raise ValueError(f'config.serve.host={c.host!r} must be a host name or address')
  for key, low, high in (('port', 0, 65535), ('max_k', 1, 10_000), ('k', 1, None),
                         ('max_query_chars', 1, None), ('chunk_size', 1, None)):
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high):
      bounds = f'in [{low}, {high}]' if high is not None else f'>= {low}'
      raise ValueError(f'config.serve.{key}={value!r} must be an integer {bounds}')
  if c.k > c.max_k:
    raise ValueError(f'config.serve.k={c.k} is above config.serve.max_k={c.max_k}')


@dataclasses.dataclass(frozen=True)
class System:
  """One searchable system: its API name, the label the page shows, the model whose text and
  image embeddings it uses, and whether the query is rephrased first."""
  name: str
  label: str
  model: str   # 'pt' or 'aligned'
  rephrase: bool


SYSTEMS = (System('pt', 'PT', 'pt', False),
           System('pt_rephrase', 'PT + rephrasing', 'pt', True),
           System('aligned', 'aligned', 'aligned', False))
SYSTEM_NAMES = tuple(s.name for s in SYSTEMS)


class RequestError(ValueError):
  """A request the engine refuses: `status` is its HTTP status (4xx), the message says why."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


class NotReady(ValueError):
  """A workdir that cannot be served yet; the message names the stage to run."""


@dataclasses.dataclass
class Hits:
  """One system's top k for one query, best first. Lists are parallel to `ids`; a score that
  could not be computed (an image that does not decode) is NaN (None in JSON)."""
  query: str
  system: str
  label: str
  searched: str                    # the text embedded: the rephrasing for pt_rephrase
  rephrase_fallback: Optional[str]   # why the rephraser fell back to the query, if it did
  ids: list[str]
  scores: list[float]              # cosine similarity of the searched text to each image
  aesthetic: dict[str, list[float]]   # scorer name ('iap', 'lowlevel') -> scores
  ground_truth: Optional[list[float]]  # the corpus's true aesthetic (the world's), else None
  on_topic: Optional[list[bool]]   # None where the ground truth cannot judge the query
  seconds: float

  def to_json(self, image_url: Callable[[str], str]) -> dict:
    finite = lambda xs: [round(float(x), 4) if np.isfinite(x) else None for x in xs]
    return {'query': self.query, 'system': self.system, 'label': self.label,
            'k': len(self.ids), 'searched': self.searched,
            'rephrased_query': self.searched if self.system == 'pt_rephrase' else None,
            'rephrase_fallback': self.rephrase_fallback, 'ids': self.ids,
            'scores': finite(self.scores), 'image_urls': [image_url(i) for i in self.ids],
            'aesthetic': {name: finite(v) for name, v in self.aesthetic.items()},
            'ground_truth': None if self.ground_truth is None else finite(self.ground_truth),
            'on_topic': self.on_topic, 'seconds': round(self.seconds, 4)}


# What each scorer of Hits.aesthetic is, for captions.
SCORER_ABOUT = {'iap': 'the IAP aesthetic head', 'lowlevel': 'low-level image quality'}


def _text_encoder(cfg: clip.ClipConfig, params: dict, tok) -> Callable[[str], jax.Array]:
  """text -> unit vector [1, D] with the text tower alone (the vision tower's parameters are
  not kept), compiled once: a single query always has the tokenizer's padded shape."""
  text_params = jax.device_put({'text': params['text']})
  fn = jax.jit(lambda p, ids, eos: clip.bind(cfg, p).encode_text(ids, eos))

  def encode(text: str) -> jax.Array:
    t = tok([text])
    return fn(text_params, np.asarray(t['ids'], np.int32), np.asarray(t['eos_index'], np.int32))
  return encode


def _leaves_root(image_id: str) -> bool:
  """Whether an id, read as a path, could leave a folder: '..' parts, absolute, a drive."""
  parts = re.split(r'[/\\]', image_id)
  return ('..' in parts or image_id.startswith(('/', '\\')) or '\x00' in image_id
          or re.match(r'^[A-Za-z]:[/\\]', image_id) is not None)


class Engine:
  """The search over one run (made by open_run); thread-safe (calls are serialised)."""

  def __init__(self, *, serve_config, corpus, encoders: dict, embeddings: dict, searcher,
               rephraser, scorers: dict, workdir: str):
    self.config = serve_config
    self.corpus = corpus
    self.workdir = workdir
    self.ids = np.asarray(corpus.ids).astype(str)
    self._row_of = {image_id: row for row, image_id in enumerate(self.ids.tolist())}
    self._encoders, self._embeddings = encoders, embeddings
    self._searcher, self._rephraser, self._scorers = searcher, rephraser, scorers
    self.max_k = min(int(serve_config.max_k), len(self.ids))
    self.open_seconds = 0.0   # how long open_run took (the server's cold start, less imports)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def has_ground_truth(self) -> bool:
    return self.corpus.truth is not None

  def info(self) -> dict:
    """What the page needs to draw itself."""
    return {'images': len(self), 'max_k': self.max_k, 'k': min(self.config.k, self.max_k),
            'max_query_chars': self.config.max_query_chars,
            'systems': [{'name': s.name, 'label': s.label} for s in SYSTEMS],
            'aesthetic': list(self._scorers), 'ground_truth': self.has_ground_truth}

  # --- checks: each names what is wrong --------------------------------------------------
  def check_query(self, query) -> str:
    if query is None:
      raise RequestError('missing query: give q=<text>')
    query = ' '.join(str(query).split())   # one line: the tokenizer and the cache see it so
    if not query:
      raise RequestError('the query is empty')
    if len(query) > self.config.max_query_chars:
      raise RequestError(f'the query has {len(query)} characters; at most '
                         f'{self.config.max_query_chars} are accepted '
                         '(config.serve.max_query_chars)')
    return query

  def check_k(self, k) -> int:
    if k is None or k == '':
      return min(self.config.k, self.max_k)
    try:
      value = int(str(k).strip())
    except ValueError:
      raise RequestError(f'k={k!r} is not an integer') from None
    if value < 1:
      raise RequestError(f'k={value} must be at least 1')
    if value > self.max_k:
      why = ('config.serve.max_k' if self.max_k == self.config.max_k else
             f'the index holds {len(self)} images')
      raise RequestError(f'k={value} is above the limit {self.max_k} ({why})')
    return value

  @staticmethod
  def check_system(system) -> System:
    for s in SYSTEMS:
      if s.name == system:
        return s
    raise RequestError(f'system={system!r} is unknown; expected one of '
                       f'{", ".join(SYSTEM_NAMES)}')

  # --- search -----------------------------------------------------------------------------
  def search(self, query: str, system: str = 'aligned', k=None) -> Hits:
    """The top k of `system` for `query` (RequestError for a bad query, system or k)."""
    query, chosen, k = self.check_query(query), self.check_system(system), self.check_k(k)
    with self._lock:
      start = time.perf_counter()
      searched, fallback = query, None
      if chosen.rephrase:
        result = self._rephraser.rephrase_batch([query])
        searched = result.texts[0]
        if result.status[0] != 'ok':   # the policy: search with the query itself, and say so
          fallback = result.reasons[0] or 'fell back'
      scores, rows = self._top(chosen.model, searched)
      scores, rows = scores[:k], rows[:k]
      aesthetic = {name: np.asarray(fn(rows), np.float64).tolist()
                   for name, fn in self._scorers.items()}
      ground_truth = on_topic = None
      truth = self.corpus.truth
      if truth is not None:
        ground_truth = np.asarray(truth.aesthetic(rows), np.float64).tolist()
        try:   # relevance to what was asked, also for the rephrased search
          on_topic = [bool(x) for x in truth.relevant(query, rows)]
        except KeyError:   # a query the ground truth cannot judge
          on_topic = None
      return Hits(query=query, system=chosen.name, label=chosen.label, searched=searched,
                  rephrase_fallback=fallback, ids=self.ids[rows].tolist(),
                  scores=scores.tolist(), aesthetic=aesthetic, ground_truth=ground_truth,
                  on_topic=on_topic, seconds=time.perf_counter() - start)

  def _top(self, model: str, text: str) -> tuple[np.ndarray, np.ndarray]:
    query_emb = self._encoders[model](text)
    scores, rows = self._searcher.topk(query_emb, self._embeddings[model], self.max_k)
    return np.asarray(scores[0], np.float64), np.asarray(rows[0], np.int64)

  def warm_up(self) -> None:
    """Compiles every search path once (text towers, top-K, scorers) before the first query."""
    for model in self._encoders:
      _, rows = self._top(model, 'warm up')
      for fn in self._scorers.values():
        fn(rows[:1])

  # --- images -----------------------------------------------------------------------------
  def row(self, image_id) -> int:
    """The index row of an id: RequestError 404 for an id not in the index, 400 when that id
    is also a path that leaves the corpus root. Files are found through the index only, never
    by the id as a path, so an index id that is an absolute path still works."""
    image_id = str(image_id)
    row = self._row_of.get(image_id)
    if row is None and _leaves_root(image_id):
      raise RequestError(f'image id {image_id!r} is a path that leaves the corpus root')
    if row is None:
      shown = image_id if len(image_id) <= 80 else image_id[:80] + '...'
      raise RequestError(f'no image {shown!r} in the corpus index ({len(self)} images)', 404)
    return row

  def image(self, image_id) -> tuple[bytes, str]:
    """(bytes, media type) of a corpus image: a file source's own file, read from inside the
    corpus root only; any other corpus (the world: rendered now) as PNG."""
    row = self.row(image_id)
    source = getattr(getattr(self.corpus, 'base', None), 'source', None)
    if hasattr(source, 'image_file'):
      root = os.path.realpath(source.root)
      path = os.path.realpath(source.image_file(int(self.corpus.rows[row])))
      # Checked again now: a file swapped for a symlink since indexing must not be followed out.
      if os.path.commonpath([root, path]) != root:
        raise RequestError(f'image {image_id!r} resolves outside the corpus root', 403)
      try:
        with open(path, 'rb') as f:
          return f.read(), mimetypes.guess_type(path)[0] or 'application/octet-stream'
      except OSError as e:
        raise RequestError(f'image {image_id!r} cannot be read ({e.strerror})', 404) from None
    with self._lock:
      images, valid = self.corpus.images(np.asarray([row]))
    if not valid[0]:
      raise RequestError(f'image {image_id!r} does not decode', 404)
    return _png(images[0]), 'image/png'

  def images(self, ids: Sequence[str]) -> np.ndarray:
    """uint8 [N, S, S, 3] of index ids, as the models see them (for figures)."""
    rows = np.asarray([self.row(i) for i in ids], np.int64)
    with self._lock:
      return self.corpus.images(rows)[0]

  def close(self) -> None:
    if self._rephraser is not None:
      self._rephraser.close()


def _png(image: np.ndarray) -> bytes:
  from PIL import Image   # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


# --- opening a run ---------------------------------------------------------------------------

def serve_section(config) -> ml_collections.ConfigDict:
  """config.serve over the defaults: a config a run recorded (eval/report.json) before a key,
  or the whole section, existed gets the default for what it lacks."""
  out = default_config()
  given = config.get('serve')
  for key, value in ({} if given is None else given.items()):
    if key in out:
      try:
        out[key] = value
      except TypeError as e:   # ConfigDict keeps each field's type
        raise ValueError(f'config.serve.{key}={value!r}: {e}') from None
  return out


def _run_hint(workdir: str, stage: str) -> str:
  return (f'run `python main.py --config=<the run\'s config> --workdir={workdir} '
          f'--mode={stage}` first')


def check_trained(config, workdir: str) -> dict:
  """The run's model folders and files by stage; NotReady naming the first stage not done."""
  if not os.path.isdir(workdir):
    raise NotReady(f'no workdir {workdir}: {_run_hint(workdir, "all")}')
  needed = [('pretrain', 'pretrained (PT) model', os.path.join(workdir, 'pretrain', 'model')),
            ('align', 'aligned model', os.path.join(workdir, 'align', 'model'))]
  a = config.aesthetics
  if a.kind == 'iap' and not a.iap.weights:   # else given weights, or the low-level scorer
    needed.append(('aesthetic', 'IAP aesthetic head',
                   os.path.join(workdir, 'aesthetic', 'iap.safetensors')))
  for stage, what, path in needed:
    if not (os.path.exists(os.path.join(workdir, stage, cache.MARKER)) and os.path.exists(path)):
      raise NotReady(f'{workdir} has no trained {what} ({path}): the `{stage}` stage has not '
                     f'finished; {_run_hint(workdir, stage)}')
  index = config.mine.embeddings_dir or os.path.join(workdir, 'mine', 'index')
  manifest = retrieval_index.read_manifest(index)
  if manifest is None or not manifest.get('complete'):
    raise NotReady(f'{workdir} has no finished corpus index ({index}): the `mine` stage has '
                   f'not finished; {_run_hint(workdir, "mine")}')
  out = {stage: path for stage, _, path in needed}
  if a.kind == 'iap' and a.iap.weights:
    out['aesthetic'] = a.iap.weights
  return out


def _stored_aligned(ctx, ids: list, params) -> Optional[np.ndarray]:
  """eval's or serve's aligned index, in memory, when it holds exactly these ids and was
  built by this model; else None."""
  for stage in ('eval', 'serve'):
    folder = os.path.join(ctx.workdir, stage, 'aligned_index')
    try:
      corpus_index.check_index_of(folder, params, 'the eval stage')
    except ValueError:
      continue
    embeddings, found = retrieval_index.load_index(folder, dtype=np.float32)
    if found.astype(str).tolist() == ids:
      return embeddings
  return None


def _aligned_embeddings(ctx, corpus, aligned_model) -> np.ndarray:
  """The aligned model's embeddings of the index rows: eval's or serve's aligned index when
  it holds exactly these rows by this model, else built once under W/serve/aligned_index."""
  ids = corpus.ids.astype(str).tolist()
  stored = _stored_aligned(ctx, ids, aligned_model[1])
  if stored is not None:
    return stored
  serve_dir = os.path.join(ctx.workdir, 'serve')
  stale = os.path.join(serve_dir, 'aligned_index')
  if os.path.exists(stale):   # ours, of another model or corpus: rebuilt
    shutil.rmtree(stale)
  logging.info('search: embedding the %d index images with the aligned model once, into %s '
               '(the eval stage kept no aligned index of them)', len(ids), stale)
  try:
    evaluate_stage.aligned_index(ctx, serve_dir, corpus, aligned_model)
  except OSError as e:
    raise NotReady(f'cannot write {stale} ({e.strerror}): the aligned model\'s index of the '
                   'corpus is built there once; serve a writable copy of the workdir') from e
  built = _stored_aligned(ctx, ids, aligned_model[1])
  if built is None:   # (aligned_index checks the ids; a model changed while it ran)
    raise NotReady(f'{stale} does not match the aligned model just built from; restart')
  return built


def _scorers(config, iap_weights: Optional[str], corpus) -> dict:
  """Scorer name -> (index rows -> scores): the IAP head when the run has one, and the
  low-level image quality score (decodes the images: scored when shown, each row once)."""
  out = {}
  if iap_weights:
    fn = corpus_index.aesthetic_scores_fn(config.aesthetics, iap_weights, corpus)
    if not isinstance(fn, mining.RowScores):
      # A head on the index's own embeddings: every row now, in fixed-size chunks (one
      # compiled shape, bounded memory), so a query costs a lookup.
      n, chunk = len(corpus), 8192
      every = np.concatenate([np.asarray(fn(np.minimum(np.arange(s, s + chunk), n - 1)))
                              for s in range(0, n, chunk)])[:n].astype(np.float64)
      fn = lambda rows: every[np.asarray(rows)]
    out['iap'] = fn
  low = lowlevel.LowLevelScorer(config.aesthetics.lowlevel)
  out['lowlevel'] = mining.RowScores(
      lambda rows: corpus_index.score_loaded(low.score, corpus, rows))
  return out


def open_run(config, workdir: str, mesh=None) -> Engine:
  """The search engine over a finished run (see the module docstring); NotReady when the
  workdir lacks a stage's output, naming the stage."""
  start = time.perf_counter()
  serve_config = serve_section(config)
  validate(serve_config)
  workdir = os.path.abspath(workdir)
  files = check_trained(config, workdir)
  ctx = stages.start(config, workdir, mesh)
  pt = context.load_model_folder(files['pretrain'], config.model)
  aligned = context.load_model_folder(files['align'], config.model)
  try:
    corpus = corpus_index.indexed_corpus(ctx, pt[0], pt[1], build=False)
  except ValueError as e:   # an index of another model, a stored index of other ids
    raise NotReady(str(e)) from e
  # Both indexes in memory, read once: a query must not wait on the index files.
  corpus.embeddings = np.asarray(corpus.embeddings, np.float32)
  embeddings = {'pt': corpus.embeddings, 'aligned': _aligned_embeddings(ctx, corpus, aligned)}
  searcher = dataclasses.replace(retrieval.make_searcher(config.retrieval, ctx.mesh),
                                 chunk_size=serve_config.chunk_size)
  if searcher.backend == 'device' and ctx.mesh.size == 1:
    # On device once, not copied from the host per query (search.topk slices it there).
    embeddings = {m: jax.device_put(e) for m, e in embeddings.items()}
  encoders = {'pt': _text_encoder(*pt), 'aligned': _text_encoder(*aligned)}
  scorers = _scorers(config, files.get('aesthetic'), corpus)
  del pt, aligned   # the vision towers are not needed any more
  cache_path = config.rephrase.cache_path or os.path.join(workdir, 'serve',
                                                          'rephrase_cache.jsonl')
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  except OSError as e:   # a read-only workdir: rephrase without a cache
    logging.warning('search: no rephrase cache (%s: %s)', cache_path, e.strerror)
    cache_path = ''
  rephraser = rephrase.make_rephraser(config.rephrase, cache_path)
  engine = Engine(serve_config=serve_config, corpus=corpus, encoders=encoders,
                  embeddings=embeddings, searcher=searcher, rephraser=rephraser,
                  scorers=scorers, workdir=workdir)
  engine.warm_up()
  engine.open_seconds = time.perf_counter() - start
  logging.info('search: %d images, PT and aligned, ready in %.1f s', len(engine),
               engine.open_seconds)
  return engine


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run used, as its eval report recorded it (W/eval/report.json)."""
  path = os.path.join(workdir, 'eval', 'report.json')
  if not os.path.exists(path):
    raise NotReady(f'{path} does not exist, so the run\'s config is unknown: pass --config '
                   '(the run\'s config file) or run the eval stage')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f)['config'])


def open_workdir(workdir: str, config=None, mesh=None) -> Engine:
  """open_run with the run's own config (run_config) unless one is given."""
  return open_run(config if config is not None else run_config(workdir), workdir, mesh)


# --- the command line --------------------------------------------------------------------------

def format_table(hits: Hits) -> str:
  """One system's hits as a fixed-width table, headed by what was searched."""
  head = f'{hits.label}'
  if hits.searched != hits.query:
    head += f'  (searched: "{hits.searched}")'
  if hits.rephrase_fallback:
    head += f'  (rephrasing fell back: {hits.rephrase_fallback})'
  columns = ['rank', 'id', 'similarity', *hits.aesthetic]
  if hits.ground_truth is not None:
    columns += ['truth', 'on-topic']
  rows = []
  for j, image_id in enumerate(hits.ids):
    row = [str(j + 1), image_id, f'{hits.scores[j]:.4f}',
           *(f'{v[j]:.3f}' for v in hits.aesthetic.values())]
    if hits.ground_truth is not None:
      row += [f'{hits.ground_truth[j]:.3f}',
              '?' if hits.on_topic is None else ('yes' if hits.on_topic[j] else 'no')]
    rows.append(row)
  widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
  line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return '\n'.join([head, line(columns), *(line(r) for r in rows)])


def write_grid(path: str, engine: Engine, results: dict) -> str:
  """A PNG of every system's hits per query (evaluation/figures_grid.retrieval_grid).
  results: query -> {system name: Hits}."""
  from aesalign_jax.evaluation import figures_grid   # pylint: disable=g-import-not-at-top
  queries = list(results)
  labels = {h.system: h.label for per in results.values() for h in per.values()}
  images = {labels[s]: [engine.images(results[q][s].ids) for q in queries] for s in labels}
  captions, notes, relevant = {}, {}, {}
  for s, label in labels.items():
    rows = [results[q][s] for q in queries]
    captions[label] = [[f'sim {h.scores[j]:.2f}' + ''.join(
        f'\n{name[:3]} {v[j]:.2f}' for name, v in h.aesthetic.items()) + (
        f'\ngt {h.ground_truth[j]:.2f}' if h.ground_truth is not None else '')
        for j in range(len(h.ids))] for h in rows]
    notes[label] = [f'searched: "{h.searched}"' if h.searched != h.query else '' for h in rows]
    relevant[label] = [h.on_topic for h in rows]
  judged = all(r is not None for per in relevant.values() for r in per)
  first = next(iter(next(iter(results.values())).values()))
  subtitle = ('Left to right: rank 1 to k. sim: cosine similarity to the searched text; '
              + ''.join(f'{n[:3]}: {SCORER_ABOUT.get(n, n)}; ' for n in first.aesthetic)
              + ('gt: ground-truth aesthetic. ' if first.ground_truth is not None else '')
              + ('Green frame: on-topic, red: off-topic.' if judged else ''))
  return figures_grid.retrieval_grid(path, queries, images, captions,
                                     relevant=relevant if judged else None, notes=notes,
                                     title=f'Search: {engine.workdir}', subtitle=subtitle)


def _cli(argv) -> int:
  from absl import flags   # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  try:
    config = f.config if f.config is not None else run_config(f.workdir)
    systems = list(SYSTEM_NAMES) if f.system == 'all' else [f.system]
    engine = open_workdir(f.workdir, config)
    results = {q: {s: engine.search(q, s, f.k) for s in systems} for q in f.query}
  except (NotReady, RequestError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for query, per in results.items():
    print(f'query: "{query}"  ({len(engine)} images in the index)')
    for hits in per.values():
      print(format_table(hits))
      print()
  if f.png:
    print(f'wrote {write_grid(f.png, engine, results)}')
  engine.close()
  return 0


def main() -> None:
  from absl import app, flags   # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags   # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, "The run's config file (default: the one W/eval/report.json records).")
  flags.DEFINE_string('workdir', None, 'A finished run (main.py --workdir).')
  flags.DEFINE_multi_string('query', None, 'A search query (repeat for several).')
  flags.DEFINE_integer('k', None, 'Results per system (default config.serve.k).')
  flags.DEFINE_enum('system', 'all', ('all',) + SYSTEM_NAMES, 'Which system(s) to search.')
  flags.DEFINE_string('png', None, 'Also write the results as an image grid to this PNG.')
  flags.mark_flags_as_required(['workdir', 'query'])
  app.run(lambda argv: sys.exit(_cli(argv)))


if __name__ == '__main__':
  main()
