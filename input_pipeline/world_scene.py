"""The embedded world's scene sampler: what image i shows and how good it looks, no pixels.

Every number of record i comes from a counter-based hash of (seed, i, stream, slot)
(splitmix64), so a scene is a pure function of (seed, i), any set of indices is sampled in one
vectorised pass, and the answer for i does not depend on which other indices share the call.
Pixels (input_pipeline/world_render.py) and captions (input_pipeline/world_text.py) are drawn
from the same scene.

Geometry is in fractions of the image side, so a scene is the same at every image size.

Aesthetic factors (FACTOR_NAMES), each in [0, 1], higher = better:
- sharpness: 1 - blur; the render blurs with Gaussian sigma (1 - sharpness) * max_blur_sigma
  (a fraction of the image side).
- noise: 1 - grain; the render adds Gaussian noise of std (1 - noise) * max_noise_std.
- exposure: 1 - deviation from a good exposure; the deviation (1 - exposure) is applied in one
  of three modes (EXPOSURE_MODES): dark (gain below 1), bright (washed out towards white), or
  flat (contrast squeezed towards mid grey).
- harmony: how well the background's palette goes with the objects:
    0.6 * (1 - mean_k w_k * huedist(object_k, background) / 180deg)
  + 0.4 * (1 - (background saturation - 0.1) / 0.8)
  with w_k the objects' area shares: analogous hues on a muted background are harmonious,
  complementary hues on a saturated background clash.
- composition: framing * balance. framing = min over objects of
  clip((e_k - 0.7) / 0.4, 0, 1), where e_k is the distance from object k's centre to the
  nearest frame edge in units of its radius (e = 0.7: 30% of the radius is cut off by the
  edge, the worst the world draws; e >= 1.1: inside with a margin). balance =
  1 - clip(|group centre - image centre| / 0.3, 0, 1): a subject pushed into a corner is
  badly placed even when whole.
- clutter: 1 - (distractor strokes) / max_distractors; strokes are drawn behind the objects
  so they never hide the subject.
Ground truth: aesthetic = sum_f AESTHETIC_WEIGHTS[f] * factor_f (weights sum to 1).

Sharpness, noise and exposure are sampled uniformly and realised exactly. Harmony, composition
and clutter are sampled as uniform targets, realised through the scene (background colour,
placement, number of strokes), and the factor reported is the value the scene actually has.
Semantics (shapes, colours, sizes, background pattern) are drawn independently of aesthetics.
"""

from __future__ import annotations

import dataclasses
import colorsys

import numpy as np

FACTOR_NAMES = ("sharpness", "noise", "exposure", "harmony", "composition", "clutter")
# The ground truth is this fixed mix. Low-level factors (sharpness, noise, exposure) carry
# 0.45, scene-level ones 0.55, so a scorer that sees only pixel statistics can explain less
# than half of the ground truth, as in the paper's critique of aesthetic re-rankers.
AESTHETIC_WEIGHTS = {
    "sharpness": 0.15, "noise": 0.15, "exposure": 0.15,
    "harmony": 0.20, "composition": 0.20, "clutter": 0.15,
}
LOW_LEVEL_FACTORS = ("sharpness", "noise", "exposure")

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
# Vivid object colours (RGB in [0, 1]) and their hues in degrees (for harmony).
COLOUR_RGB = np.array([
    (0.90, 0.12, 0.10), (0.98, 0.55, 0.08), (0.98, 0.90, 0.15), (0.15, 0.75, 0.20),
    (0.10, 0.80, 0.85), (0.12, 0.25, 0.90), (0.55, 0.18, 0.80), (0.98, 0.45, 0.75)],
    np.float64)
COLOUR_HUE = np.array([colorsys.rgb_to_hsv(*c)[0] * 360.0 for c in COLOUR_RGB])
SIZES = ("small", "large")
# Bounding radius of an object, as a fraction of the image side. The small size keeps a
# subject about 12 px across at 32x32, whole enough to recognise at the worst degradation.
SIZE_RADIUS = np.array([0.18, 0.28])
PATTERNS = ("plain", "striped", "checkered", "dotted")
EXPOSURE_MODES = ("dark", "bright", "flat")
MAX_OBJECTS = 2

# A background is dark or light, whichever keeps the subject readable by luminance alone
# (a harmonious background shares the subject's hue, so hue cannot carry the contrast):
# subjects of luma > 0.45 (orange, yellow, green, cyan, pink) sit on dark backgrounds, the
# others (red, blue, purple) on light ones.
_COLOUR_LUMA = COLOUR_RGB @ np.array([0.2126, 0.7152, 0.0722])
_DARK_BG = _COLOUR_LUMA > 0.45

# Framing and placement constants of the composition factor (see the module docstring).
EDGE_MIN, EDGE_GOOD, BALANCE_RANGE = 0.7, 1.1, 0.3
_LAYOUT_CANDIDATES = 16
_DIRECTIONS = np.stack([np.cos(np.arange(64) * np.pi / 32),
                        np.sin(np.arange(64) * np.pi / 32)], 1)
_MAX_ROTATION = np.deg2rad(12.0)
_BG_SAT_MIN, _BG_SAT_MAX = 0.1, 0.9

# Hash streams: one per purpose, so adding draws to one never shifts the others.
STREAM_OBJECTS, STREAM_BACKGROUND, STREAM_FACTORS, STREAM_LAYOUT = 1, 2, 3, 4
STREAM_DISTRACTORS, STREAM_CAPTION, STREAM_NOISE = 5, 6, 7

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective, well-mixing map of uint64 arrays."""
  z = (z ^ (z >> np.uint64(30))) * _MIX1
  z = (z ^ (z >> np.uint64(27))) * _MIX2
  return z ^ (z >> np.uint64(31))


def uniforms(seed: int, indices: np.ndarray, stream: int, n: int) -> np.ndarray:
  """Uniform [0, 1) float64 [N, n]: slot j of `stream` for each record, from (seed, i) only."""
  idx = np.atleast_1d(np.asarray(indices)).astype(np.uint64)
  with np.errstate(over="ignore"):
    key = _mix64(np.full(idx.shape, np.uint64(seed % 2**64)) + _GOLDEN)
    key = _mix64((key ^ idx) + _GOLDEN)
    key = _mix64((key ^ np.uint64(stream)) + _GOLDEN)
    slots = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
    bits = _mix64(key[:, None] + slots[None, :])
  return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclasses.dataclass
class Scene:
  """Columnar description of N scenes (absent second objects hold -1 / 0)."""
  index: np.ndarray          # int64 [N]
  num_objects: np.ndarray    # int32 [N], 1 or 2; object 0 is the subject
  shape: np.ndarray          # int32 [N, 2], index into SHAPES, -1 if absent
  colour: np.ndarray         # int32 [N, 2], index into COLOURS, -1 if absent
  size: np.ndarray           # int32 [N, 2], index into SIZES, -1 if absent
  radius: np.ndarray         # float64 [N, 2], bounding radius / image side, 0 if absent
  centre: np.ndarray         # float64 [N, 2, 2], (x, y) / image side
  rotation: np.ndarray       # float64 [N, 2], radians
  pattern: np.ndarray        # int32 [N], index into PATTERNS
  dark_background: np.ndarray  # bool [N]
  background_hsv: np.ndarray   # float64 [N, 3], hue in [0, 1)
  exposure_mode: np.ndarray    # int32 [N], index into EXPOSURE_MODES
  num_distractors: np.ndarray  # int32 [N]
  factors: np.ndarray          # float32 [N, F], order FACTOR_NAMES
  aesthetic: np.ndarray        # float32 [N], the ground truth

  def __len__(self) -> int:
    return len(self.index)


def aesthetic_from_factors(factors: np.ndarray) -> np.ndarray:
  """The ground truth: the AESTHETIC_WEIGHTS mix of factors [..., F] (order FACTOR_NAMES)."""
  w = np.array([AESTHETIC_WEIGHTS[f] for f in FACTOR_NAMES], np.float64)
  return (np.asarray(factors, np.float64) @ w).astype(np.float32)


def _hue_distance(a_deg: np.ndarray, b_deg: np.ndarray) -> np.ndarray:
  d = np.abs(a_deg - b_deg) % 360.0
  return np.minimum(d, 360.0 - d)


def _layout(u: np.ndarray, radius: np.ndarray, two: np.ndarray, target: np.ndarray):
  """Places the objects; returns (centres [N,2,2], composition [N]).

  Candidate layouts move the objects' group centre from the image centre (t = 0) towards the
  edge (t = 1) in a random direction; a second object sits beside the subject on a random
  axis, their area-weighted centroid on the group centre. Candidates that cut an object by
  more than 30% of its radius are refused; of the rest, the one whose composition is closest
  to the target wins.
  """
  n, k = len(radius), _LAYOUT_CANDIDATES
  t = (np.arange(k)[None, :] + u[:, :k]) / k
  t[:, 0] = 0.0
  # Directions from a 64-entry table: as good as continuous angles here, and no trig calls.
  a = (u[:, k:2 * k] * len(_DIRECTIONS)).astype(np.int64)
  phi = (u[:, 2 * k:3 * k] * len(_DIRECTIONS)).astype(np.int64)
  gx, gy = 0.5 + 0.5 * t * _DIRECTIONS[a, 0], 0.5 + 0.5 * t * _DIRECTIONS[a, 1]  # [N, K]
  r1, r2 = radius[:, :1], np.where(two, radius[:, 1], 0.0)[:, None]
  w1 = r1**2 / (r1**2 + r2**2)
  sep = (r1 + r2) * 1.08 * two[:, None]
  ax, ay = _DIRECTIONS[phi, 0], _DIRECTIONS[phi, 1]
  c1x, c1y = gx - (1 - w1) * sep * ax, gy - (1 - w1) * sep * ay
  c2x, c2y = gx + w1 * sep * ax, gy + w1 * sep * ay

  def edge(cx, cy):
    return np.minimum(np.minimum(cx, 1 - cx), np.minimum(cy, 1 - cy))

  e = edge(c1x, c1y) / r1
  e = np.where(two[:, None], np.minimum(e, edge(c2x, c2y) / np.maximum(r2, 1e-9)), e)
  framing = np.clip((e - EDGE_MIN) / (EDGE_GOOD - EDGE_MIN), 0.0, 1.0)
  balance = 1.0 - np.clip(np.hypot(gx - 0.5, gy - 0.5) / BALANCE_RANGE, 0.0, 1.0)
  comp = framing * balance
  valid = e >= EDGE_MIN - 1e-9
  cost = np.where(valid, np.abs(comp - target[:, None]), np.inf)
  # If no candidate is valid (not expected), fall back to the least-cut one.
  best = np.where(valid.any(1), cost.argmin(1), e.argmax(1))[:, None]
  pick = lambda v: np.take_along_axis(v, best, 1)[:, 0]
  centres = np.stack([np.stack([pick(c1x), pick(c1y)], -1),
                      np.stack([pick(c2x), pick(c2y)], -1)], 1)
  return centres, pick(comp)


_CHUNK = 4096  # records per pass: keeps the [chunk, candidates] temporaries in cache


def sample_scenes(seed: int, indices, *, two_object_fraction: float, max_distractors: int,
                  overrides: dict | None = None) -> Scene:
  """The scenes of records `indices` (vectorised). `overrides` maps factor names to values.

  An override replaces a factor's sampled value (or target, for harmony, composition and
  clutter) before the scene is realised, leaving everything else as drawn: e.g. the same
  image at ten blur levels, or with only the background changed to clash. A value is a
  scalar or one value per index.
  """
  idx = np.atleast_1d(np.asarray(indices, np.int64))
  n = len(idx)
  if n and idx.min() < 0:
    raise ValueError(f"world record indices must be >= 0, got {idx.min()}")
  overrides = dict(overrides or {})
  for name, value in overrides.items():
    if name not in FACTOR_NAMES:
      raise ValueError(f"unknown factor override {name!r}; factors: {FACTOR_NAMES}")
    value = np.broadcast_to(np.asarray(value, np.float64), (n,))
    if np.any((value < 0) | (value > 1)):
      raise ValueError(f"override {name!r} must be in [0, 1]")
    overrides[name] = value
  if n <= _CHUNK:
    return _sample(seed, idx, two_object_fraction, max_distractors, overrides)
  parts = [_sample(seed, idx[s:s + _CHUNK], two_object_fraction, max_distractors,
                   {k: v[s:s + _CHUNK] for k, v in overrides.items()})
           for s in range(0, n, _CHUNK)]
  return Scene(**{f: np.concatenate([getattr(p, f) for p in parts])
                  for f in Scene.__dataclass_fields__})


def _sample(seed, idx, two_object_fraction, max_distractors, overrides) -> Scene:
  n = len(idx)
  uo = uniforms(seed, idx, STREAM_OBJECTS, 10)
  ub = uniforms(seed, idx, STREAM_BACKGROUND, 6)
  uf = uniforms(seed, idx, STREAM_FACTORS, 8)
  ul = uniforms(seed, idx, STREAM_LAYOUT, 3 * _LAYOUT_CANDIDATES)

  two = uo[:, 0] < two_object_fraction
  num_objects = np.where(two, 2, 1).astype(np.int32)
  shape = np.floor(uo[:, 1:3] * len(SHAPES)).astype(np.int32)
  colour = np.floor(uo[:, 3:5] * len(COLOURS)).astype(np.int32)
  size = np.floor(uo[:, 5:7] * len(SIZES)).astype(np.int32)
  rotation = (2 * uo[:, 7:9] - 1) * _MAX_ROTATION
  absent = ~two
  for arr in (shape, colour, size):
    arr[absent, 1] = -1
  rotation[absent, 1] = 0.0
  radius = np.where(size >= 0, SIZE_RADIUS[np.maximum(size, 0)], 0.0)

  targets = {name: uf[:, j] for j, name in enumerate(FACTOR_NAMES)}
  targets.update(overrides)
  exposure_mode = np.floor(uf[:, 6] * len(EXPOSURE_MODES)).astype(np.int32)

  # Background pattern and tone: semantics, independent of aesthetics.
  pattern = np.floor(ub[:, 0] * len(PATTERNS)).astype(np.int32)
  c0 = colour[:, 0]
  dark = _DARK_BG[c0]
  value = np.where(dark, 0.15 + 0.13 * ub[:, 2], 0.82 + 0.13 * ub[:, 2])

  # Harmony: the background hue moves away from the subject's as the target falls, and its
  # saturation rises.
  h_target = targets["harmony"]
  sign = np.where(ub[:, 3] < 0.5, -1.0, 1.0)
  bg_hue = (COLOUR_HUE[c0] + sign * (1 - h_target) * 180.0 + (ub[:, 4] - 0.5) * 16.0) % 360.0
  bg_sat = np.clip(_BG_SAT_MIN + 0.8 * (1 - h_target) + (ub[:, 5] - 0.5) * 0.08,
                   _BG_SAT_MIN, _BG_SAT_MAX)
  area = np.where(size >= 0, radius**2, 0.0)
  share = area / area.sum(1, keepdims=True)
  hue_d = _hue_distance(COLOUR_HUE[np.maximum(colour, 0)], bg_hue[:, None])
  hue_term = 1.0 - (share * hue_d).sum(1) / 180.0
  sat_term = 1.0 - (bg_sat - _BG_SAT_MIN) / (_BG_SAT_MAX - _BG_SAT_MIN)
  harmony = np.clip(0.6 * hue_term + 0.4 * sat_term, 0.0, 1.0)

  centre, composition = _layout(ul, radius, two, targets["composition"])
  centre[absent, 1] = 0.0

  num_distractors = np.rint((1 - targets["clutter"]) * max_distractors).astype(np.int32)
  clutter = 1.0 - num_distractors / max(max_distractors, 1)

  factors = np.stack([targets["sharpness"], targets["noise"], targets["exposure"],
                      harmony, composition, clutter], axis=1).astype(np.float32)
  return Scene(
      index=idx, num_objects=num_objects, shape=shape, colour=colour, size=size,
      radius=radius, centre=centre, rotation=rotation, pattern=pattern,
      dark_background=dark, background_hsv=np.stack([bg_hue / 360.0, bg_sat, value], 1),
      exposure_mode=exposure_mode, num_distractors=num_distractors, factors=factors,
      aesthetic=aesthetic_from_factors(factors))
