"""D_po-format groups built from the embedded world's ground truth (input_pipeline.preference).

What a perfect mining stage would produce: used by tests and by training before a mined file
exists. See `world_groups`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from input_pipeline import world_scene as ws
from input_pipeline.preference import PreferenceGroup, positive_int

log = logging.getLogger(__name__)


def semantic_grades(query, scene) -> tuple[np.ndarray, int]:
  """How much of `query` each image of `scene` shows: (int grade [P], the full grade A).

  A query asks for a colour and a shape (and maybe a size) of one object, and maybe a
  background pattern. An object earns one point per asked object attribute it has; the
  image's grade is its best object's points plus one if the pattern is the asked one. So
  grade == A exactly when world's Query.matches holds, and lower grades are partial matches
  (e.g. for 'a red square': 1 = a red something or a square of another colour, 0 = neither).
  """
  points = ((scene.colour == ws.COLOURS.index(query.colour)).astype(np.int64)
            + (scene.shape == ws.SHAPES.index(query.shape)))
  full = 2
  if query.size is not None:
    points = points + (scene.size == ws.SIZES.index(query.size))
    full += 1
  # An absent second object has colour, shape and size -1, so it earns no point.
  grade = points.max(axis=1)
  if query.pattern is not None:
    grade = grade + (scene.pattern == ws.PATTERNS.index(query.pattern))
    full += 1
  return grade, full


def _row_grades(u: int, full: int) -> list[int]:
  """Grades of the u rows, spread from a full match (row 0) to no match (last row)."""
  if u == 1:
    return [full]
  return [full - (i * full) // (u - 1) for i in range(u)]


def _pick_chain(candidates: list[np.ndarray], aesthetic: np.ndarray, targets: np.ndarray,
                u: int, rng: np.random.Generator) -> list[int] | None:
  """Pool positions for the u*v cells in column-major order (cell b: row b % u, column
  b // u), each from its row's candidates, with strictly falling aesthetic; None if stuck.

  `aesthetic` is sorted descending and every candidate array is sorted, so "below the
  previous pick" and "near the target" are binary searches.
  """
  values_of_row = [-aesthetic[cand] for cand in candidates]  # ascending
  used: set[int] = set()
  chain: list[int] = []
  prev = np.inf
  for b, target in enumerate(targets):
    cand, values = candidates[b % u], values_of_row[b % u]
    start = int(np.searchsorted(values, -prev, side="right"))  # first with aesthetic < prev
    if start >= len(cand):
      return None
    at = min(max(int(np.searchsorted(values, -target)), start), len(cand) - 1)
    width = 4
    while True:
      lo, hi = max(start, at - width), min(len(cand), at + width)
      window = [p for p in cand[lo:hi] if p not in used]
      if window or (lo == start and hi == len(cand)):
        break
      width *= 4
    if not window:
      return None
    window.sort(key=lambda p: abs(aesthetic[p] - target))
    pick = int(window[rng.integers(min(3, len(window)))])  # one of the 3 nearest the target
    chain.append(pick)
    used.add(pick)
    prev = aesthetic[pick]
  return chain


def world_groups(world, queries: Sequence[Any], *, u: int, v: int, stride: int = 1,
                 ref_score_fn: Callable[[list[str], list[list[str]]], np.ndarray],
                 rng: np.random.Generator | int, split: str = "train",
                 rephrase: Callable[[str], str] | None = None) -> list[PreferenceGroup]:
  """D_po-format groups built from the embedded world's ground truth (one per query).

  What a perfect mining stage would produce, for tests and training before mining exists:
  - Rows (semantics): image grades from `semantic_grades` (points for the asked colour,
    shape, size, pattern). Row 0 takes full matches, the last row images that match
    nothing, the rows between evenly spaced partial grades (u = 5, 'a red square':
    grades 2, 2, 1, 1, 0). semantic_scores = grade / full, so each row is one level.
  - Columns (aesthetics): ground-truth aesthetic, best first. The cells are filled in
    column-major order (column 0 of every row, then column 1, ...) with strictly falling
    ground truth, each pick near the matching quantile of the split's aesthetics (one of the
    3 nearest, at random). So any two images of a `product` pair (row and column both at
    least as good) are at least as good on BOTH ground-truth axes: the partial order is
    true, not just plausible. aesthetic_scores = the ground truth.
  - `stride` is recorded as given (the record's field); nothing is stride-picked here.
  - rephrased_query = rephrase(query) (default: the query itself; no LLM in the loop).
  - ref_scores = ref_score_fn(query texts, image ids per group), [G, N], called once.
  - meta: builder, split, query_kind, world_index [N], gt_aesthetic [N], gt_grade [N],
    full_grade.
  Image ids are str(global world index) (world_image_lookup loads them). A query for which
  the split cannot fill the grid (too few matches) is skipped and named in a warning.
  """
  u, v, stride = (positive_int(n, x) for n, x in (("u", u), ("v", v), ("stride", stride)))
  rng = np.random.default_rng(rng)
  indices = world.split_indices(split)
  scene = world.scene(indices)
  order = np.argsort(-scene.aesthetic, kind="stable")  # pool positions, best first
  aesthetic = scene.aesthetic[order].astype(np.float64)
  n = u * v
  targets = np.quantile(aesthetic, 1.0 - (np.arange(n) + 0.5) / n)
  built, skipped = [], []
  for query in queries:
    grade, full = semantic_grades(query, scene)
    grade = grade[order]
    rows = _row_grades(u, full)
    chain = _pick_chain([np.flatnonzero(grade == g) for g in rows], aesthetic, targets, u, rng)
    if chain is None:
      skipped.append(query.text)
      continue
    grid = np.empty(n, np.int64)  # grid position k = i*v + j <- chain position b = j*u + i
    for b, p in enumerate(chain):
      grid[(b % u) * v + b // u] = p
    built.append((query, grid, grade[grid], full))
  if skipped:
    log.warning("world_groups: split %r cannot fill a %dx%d grid for %d queries, skipped: %s",
                split, u, v, len(skipped), ", ".join(repr(t) for t in skipped[:20]))
  if not built:
    return []
  ids = [[str(int(indices[order[p]])) for p in grid] for _, grid, _, _ in built]
  texts = [query.text for query, _, _, _ in built]
  ref = np.asarray(ref_score_fn(texts, ids), np.float64)
  if ref.shape != (len(built), n):
    raise ValueError(f"ref_score_fn returned shape {ref.shape}, expected [G, N] = "
                     f"{(len(built), n)}")
  groups = []
  for g, (query, grid, grades, full) in enumerate(built):
    groups.append(PreferenceGroup(
        query=query.text, rephrased_query=rephrase(query.text) if rephrase else query.text,
        image_ids=ids[g], aesthetic_scores=aesthetic[grid],
        semantic_scores=grades / full, ref_scores=ref[g], u=u, v=v, stride=stride,
        meta=dict(builder="world_groups", split=split, query_kind=query.kind,
                  world_index=[int(indices[order[p]]) for p in grid],
                  gt_aesthetic=aesthetic[grid].tolist(), gt_grade=grades.tolist(),
                  full_grade=full)))
  return groups
