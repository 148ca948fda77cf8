"""The embedded default world: a procedural, deterministic image-caption source (DESIGN.md).

Record i is a pure function of (seed, i); nothing is stored. The world knows exactly what
each image shows (one or two objects: shape, colour, size, place; a background pattern) and how
good it looks (six aesthetic factors in [0, 1] and their fixed weighted mix, the ground truth),
and it can answer both questions without drawing a pixel. Scenes and captions come from
integer hashing and float64 arithmetic; pixels are bit-identical on one machine and numpy
build (another CPU's float kernels may move a rare pixel by one grey level). Details live in
world_scene.py (what a scene is, the factor definitions, AESTHETIC_WEIGHTS), world_render.py
(pixels) and world_text.py (captions, aesthetic words, queries); this is the public face.

Records (`world[i]`, also through grain: `grain.MapDataset.source(world.split("train"))`;
`world.batch(indices)` stacks them, the fast path for grain, see its docstring):
  'index'       int64 scalar: the global record index i
  'image'       uint8 [S, S, 3] RGB
  'caption'     str
  'factors'     float32 [F], order FACTOR_NAMES, each in [0, 1], higher = better
  'aesthetic'   float32 scalar: the ground truth, sum_f AESTHETIC_WEIGHTS[f] * factors[f]
  'num_objects' int32 scalar, 1 or 2 (object 0 is the subject)
  'shapes', 'colours', 'sizes'  int32 [2]: indices into SHAPES, COLOURS, SIZES; -1 = absent
  'centres'     float32 [2, 2]: object centres (x, y) as fractions of the side
  'pattern'     int32 scalar: index into PATTERNS

Splits: indices [0, num_train) are 'train' (pretraining), the next num_eval are 'eval' (the
retrieval corpus of the evaluation) and the next num_hpir_pool are 'hpir' (the pool the
HPIR-format benchmark draws from), so no evaluation image is ever seen in pretraining.

Queries: world.mining_queries and world.eval_queries (disjoint; Query objects with text and
attributes); relevance: world.is_relevant(query, indices) / world.relevance(queries, indices).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np

from input_pipeline import world_render
from input_pipeline import world_scene
from input_pipeline import world_text
from input_pipeline.world_scene import (  # noqa: F401  (re-exported vocabulary)
    AESTHETIC_WEIGHTS, COLOURS, EXPOSURE_MODES, FACTOR_NAMES, LOW_LEVEL_FACTORS, PATTERNS,
    SHAPES, SIZES, Scene, aesthetic_from_factors)
from input_pipeline.world_text import (  # noqa: F401
    AESTHETIC_WORDS, OVERALL_WORDS, SIZE_WORDS, Query, all_queries, find_aesthetic_phrases)

SPLITS = ("train", "eval", "hpir")


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the embedded world (config section `world`)."""
  c = ml_collections.ConfigDict()
  # Every record, query split and pixel derives from this seed (and the record index).
  c.seed = 0
  # Side of the square images in pixels. 32 suits the tiny CPU model (ViT patch 8); the
  # geometry is in fractions of the side, so 64 or 224 draw the same scenes, finer.
  c.image_size = 32
  # Records [0, num_train) are for pretraining and the alignment's contrastive batches.
  c.num_train = 200_000
  # The next num_eval records are the held-out retrieval corpus of the evaluation.
  c.num_eval = 5_000
  # The next num_hpir_pool records are the pool the HPIR-format benchmark draws groups from.
  c.num_hpir_pool = 20_000
  # Fraction of images with a second object (besides the subject).
  c.two_object_fraction = 0.3
  # Fraction of captions that also carry aesthetic words following the true factors.
  c.aesthetic_caption_fraction = 0.3
  # Queries in use (at most 336: 48 colour+shape, 96 size+colour+shape, 192 colour+shape+
  # pattern); the first num_eval_queries of them are held out for evaluation, the rest are
  # the mining queries. The split is stratified by query kind and fixed by the seed.
  c.num_queries = 336
  c.num_eval_queries = 136
  # Worst blur: Gaussian sigma as a fraction of the side (1.1 px at 32) at sharpness 0.
  c.max_blur_sigma = 0.035
  # Worst sensor noise: std on the [0, 1] scale (20 grey levels) at noise factor 0.
  c.max_noise_std = 0.08
  # Clutter strokes at clutter factor 0 (none at 1).
  c.max_distractors = 10
  return c


def _as_indices(indices) -> tuple[np.ndarray, bool]:
  arr = np.asarray(indices)
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"world indices must be integers, got dtype {arr.dtype}")
  return arr.astype(np.int64).reshape(-1), arr.ndim == 0


class World:
  """The embedded world: random access to records, semantics, aesthetics and queries."""

  def __init__(self, config: ml_collections.ConfigDict | None = None, **overrides):
    """`config` is the `world` section (default_config() if None); kwargs override keys."""
    c = default_config()
    given = dict(config) if config is not None else {}
    given.update(overrides)
    unknown = sorted(set(given) - set(c.keys()))
    if unknown:
      raise ValueError(f"world config: unknown key(s) {unknown}; known: {sorted(c.keys())}")
    c.update(given)
    for key in ("image_size", "num_train", "num_eval", "num_hpir_pool"):
      if int(c[key]) < (1 if key == "image_size" else 0):
        raise ValueError(f"world config: {key} must be positive, got {c[key]}")
    for key in ("two_object_fraction", "aesthetic_caption_fraction"):
      if not 0.0 <= float(c[key]) <= 1.0:
        raise ValueError(f"world config: {key} must be in [0, 1], got {c[key]}")
    self.config = c
    self.seed = int(c.seed)
    self.image_size = int(c.image_size)
    self.mining_queries, self.eval_queries = world_text.split_queries(
        self.seed, int(c.num_queries), int(c.num_eval_queries))
    sizes = (int(c.num_train), int(c.num_eval), int(c.num_hpir_pool))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    self._ranges = {name: (int(starts[j]), int(starts[j + 1])) for j, name in enumerate(SPLITS)}

  # --- sizes and splits -----------------------------------------------------------------
  def __len__(self) -> int:
    return self._ranges["hpir"][1]

  def split_range(self, name: str) -> tuple[int, int]:
    """[start, stop) of a split's global indices."""
    if name not in self._ranges:
      raise ValueError(f"unknown world split {name!r}; splits: {SPLITS}")
    return self._ranges[name]

  def split_indices(self, name: str) -> np.ndarray:
    """The global indices of a split, int64."""
    return np.arange(*self.split_range(name), dtype=np.int64)

  def split(self, name: str) -> "WorldSplit":
    """A grain-ready random-access source over one split (its item j is world[start + j])."""
    return WorldSplit(self, *self.split_range(name))

  # --- semantics and aesthetics, without pixels --------------------------------------------
  def scene(self, indices, overrides: dict | None = None) -> Scene:
    """Columnar scenes of `indices` (vectorised; no pixels). See world_scene.Scene."""
    idx, _ = _as_indices(indices)
    return world_scene.sample_scenes(
        self.seed, idx, two_object_fraction=float(self.config.two_object_fraction),
        max_distractors=int(self.config.max_distractors), overrides=overrides)

  def semantics(self, index: int) -> dict:
    """Readable attributes of one record: objects (shape, colour, size, centre), pattern."""
    s = self.scene(index)
    objects = [dict(shape=SHAPES[s.shape[0, k]], colour=COLOURS[s.colour[0, k]],
                    size=SIZES[s.size[0, k]], centre=tuple(float(v) for v in s.centre[0, k]))
               for k in range(int(s.num_objects[0]))]
    return dict(index=int(index), objects=objects, pattern=PATTERNS[s.pattern[0]],
                background="dark" if s.dark_background[0] else "light",
                exposure_mode=EXPOSURE_MODES[s.exposure_mode[0]],
                num_distractors=int(s.num_distractors[0]))

  def factors(self, indices) -> np.ndarray:
    """float32 [N, F] (or [F] for one int index), order FACTOR_NAMES, no pixels."""
    idx, scalar = _as_indices(indices)
    f = self.scene(idx).factors
    return f[0] if scalar else f

  def aesthetic(self, indices) -> np.ndarray:
    """Ground-truth aesthetic, float32 [N] (or a scalar for one int index), no pixels."""
    idx, scalar = _as_indices(indices)
    a = self.scene(idx).aesthetic
    return a[0] if scalar else a

  def captions(self, indices) -> list[str]:
    """Captions of `indices` (no pixels)."""
    idx, _ = _as_indices(indices)
    return world_text.captions(self.scene(idx), self.seed,
                               float(self.config.aesthetic_caption_fraction))

  # --- queries and relevance -----------------------------------------------------------
  @property
  def queries(self) -> list[Query]:
    """Mining then evaluation queries."""
    return self.mining_queries + self.eval_queries

  def is_relevant(self, query: Query, indices) -> np.ndarray | bool:
    """Whether each image matches the query (bool [N], or a bool for one int index)."""
    idx, scalar = _as_indices(indices)
    hit = query.matches(self.scene(idx))
    return bool(hit[0]) if scalar else hit

  def relevance(self, queries: Sequence[Query], indices) -> np.ndarray:
    """bool [Q, N]: relevance of every query to every image, the scenes sampled once."""
    idx, _ = _as_indices(indices)
    scene = self.scene(idx)
    return np.stack([q.matches(scene) for q in queries]) if queries else np.zeros(
        (0, len(idx)), bool)

  # --- pixels and records ----------------------------------------------------------------
  def render_batch(self, indices, overrides: dict | None = None) -> np.ndarray:
    """uint8 [N, S, S, 3] images of `indices`, rendered in one vectorised pass.

    `overrides` ({factor name: value or [N] values}) re-renders the same scenes with chosen
    factor values, everything else unchanged (for controlled measurements).
    """
    c = self.config
    return world_render.render(
        self.scene(indices, overrides), seed=self.seed, image_size=self.image_size,
        max_blur_sigma=float(c.max_blur_sigma), max_noise_std=float(c.max_noise_std),
        max_distractors=int(c.max_distractors))

  def batch(self, indices) -> dict:
    """The records of `indices` stacked: the module docstring's keys with a leading [N] axis
    ('caption' a numpy str array), rendered in one vectorised pass.

    The fast grain chain batches indices first and renders each batch at once:
      grain.MapDataset.range(*world.split_range("train")).shuffle(seed).batch(n)
          .map(world.batch)
    (grain 0.2 fetches a batch of a record source one record at a time, which is 6x slower.)
    """
    idx, _ = _as_indices(indices)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
      bad = idx[(idx < 0) | (idx >= len(self))][0]
      raise IndexError(f"world record {bad} out of range [0, {len(self)})")
    scene = self.scene(idx)
    c = self.config
    images = world_render.render(
        scene, seed=self.seed, image_size=self.image_size,
        max_blur_sigma=float(c.max_blur_sigma), max_noise_std=float(c.max_noise_std),
        max_distractors=int(c.max_distractors))
    texts = world_text.captions(scene, self.seed, float(c.aesthetic_caption_fraction))
    return dict(index=idx, image=images, caption=np.asarray(texts, dtype=str),
                factors=scene.factors, aesthetic=scene.aesthetic,
                num_objects=scene.num_objects, shapes=scene.shape, colours=scene.colour,
                sizes=scene.size, centres=scene.centre.astype(np.float32),
                pattern=scene.pattern)

  def records(self, indices) -> list[dict]:
    """Full records (see the module docstring) of `indices`, rendered as one batch."""
    stacked = self.batch(indices)
    out = []
    for j in range(len(stacked["index"])):
      rec = {k: v[j] for k, v in stacked.items()}
      rec["caption"] = str(rec["caption"])
      out.append(rec)
    return out

  def __getitem__(self, index: int) -> dict:
    return self.records([int(index)])[0]

  def _getitems(self, indices: Sequence[int]) -> list[dict]:
    """Batched read (grain's SupportsBatchedReadRandomAccessDataSource): one render pass."""
    return self.records(np.asarray(indices, np.int64))

  def __repr__(self) -> str:
    c = self.config
    return (f"World(seed={self.seed}, image_size={self.image_size}, "
            f"train={c.num_train}, eval={c.num_eval}, hpir_pool={c.num_hpir_pool})")


class WorldSplit:
  """A random-access source over world records [start, stop): item j is world[start + j]."""

  def __init__(self, world: World, start: int, stop: int):
    self.world, self.start, self.stop = world, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  @property
  def indices(self) -> np.ndarray:
    """The global indices of this split."""
    return np.arange(self.start, self.stop, dtype=np.int64)

  def _global(self, local) -> np.ndarray:
    local = np.asarray(local, np.int64).reshape(-1)
    if len(local) and (local.min() < 0 or local.max() >= len(self)):
      raise IndexError(f"world split item {local.max()} out of range [0, {len(self)})")
    return local + self.start

  def __getitem__(self, j: int) -> dict:
    return self.world.records(self._global([int(j)]))[0]

  def _getitems(self, indices: Sequence[int]) -> list[dict]:
    return self.world.records(self._global(indices))

  def __repr__(self) -> str:
    return f"WorldSplit({self.world!r}, [{self.start}, {self.stop}))"
