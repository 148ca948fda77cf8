"""The aesthetic scorer interface: uint8 images in, one score per image out (higher = better).

Every aesthetic model (low-level measures, the IAP head on CLIP embeddings, a judge...) is a
`Scorer`, so mining, evaluation and reports take any of them.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Scorer(Protocol):
  """Scores images: uint8 [N, H, W, 3] RGB -> float [N], higher = more aesthetic."""
  name: str

  def score(self, images: np.ndarray) -> np.ndarray:
    ...


def check_images(images: np.ndarray, who: str = "scorer") -> np.ndarray:
  """Returns `images` if it is a uint8 [N, H, W, 3] batch, else raises naming `who`."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{who}: expected uint8 images [N, H, W, 3], got {images.dtype} "
                     f"{images.shape}")
  return images


def check_scores(scores: np.ndarray, n: int, who: str = "scorer") -> np.ndarray:
  """Returns `scores` as float64 [n] if finite and of the right length, else raises."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.shape != (n,):
    raise ValueError(f"{who}: expected {n} scores, got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{who}: non-finite scores at indices {np.flatnonzero(~np.isfinite(scores))}")
  return scores


class WeightedSum:
  """A scorer that adds other scorers' scores with fixed weights.

  The scores are added as they come, with no per-batch normalisation (which would make a
  score depend on the rest of the batch), so give the parts comparable scales, e.g. both in
  [0, 1], or pick weights that rescale them.
  """

  def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float], name: str = ""):
    if len(scorers) != len(weights) or not scorers:
      raise ValueError(f"WeightedSum: {len(scorers)} scorers but {len(weights)} weights")
    self.scorers = list(scorers)
    self.weights = [float(w) for w in weights]
    self.name = name or "+".join(f"{w:g}*{s.name}" for s, w in zip(self.scorers, self.weights))

  def score(self, images: np.ndarray) -> np.ndarray:
    images = check_images(images, self.name)
    total = np.zeros(len(images), np.float64)
    for scorer, weight in zip(self.scorers, self.weights):
      total += weight * check_scores(scorer.score(images), len(images), scorer.name)
    return total
