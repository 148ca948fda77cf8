"""Aesthetic models: one Scorer interface (uint8 images -> scores, higher = better).

- lowlevel.LowLevelScorer: sharpness, noise, contrast, exposure, colourfulness, combined.
- iap.IAPScorer: the LAION improved-aesthetic-predictor MLP on CLIP image embeddings.
"""

from __future__ import annotations

from typing import Callable, Optional

import ml_collections
import numpy as np

from aesalign_jax.aesthetics import iap, lowlevel
from aesalign_jax.aesthetics.base import Scorer, WeightedSum, check_images, check_scores
from aesalign_jax.aesthetics.iap import IAPScorer
from aesalign_jax.aesthetics.lowlevel import LowLevelScorer

__all__ = ["Scorer", "WeightedSum", "LowLevelScorer", "IAPScorer", "check_images",
           "check_scores", "default_config", "make_scorer"]


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the aesthetic model (config section `aesthetics`)."""
  c = ml_collections.ConfigDict()
  # Which scorer: "lowlevel" (pixels only) or "iap" (MLP on CLIP image embeddings; needs
  # iap.weights and an embedding function).
  c.kind = "lowlevel"
  c.lowlevel = lowlevel.default_config()
  c.iap = iap.default_config()
  return c


def make_scorer(config: ml_collections.ConfigDict,
                embed_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Scorer:
  """The scorer named by `config.kind` (the `aesthetics` section).

  `embed_fn` (uint8 images -> L2-normalised CLIP image embeddings) is required for "iap".
  """
  if config.kind == "lowlevel":
    return LowLevelScorer(config.lowlevel)
  if config.kind == "iap":
    if not config.iap.weights:
      raise ValueError("aesthetics.kind is 'iap' but aesthetics.iap.weights is empty: convert "
                       "the LAION weights (convert_laion_weights.py) or train with iap.fit")
    if embed_fn is None:
      raise ValueError("aesthetics.kind 'iap' needs an embed_fn (images -> CLIP embeddings)")
    scorer = IAPScorer.from_file(config.iap.weights, embed_fn, embed_dim=config.iap.embed_dim)
    if scorer.activation != config.iap.activation:
      raise ValueError(f"{config.iap.weights}: weights are for activation "
                       f"{scorer.activation!r} but aesthetics.iap.activation is "
                       f"{config.iap.activation!r}")
    return scorer
  raise ValueError(f"aesthetics.kind must be 'lowlevel' or 'iap', got {config.kind!r}")
