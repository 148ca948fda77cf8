"""An IAP-style aesthetic predictor for the embedded world, trained on simulated ratings.

The paper's re-ranker is an aesthetic model on CLIP embeddings (IAP). The world has no LAION
ratings, so raters are simulated: each of `num_raters` sees an image's ground-truth aesthetic
plus Gaussian noise, and the image's rating is their mean (as a mean opinion score). The head is
trained with MSE on the reference model's embeddings of training images and measured on
held-out images against the ground truth, next to the low-level score (the paper's critique:
does a learned aesthetic model see more than pixels?).
"""

from __future__ import annotations

import ml_collections
import numpy as np
from scipy import stats

from aesalign_jax.aesthetics import iap, lowlevel


def default_config() -> ml_collections.ConfigDict:
  """Config section `world_iap`."""
  c = ml_collections.ConfigDict()
  c.num_train_images = 8000   # rated training images (from the world's train split)
  c.num_test_images = 2000    # held-out images (from the eval split) for the correlations
  c.num_raters = 5            # simulated raters per image
  c.rater_noise = 0.1         # std of each rater's noise on the [0, 1] ground truth
  c.steps = 1500
  c.learning_rate = 1e-3
  c.seed = 0
  return c


def simulated_ratings(truth: np.ndarray, num_raters: int, noise: float,
                      rng: np.random.Generator) -> np.ndarray:
  """Mean of `num_raters` noisy looks at the ground truth (a mean opinion score)."""
  return (truth[:, None] + rng.normal(0, noise, (len(truth), num_raters))).mean(axis=1)


def train_world_iap(world, embed_images, c) -> tuple[dict, dict]:
  """(IAP params, report) for `embed_images(uint8 [N, S, S, 3]) -> unit vectors [N, D]`.

  report: Spearman correlation with the ground truth on held-out images for the IAP head and
  for the low-level score, and the sizes used.
  """
  rng = np.random.default_rng(c.seed)
  train_idx = world.split_indices('train')[:c.num_train_images]
  test_idx = world.split_indices('eval')[:c.num_test_images]
  ratings = simulated_ratings(world.aesthetic(train_idx), c.num_raters, c.rater_noise, rng)
  train_emb = _embed(world, embed_images, train_idx)
  params, losses = iap.fit(train_emb, ratings, steps=c.steps, learning_rate=c.learning_rate,
                           seed=c.seed, batch_size=256)
  test_images = world.render_batch(test_idx)
  truth = world.aesthetic(test_idx)
  predicted = np.asarray(iap.apply(params, _embed(world, embed_images, test_idx)))
  low = lowlevel.LowLevelScorer().score(test_images)
  report = {
      'iap_spearman_vs_truth': float(stats.spearmanr(predicted, truth).statistic),
      'lowlevel_spearman_vs_truth': float(stats.spearmanr(low, truth).statistic),
      'rating_spearman_vs_truth': float(stats.spearmanr(ratings, world.aesthetic(train_idx))
                                        .statistic),
      'train_images': int(len(train_idx)), 'test_images': int(len(test_idx)),
      'final_train_mse': float(np.mean(np.asarray(losses)[-50:])),
  }
  return params, report


def _embed(world, embed_images, indices, chunk: int = 2048) -> np.ndarray:
  return np.concatenate([embed_images(world.render_batch(indices[i:i + chunk]))
                         for i in range(0, len(indices), chunk)])
