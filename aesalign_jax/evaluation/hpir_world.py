"""An HPIR-format benchmark drawn from the embedded world, labelled by simulated annotators.

For each evaluation query the generator draws groups of images from the world's 'hpir' split
(never used in training, and apart from the retrieval 'eval' split) and writes items in the
format of aesalign_jax/evaluation/hpir.py:
- aesthetic items: both groups wholly relevant, their mean ground-truth aesthetic differs by a
  varied margin (groups are thirds of a draw of 3 x group_size relevant images sorted by
  aesthetic: best third against worst, or neighbouring thirds for a closer call);
- accuracy items: one group wholly relevant, the other with 0 .. group_size - 1 relevant
  images, the rest near misses (same colour or same shape as the query) where the pool has them.
Both aspects are labelled on every item where the groups' truths differ. The truth of a group
is its fraction of relevant images (accuracy) and its mean ground-truth aesthetic (aesthetic).
Each of num_annotators annotators sees each group's truth plus Gaussian noise (std
accuracy_noise or aesthetic_noise) and votes for the higher; the majority is the label and the
majority's share of the votes (in [0.5, 1], with an odd number of annotators) the confidence.
An aspect whose truths tie exactly (accuracy on an aesthetic item) is left unlabelled.

Output: <out_dir>/<filename> (JSON Lines) and one PNG per world image under
<out_dir>/images/, referenced relative to the JSONL file, so the same loader and scorer serve
real photographs. Each item's meta holds its world indices, truths and votes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from aesalign_jax.evaluation import hpir
from input_pipeline import world as world_lib

logger = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the world's HPIR benchmark generator (config section `hpir_world`)."""
  c = ml_collections.ConfigDict()
  # Seeds the draws of groups and the annotators' noise (the world has its own seed).
  c.seed = 0
  # Images per group (HPIR compares groups of retrieved results, not single images).
  c.group_size = 4
  # Items per evaluation query of each kind.
  c.aesthetic_items_per_query = 2
  c.accuracy_items_per_query = 1
  # Simulated annotators per item; odd, so a majority always exists.
  c.num_annotators = 5
  # Std of the noise each annotator adds to a group's true mean aesthetic (the ground truth
  # is in [0, 1], std about 0.12 over images) and to its true fraction of relevant images.
  c.aesthetic_noise = 0.08
  c.accuracy_noise = 0.15
  # Use only the first num_queries evaluation queries (0 = all of them).
  c.num_queries = 0
  # File name of the JSON Lines file inside the output folder.
  c.filename = "hpir.jsonl"
  return c


def annotate(truth_a: float, truth_b: float, num_annotators: int, noise: float,
             rng: np.random.Generator) -> tuple[hpir.AspectLabel | None, tuple[int, int]]:
  """Votes of simulated annotators on one aspect: (label or None on a true tie, (A, B) votes).

  Each annotator perceives each group's truth plus N(0, noise^2) and prefers the higher.
  """
  if truth_a == truth_b:
    return None, (0, 0)
  seen = np.array([truth_a, truth_b]) + noise * rng.standard_normal((num_annotators, 2))
  votes_a = int((seen[:, 0] > seen[:, 1]).sum())
  votes_b = num_annotators - votes_a
  preferred = "A" if votes_a > votes_b else "B"
  return hpir.AspectLabel(preferred, max(votes_a, votes_b) / num_annotators), (votes_a, votes_b)


def _near_misses(world, query, scene):
  """Irrelevant images that share the query's colour or shape (the confusable ones)."""
  colour = (scene.colour == world_lib.COLOURS.index(query.colour)).any(1)
  shape = (scene.shape == world_lib.SHAPES.index(query.shape)).any(1)
  return colour | shape


def _aesthetic_groups(relevant, aesthetic, g, item, rng):
  """Two groups cut from 3g relevant images sorted by aesthetic: thirds 1 v 3 (a clear
  margin) on even items, thirds 1 v 2 or 2 v 3 (a closer call) on odd ones."""
  draw = rng.choice(relevant, size=3 * g, replace=False)
  thirds = draw[np.argsort(-aesthetic[draw], kind="stable")].reshape(3, g)
  if item % 2 == 0:
    return thirds[0], thirds[2]
  return (thirds[0], thirds[1]) if rng.random() < 0.5 else (thirds[1], thirds[2])


def _accuracy_groups(relevant, irrelevant, near, g, rng):
  num_rel = int(rng.integers(0, g))  # relevant images in the worse group: a varied margin
  good = rng.choice(relevant, size=g, replace=False)
  rest = np.setdiff1d(relevant, good)
  negatives = near if len(near) >= g - num_rel else irrelevant
  bad = np.concatenate([rng.choice(rest, size=num_rel, replace=False),
                        rng.choice(negatives, size=g - num_rel, replace=False)])
  return good, rng.permutation(bad)


def generate_hpir(world: world_lib.World, out_dir: str | os.PathLike,
                  config: ml_collections.ConfigDict | None = None) -> Path:
  """Writes the benchmark for the world's evaluation queries under out_dir; returns the path.

  Queries whose pool holds too few relevant images for two groups are skipped, counted and
  named in a warning.
  """
  c = default_config()
  given = dict(config) if config is not None else {}
  unknown = sorted(set(given) - set(c.keys()))
  if unknown:
    raise ValueError(f"hpir_world config: unknown key(s) {unknown}; known: {sorted(c.keys())}")
  c.update(given)
  g, n_ann = int(c.group_size), int(c.num_annotators)
  if g < 1 or n_ann < 1 or n_ann % 2 == 0:
    raise ValueError(f"hpir_world config: group_size ({g}) must be >= 1 and num_annotators "
                     f"({n_ann}) odd and >= 1")
  out_dir = Path(out_dir)
  pool = world.split_indices("hpir")
  if len(pool) == 0:
    raise ValueError("hpir_world: the world's 'hpir' split is empty (world.num_hpir_pool)")
  scene = world.scene(pool)
  aesthetic = np.zeros(len(world), np.float64)
  aesthetic[pool] = scene.aesthetic
  queries = world.eval_queries[:int(c.num_queries)] if int(c.num_queries) > 0 else (
      world.eval_queries)
  items, used, skipped = [], set(), []
  for qi, query in enumerate(queries):
    rng = np.random.default_rng([int(c.seed) % 2**63, qi])
    is_rel = query.matches(scene)
    relevant, irrelevant = pool[is_rel], pool[~is_rel]
    near = pool[~is_rel & _near_misses(world, query, scene)]
    if len(relevant) < 3 * g or len(irrelevant) < g:
      skipped.append(query.text)
      continue
    kinds = (["aesthetic"] * int(c.aesthetic_items_per_query)
             + ["accuracy"] * int(c.accuracy_items_per_query))
    for t, kind in enumerate(kinds):
      if kind == "aesthetic":
        first, second = _aesthetic_groups(relevant, aesthetic, g, t, rng)
      else:
        first, second = _accuracy_groups(relevant, irrelevant, near, g, rng)
      if rng.random() < 0.5:  # the better group is A or B at random
        first, second = second, first
      truths = {
          "accuracy": (float(np.isin(first, relevant).mean()),
                       float(np.isin(second, relevant).mean())),
          "aesthetic": (float(aesthetic[first].mean()), float(aesthetic[second].mean())),
      }
      labels, votes = {}, {}
      for aspect, (ta, tb) in truths.items():
        noise = float(c.aesthetic_noise if aspect == "aesthetic" else c.accuracy_noise)
        label, v = annotate(ta, tb, n_ann, noise, rng)
        if label is not None:
          labels[aspect], votes[aspect] = label, list(v)
      used.update(first.tolist())
      used.update(second.tolist())
      items.append(hpir.HPIRItem(
          query=query.text, group_a=[_image_ref(i) for i in first],
          group_b=[_image_ref(i) for i in second], labels=labels, id=f"q{qi:03d}-{t}",
          meta={"kind": kind, "world_indices_a": first.tolist(),
                "world_indices_b": second.tolist(), "truth": truths, "votes": votes}))
  if skipped:
    logger.warning("hpir_world: skipped %d of %d queries with fewer than %d relevant images "
                   "in the pool of %d: %s", len(skipped), len(queries), 3 * g,
                   len(pool), "; ".join(skipped[:20]))
  _write_images(world, out_dir, np.array(sorted(used), np.int64))
  path = out_dir / str(c.filename)
  hpir.write_hpir(path, items)
  logger.info("hpir_world: wrote %d items for %d queries and %d images to %s", len(items),
              len(queries) - len(skipped), len(used), path)
  return path


def _image_ref(index) -> str:
  return f"images/{int(index):08d}.png"


def _write_images(world, out_dir: Path, indices: np.ndarray, batch: int = 512) -> None:
  (out_dir / "images").mkdir(parents=True, exist_ok=True)
  for start in range(0, len(indices), batch):
    chunk = indices[start:start + batch]
    for index, image in zip(chunk, world.render_batch(chunk)):
      Image.fromarray(image).save(out_dir / _image_ref(index))
