"""Low-level image quality measures and their combination into one aesthetic score.

Measures (per image, vectorised over a uint8 [N, H, W, 3] batch; luminance Y = BT.601 luma in
grey levels 0..255):
- laplacian_variance: variance of the 4-neighbour Laplacian of Y, the classic blur measure.
  It grows with the number and contrast of edges, and with noise: white noise of std s adds
  20 s^2 (the kernel's squared sum), so noise passes for detail.
- noise: std of the noise in Y. Immerkaer's mask N = [[1,-2,1],[-2,4,-2],[1,-2,1]] answers
  white noise of std s with std 6 s and is blind to linear and quadratic shading (Immerkaer
  1996); the median of |Y * N| (= 0.6745 * 6 s for noise) replaces his mean, so edges and
  texture, which raise the response only where they are, count only if they cover half the
  image. Pixels at the clipping limits, where noise is cut off, are left out.
- detail: laplacian_variance minus the noise's share 20 * noise^2 (floored at 0).
- sharpness: the ratio of Laplacian energy to gradient energy after a 0.6-pixel Gaussian
  prefilter, summed over R, G, B, each channel's white-noise share (estimated as for `noise`)
  removed: the mean squared spatial frequency of the image's structure, in 1 / pixels^2. A
  blurred step edge of width w gives about 1 / (2 (w^2 + 0.6^2)), whatever the edge's
  contrast or how many edges there are, so it compares images of different content; the
  prefilter keeps noise from swamping it, and the channels let colour edges count.
- contrast: RMS contrast, std of Y / 255, with the noise's share removed.
- brightness: mean Y / 255; clipping: fraction of pixels with Y <= 2 or Y >= 253;
  exposure: (1 - 2 |brightness - 0.5|) * (1 - clipping), 1 for a mid-grey mean, no clipping.
- colourfulness: Hasler & Suesstrunk (2003): sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 +
  mu_yb^2), with rg = R - G and yb = (R + G) / 2 - B on 0..255 values.

Combined score (`LowLevelScorer.score`, in [0, 1]): a weighted mean of five qualities in [0, 1]
(weights 0.3 sharpness, 0.3 noise, 0.15 contrast, 0.15 exposure, 0.1 colourfulness):
  q_sharp = S / (S + sharpness_half)
  q_noise = 1 / (1 + (max(noise - noise_floor, 0) / noise_half)^2)
  q_contrast = C / (C + contrast_half)     q_exposure = exposure
  q_colour = M / (M + colourfulness_half)
Each half point is the value where the quality is 0.5. Noise is penalised by its power above
a floor of 2 grey levels: fainter noise is invisible, and it is what fine texture and 8-bit
quantisation read as, so counting it would let a light blur (which removes texture) score
better than the original. Noise lowers the score twice: through q_noise, and because its share
is removed from sharpness and contrast instead of counting as detail. Colourfulness is not
noise-corrected (chroma noise raises it a little), hence its small weight.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import scipy.ndimage as ndi

from aesalign_jax.aesthetics import base

# Noise variance added to the Laplacian by white noise of unit variance: 4 * 1^2 + (-4)^2.
_LAPLACIAN_NOISE_GAIN = 20.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Median of |z| for a standard normal z (the MAD constant), Phi^-1(0.75).
_HALF_NORMAL_MEDIAN = 0.6744897501960817


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the low-level scorer (config section aesthetics.lowlevel)."""
  c = ml_collections.ConfigDict()
  # Weights of the five qualities in the combined score (normalised to sum to 1).
  c.weights = ml_collections.ConfigDict(dict(
      sharpness=0.3, noise=0.3, contrast=0.15, exposure=0.15, colourfulness=0.1))
  # Sharpness (1 / pixels^2, see `sharpness`) at which q_sharp = 0.5: about a 1-pixel blur
  # of a crisp photo.
  c.sharpness_half = 0.5
  # Noise std (grey levels) below which noise costs nothing (invisible, and what fine
  # texture reads as), and the std above that floor at which q_noise = 0.5.
  c.noise_floor = 2.0
  c.noise_half = 8.0
  # RMS contrast (Y / 255) at which q_contrast = 0.5; photos typically have 0.15-0.3.
  c.contrast_half = 0.1
  # Hasler-Suesstrunk colourfulness at which q_colour = 0.5 (their "moderately colourful").
  c.colourfulness_half = 33.0
  # Gaussian prefilter (pixels) of the sharpness measure: tames noise, keeps blur visible.
  c.sharpness_prefilter = 0.6
  # Images per chunk, to bound float32 temporaries on large images.
  c.batch_size = 64
  return c


def luminance(images: np.ndarray) -> np.ndarray:
  """BT.601 luma of uint8 RGB images, float32 [N, H, W] in grey levels 0..255."""
  return images.astype(np.float32) @ _LUMA


def laplacian(y: np.ndarray) -> np.ndarray:
  """4-neighbour Laplacian over the valid interior: [N, H, W] -> [N, H-2, W-2]."""
  c = y[:, 1:-1, 1:-1]
  return y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4.0 * c


def laplacian_variance(y: np.ndarray) -> np.ndarray:
  """Variance of the Laplacian of luminance, per image: [N, H, W] -> [N]."""
  return laplacian(y).reshape(len(y), -1).var(axis=1)


def _immerkaer_response(y: np.ndarray) -> np.ndarray:
  """|Y * N| over the valid interior, N = [[1,-2,1],[-2,4,-2],[1,-2,1]]: [N,H,W] -> [N,H-2,W-2]."""
  # The mask is separable: [1, -2, 1] along rows, then along columns.
  rows = y[:, :-2, :] - 2.0 * y[:, 1:-1, :] + y[:, 2:, :]
  return np.abs(rows[:, :, :-2] - 2.0 * rows[:, :, 1:-1] + rows[:, :, 2:])


def noise_sigma(y: np.ndarray) -> np.ndarray:
  """Noise std of luminance, robust to edges and texture: [N, H, W] -> [N] (grey levels).

  Immerkaer's mask N responds to white noise of std s with std 6 s and is blind to linear and
  quadratic shading; instead of his mean |Y * N|, the median is used (median |Y * N| =
  0.6745 * 6 s for noise), so edges and texture, which only raise the response where they
  are, do not count unless they cover half the image. Pixels at the clipping limits
  (Y <= 2 or >= 253), where noise is cut off, are left out unless all are.
  """
  resp = _immerkaer_response(y).reshape(len(y), -1)
  centre = y[:, 1:-1, 1:-1].reshape(len(y), -1)
  clipped = (centre <= 2.0) | (centre >= 253.0)
  clipped[clipped.all(axis=1)] = False
  median = np.nanmedian(np.where(clipped, np.nan, resp), axis=1)
  return median / (6.0 * _HALF_NORMAL_MEDIAN)


_GAIN_CACHE: dict[float, tuple[float, float]] = {}


def _prefilter(y: np.ndarray, sigma: float) -> np.ndarray:
  return ndi.gaussian_filter(y, (0, sigma, sigma), mode="reflect") if sigma > 0 else y


def _edge_energies(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per image, mean squared 4-neighbour Laplacian and mean squared central-difference
  gradient over the valid interior: [N, H, W] -> ([N], [N])."""
  lap = laplacian(z)
  gx = 0.5 * (z[:, 1:-1, 2:] - z[:, 1:-1, :-2])
  gy = 0.5 * (z[:, 2:, 1:-1] - z[:, :-2, 1:-1])
  n = len(z)
  return (lap**2).reshape(n, -1).mean(axis=1), (gx**2 + gy**2).reshape(n, -1).mean(axis=1)


def _noise_gains(sigma: float) -> tuple[float, float]:
  """Energies that unit white noise adds to (Laplacian, gradient) after the prefilter."""
  if sigma not in _GAIN_CACHE:
    impulse = np.zeros((1, 33, 33))
    impulse[0, 16, 16] = 1.0
    z = _prefilter(impulse, sigma)
    lap, grad = _edge_energies(z)
    pixels = 31 * 31  # the energies are means over the 31 x 31 interior
    _GAIN_CACHE[sigma] = (float(lap[0]) * pixels, float(grad[0]) * pixels)
  return _GAIN_CACHE[sigma]


def sharpness(images: np.ndarray, prefilter: float = 0.6) -> np.ndarray:
  """Content-normalised, noise-corrected sharpness: uint8 [N, H, W, 3] -> [N] (1 / pixels^2).

  The ratio of Laplacian energy to gradient energy after a light Gaussian prefilter: the mean
  squared spatial frequency of the image's structure, which falls as edges widen (about
  1 / (2 width^2) for a blurred step edge) and, unlike Laplacian variance, does not grow
  with the number or contrast of edges. Energies are summed over R, G and B, so edges between
  colours of equal luminance count too, each channel's white-noise share (from its own
  `noise_sigma`) removed: with the prefilter, this keeps noise from passing for detail.
  """
  lap_gain, grad_gain = _noise_gains(float(prefilter))
  lap_total = np.zeros(len(images))
  grad_total = np.zeros(len(images))
  for c in range(3):
    channel = images[..., c].astype(np.float32)
    var = noise_sigma(channel).astype(np.float64) ** 2
    lap, grad = _edge_energies(_prefilter(channel.astype(np.float64), float(prefilter)))
    lap_total += lap - lap_gain * var
    grad_total += grad - grad_gain * var
  # A plain image has neither energy; the floor (1 grey level^2 per pixel) makes it read 0.
  return np.maximum(lap_total, 0.0) / np.maximum(grad_total, 1.0)


def colourfulness(images: np.ndarray) -> np.ndarray:
  """Hasler & Suesstrunk (2003) colourfulness of uint8 RGB images: [N, H, W, 3] -> [N]."""
  x = images.astype(np.float32).reshape(len(images), -1, 3)
  rg = x[..., 0] - x[..., 1]
  yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
  spread = np.sqrt(rg.var(axis=1) + yb.var(axis=1))
  centre = np.sqrt(rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2)
  return spread + 0.3 * centre


def measures(images: np.ndarray, sharpness_prefilter: float = 0.6) -> dict[str, np.ndarray]:
  """All low-level measures of a uint8 [N, H, W, 3] batch (H, W >= 3), each float64 [N]."""
  images = base.check_images(images, "lowlevel.measures")
  if images.shape[1] < 3 or images.shape[2] < 3:
    raise ValueError(f"lowlevel.measures: images must be at least 3x3, got {images.shape}")
  y = luminance(images)
  flat = y.reshape(len(y), -1)
  lap_var = laplacian_variance(y).astype(np.float64)
  noise = noise_sigma(y).astype(np.float64)
  brightness = flat.mean(axis=1).astype(np.float64) / 255.0
  clipping = ((flat <= 2.0) | (flat >= 253.0)).mean(axis=1).astype(np.float64)
  contrast_var = flat.var(axis=1).astype(np.float64) / 255.0**2
  return {
      "laplacian_variance": lap_var,
      "noise": noise,
      "detail": np.maximum(lap_var - _LAPLACIAN_NOISE_GAIN * noise**2, 0.0),
      "sharpness": sharpness(images, sharpness_prefilter),
      "contrast": np.sqrt(np.maximum(contrast_var - (noise / 255.0) ** 2, 0.0)),
      "brightness": brightness,
      "clipping": clipping,
      "exposure": (1.0 - 2.0 * np.abs(brightness - 0.5)) * (1.0 - clipping),
      "colourfulness": colourfulness(images).astype(np.float64),
  }


def qualities(m: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Maps measures to the five qualities in [0, 1] that the combined score averages."""
  return {
      "sharpness": m["sharpness"] / (m["sharpness"] + config.sharpness_half),
      "noise": 1.0 / (1.0 + (np.maximum(m["noise"] - config.noise_floor, 0.0)
                             / config.noise_half) ** 2),
      "contrast": m["contrast"] / (m["contrast"] + config.contrast_half),
      "exposure": m["exposure"],
      "colourfulness": m["colourfulness"] / (m["colourfulness"] + config.colourfulness_half),
  }


class LowLevelScorer:
  """Scorer from low-level quality measures (see the module docstring for the formula)."""

  def __init__(self, config: ml_collections.ConfigDict | None = None, name: str = "lowlevel"):
    self.config = config if config is not None else default_config()
    self.name = name
    weights = dict(self.config.weights)
    unknown = set(weights) - {"sharpness", "noise", "contrast", "exposure", "colourfulness"}
    if unknown or sum(weights.values()) <= 0 or min(weights.values()) < 0:
      raise ValueError(f"aesthetics.lowlevel.weights: need non-negative weights, not all zero, "
                       f"for sharpness/noise/contrast/exposure/colourfulness; got {weights}")
    total = sum(weights.values())
    self._weights = {k: w / total for k, w in weights.items()}

  def measures(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """The raw measures (module docstring), each float64 [N], computed in chunks."""
    images = base.check_images(images, self.name)
    step = max(int(self.config.batch_size), 1)
    parts = [measures(images[i:i + step], self.config.sharpness_prefilter)
             for i in range(0, len(images), step)]
    if not parts:
      return {k: np.zeros(0) for k in measures(np.zeros((1, 3, 3, 3), np.uint8))}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def score(self, images: np.ndarray) -> np.ndarray:
    """Combined low-level quality in [0, 1], float64 [N]."""
    q = qualities(self.measures(images), self.config)
    return sum(w * q[k] for k, w in self._weights.items()) + np.zeros(len(images))
