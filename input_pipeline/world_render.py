"""Vectorised pixels of the embedded world: Scene (input_pipeline/world_scene.py) -> uint8 images.

The render follows a camera: scene (background pattern, clutter strokes behind the objects,
objects with anti-aliased edges from signed distance functions) -> optical blur -> exposure ->
sensor noise -> 8-bit quantisation. So the three low-level factors live in the pixels where
low-level measures can see them; harmony, composition and clutter live in the scene.
All arrays are float32 [N, S, S, ...] operations over a batch; no per-pixel Python.
"""

from __future__ import annotations

import functools

import numpy as np

from input_pipeline import world_scene as ws

# Exposure: at exposure factor 0 a dark image keeps 50% of its light, a bright one is pushed
# half way to white, a flat one keeps half its contrast. Colours stay nameable.
EXPOSURE_STRENGTH = {"dark": 0.5, "bright": 0.5, "flat": 0.5}
STRIPE_PERIOD, CHECKER_CELL, DOT_PITCH, DOT_RADIUS = 0.25, 0.125, 0.25, 0.065
PATTERN_TONE_SHIFT = 0.18   # second tone of a pattern: background value +- this
STROKE_HALF_WIDTH = 0.022   # clutter strokes, fraction of the side (about 1.4 px at 32)
_NOISE_STREAM = 0x6E6F697365  # "noise": seeds the noise bank apart from the scene's hashes
_NOISE_BANK_VALUES = 1 << 22
_PIXEL_BUDGET = 1 << 19     # pixels per internal chunk, to bound float32 temporaries


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB, all in [0, 1], over the last axis."""
  h, s, v = hsv[..., 0] * 6.0, hsv[..., 1], hsv[..., 2]
  i = np.floor(h).astype(np.int64) % 6
  f = h - np.floor(h)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = np.stack([np.stack(c, -1) for c in
                    ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)
  return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def _box(qx, qy, bx, by):
  dx, dy = np.abs(qx) - bx, np.abs(qy) - by
  outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
  return outside + np.minimum(np.maximum(dx, dy), 0)


_TRI_NORMALS = np.array([(0.0, 1.0), (0.8660254, -0.5), (-0.8660254, -0.5)], np.float32)
_STAR_OUT, _STAR_IN = 1.0, 0.45
_STAR_TIP = np.array([_STAR_OUT, 0.0])
_STAR_INNER = _STAR_IN * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])
_STAR_EDGE = _STAR_INNER - _STAR_TIP
_STAR_NORMAL = (np.array([_STAR_EDGE[1], -_STAR_EDGE[0]]) / np.linalg.norm(_STAR_EDGE))
_STAR_NORMAL = _STAR_NORMAL if _STAR_NORMAL[0] > 0 else -_STAR_NORMAL


def shape_sdf(shape: str, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
  """Signed distance (units of the bounding radius; < 0 inside) of a shape at the origin.

  y points down (image rows), so the triangle's and the star's apex point up.
  """
  if shape == "circle":
    return np.hypot(qx, qy) - 0.85
  if shape == "square":
    return _box(qx, qy, 0.68, 0.68)
  if shape == "diamond":
    return (np.abs(qx) + np.abs(qy) - 0.95) * np.float32(0.70710678)
  if shape == "triangle":
    n = _TRI_NORMALS
    d = np.maximum(np.maximum(qx * n[0, 0] + qy * n[0, 1], qx * n[1, 0] + qy * n[1, 1]),
                   qx * n[2, 0] + qy * n[2, 1])
    return d - 0.53
  if shape == "star":
    rho = np.hypot(qx, qy)
    theta = np.arctan2(qx, -qy) % (2 * np.pi / 5)   # 0 at a tip
    psi = np.pi / 5 - np.abs(theta - np.pi / 5)     # fold onto [0, 36 deg], 0 at the tip
    px, py = rho * np.cos(psi), rho * np.sin(psi)
    return (px - _STAR_TIP[0]) * _STAR_NORMAL[0] + (py - _STAR_TIP[1]) * _STAR_NORMAL[1]
  if shape == "cross":
    return np.minimum(_box(qx, qy, 0.9, 0.3), _box(qx, qy, 0.3, 0.9))
  raise ValueError(f"unknown shape {shape!r}; shapes: {ws.SHAPES}")


def _blend(img, coverage, rgb):
  """img [n,S,S,3] <- coverage [n,S,S] of per-image colour rgb [n,3] (or [n,S,S,3]) over it."""
  if rgb.ndim == 2:
    rgb = rgb[:, None, None, :]
  img += coverage[..., None] * (rgb - img)


def _background(scene, u, grid_x, grid_y, size):
  n = len(scene)
  hsv = scene.background_hsv
  base = hsv_to_rgb(hsv).astype(np.float32)
  alt_v = np.where(scene.dark_background, hsv[:, 2] + PATTERN_TONE_SHIFT,
                   hsv[:, 2] - PATTERN_TONE_SHIFT)
  alt = hsv_to_rgb(np.stack([hsv[:, 0], hsv[:, 1], alt_v], 1)).astype(np.float32)
  img = np.empty((n, size, size, 3), np.float32)
  img[...] = base[:, None, None, :]
  angle = np.floor(u[:, 6] * 4) * np.pi / 4
  cos_a = np.cos(angle).astype(np.float32)[:, None, None]
  sin_a = np.sin(angle).astype(np.float32)[:, None, None]
  phase_x = u[:, 7].astype(np.float32)[:, None, None]
  phase_y = u[:, 8].astype(np.float32)[:, None, None]
  mask = np.zeros((n, size, size), np.float32)
  x, y = grid_x, grid_y
  for code, name in enumerate(ws.PATTERNS):
    sel = np.flatnonzero(scene.pattern == code)
    if name == "plain" or not len(sel):
      continue
    px, py = phase_x[sel], phase_y[sel]
    if name == "striped":
      s = (x * cos_a[sel] + y * sin_a[sel]) / STRIPE_PERIOD + px
      dist = (np.abs(s - np.floor(s) - 0.5) - 0.25) * (STRIPE_PERIOD * size)
      mask[sel] = np.clip(0.5 - dist, 0, 1)
    elif name == "checkered":
      parity = np.floor(x / CHECKER_CELL + px) + np.floor(y / CHECKER_CELL + py)
      mask[sel] = parity % 2
    elif name == "dotted":
      dx = x / DOT_PITCH + px
      dy = y / DOT_PITCH + py
      dx, dy = dx - np.floor(dx) - 0.5, dy - np.floor(dy) - 0.5
      dist = (np.sqrt(dx * dx + dy * dy) * DOT_PITCH - DOT_RADIUS) * size
      mask[sel] = np.clip(0.5 - dist, 0, 1)
  _blend(img, mask, alt)
  return img


# Stroke half-lengths, fractions of the side: 0.06 .. 0.16 (about 4 to 10 px long at 32).
_STROKE_MIN_HALF_LEN, _STROKE_MAX_HALF_LEN = 0.06, 0.16


def _strokes(img, scene, seed, max_distractors, size):
  """Clutter: straight strokes (capsules) in muted colours, behind the objects.

  Each stroke is drawn only in a window around it (about 0.4 of the side square), read and
  written through sliding-window views of padded layers. Images are visited in order of
  stroke count, so "the images with more than m strokes" is a prefix. The layer's alpha is
  the strongest stroke coverage and its colour the coverage-weighted mean, which is the
  stroke's own colour wherever strokes do not overlap.
  """
  n_img, m_max = len(scene), max_distractors
  if m_max <= 0 or not scene.num_distractors.any():
    return
  order = np.argsort(-scene.num_distractors, kind="stable")
  counts = scene.num_distractors[order]
  n_any = int((counts > 0).sum())
  u = ws.uniforms(seed, scene.index[order[:n_any]], ws.STREAM_DISTRACTORS, 7 * m_max)
  u = u.reshape(n_any, m_max, 7).astype(np.float32)
  # Muted colours, so clutter never competes with the objects' colour names.
  hsv = np.stack([u[..., 4], 0.15 + 0.3 * u[..., 5], 0.3 + 0.6 * u[..., 6]], -1)
  rgb = hsv_to_rgb(hsv).astype(np.float32)  # [n, M, 3]
  half_width = max(STROKE_HALF_WIDTH * size, 0.5)
  win = int(np.ceil(2 * (_STROKE_MAX_HALF_LEN * size + half_width + 1))) + 1
  padded = size + 2 * win
  # Channels: alpha, weight, then weighted r, g, b; channel-first so windows are [.., C, W, W].
  layers = np.zeros((n_any, 5, padded, padded), np.float32)
  views = np.lib.stride_tricks.sliding_window_view(layers, (win, win), axis=(2, 3),
                                                   writeable=True)
  steps = np.arange(win, dtype=np.float32)
  for m in range(m_max):
    n_m = int((counts > m).sum())
    if n_m == 0:
      break
    um = u[:n_m, m]
    ox = np.floor(um[:, 0] * size).astype(np.int64) - win // 2
    oy = np.floor(um[:, 1] * size).astype(np.int64) - win // 2
    gx = ((ox[:, None] + steps + 0.5) / size)[:, None, :]  # [n, 1, W]
    gy = ((oy[:, None] + steps + 0.5) / size)[:, :, None]  # [n, W, 1]
    ang = (um[:, 2] * len(_DIRS32)).astype(np.int64)
    c, s = _DIRS32[ang, 0, None, None], _DIRS32[ang, 1, None, None]
    dx, dy = gx - um[:, 0, None, None], gy - um[:, 1, None, None]
    half_len = _STROKE_MIN_HALF_LEN + (_STROKE_MAX_HALF_LEN - _STROKE_MIN_HALF_LEN) * um[:, 3]
    along = np.abs(dx * c + dy * s) - half_len[:, None, None]
    across = dy * c - dx * s
    np.maximum(along, 0, out=along)
    cov = np.clip((half_width + 0.5) - np.sqrt(along * along + across * across) * size, 0, 1)
    rows = np.arange(n_m)
    at = (rows, slice(None), oy + win, ox + win)
    w = views[at]  # [n, 5, W, W] copy
    np.maximum(w[:, 0], cov, out=w[:, 0])
    w[:, 1] += cov
    w[:, 2:] += cov[:, None] * rgb[:n_m, m, :, None, None]
    views[at] = w
  inner = layers[:, :, win:win + size, win:win + size]
  alpha = inner[:, 0]
  colour = inner[:, 2:].transpose(0, 2, 3, 1) / np.maximum(inner[:, 1], 1e-6)[..., None]
  rows = order[:n_any]
  sub = img[rows]
  _blend(sub, alpha, colour)
  img[rows] = sub


_DIRS32 = np.stack([np.cos(np.arange(64) * np.pi / 64),
                    np.sin(np.arange(64) * np.pi / 64)], 1).astype(np.float32)


def _objects(img, scene, grid_x, grid_y, size):
  n = len(scene)
  for k in range(ws.MAX_OBJECTS):
    present = np.flatnonzero(scene.shape[:, k] >= 0)
    if not len(present):
      continue
    cov = np.empty((len(present), size, size), np.float32)
    shapes = scene.shape[present, k]
    for code, name in enumerate(ws.SHAPES):
      local = np.flatnonzero(shapes == code)
      if not len(local):
        continue
      sel = present[local]
      r = scene.radius[sel, k].astype(np.float32)[:, None, None]
      cx = scene.centre[sel, k, 0].astype(np.float32)[:, None, None]
      cy = scene.centre[sel, k, 1].astype(np.float32)[:, None, None]
      rot = scene.rotation[sel, k].astype(np.float32)[:, None, None]
      dx, dy = (grid_x - cx) / r, (grid_y - cy) / r
      c, s = np.cos(rot), np.sin(rot)
      qx, qy = c * dx + s * dy, c * dy - s * dx
      cov[local] = np.clip(0.5 - shape_sdf(name, qx, qy) * (r * size), 0, 1)
    rgb = ws.COLOUR_RGB[scene.colour[present, k]].astype(np.float32)
    if len(present) == n:
      _blend(img, cov, rgb)
    else:
      sub = img[present]
      _blend(sub, cov, rgb)
      img[present] = sub


def blur_matrices(sigma_px: np.ndarray, size: int) -> np.ndarray:
  """[n, S, S] row operators of a Gaussian blur with mirrored edges, one sigma per image."""
  i = np.arange(size, dtype=np.float32)
  sig = np.maximum(np.asarray(sigma_px, np.float32), 1e-3)[:, None, None]
  inv = -0.5 / (sig * sig)
  a, b = i[:, None], i[None, :]
  # Direct term plus the mirror images of the source across both edges ('symmetric' pad).
  m = (np.exp(inv * (a - b) ** 2) + np.exp(inv * (a + b + 1) ** 2)
       + np.exp(inv * (2 * size - 1 - a - b) ** 2))
  m /= m.sum(2, keepdims=True)
  # Flush the far tails: denormal floats slow the matrix products down by 8x.
  m *= m > 1e-12
  return m


def gaussian_blur(img: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
  """Separable Gaussian blur of float32 images [n,S,S,C], one sigma (pixels) per image.

  Each pass is a batched matrix product with a banded [S, S] operator (BLAS), far faster in
  numpy than summing shifted copies.
  """
  n, size, _, ch = img.shape
  ops = blur_matrices(sigma_px, size)
  out = np.matmul(ops, img.reshape(n, size, size * ch)).reshape(n, size, size, ch)
  out = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(n, size, size * ch)
  out = np.matmul(ops, out).reshape(n, size, size, ch)
  return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


def _exposure(img, scene):
  """Each mode is affine in the pixel value: x -> gain * x + offset."""
  dev = 1.0 - scene.factors[:, 2].astype(np.float32)
  strength = np.array([EXPOSURE_STRENGTH[m] for m in ws.EXPOSURE_MODES], np.float32)
  gain = 1.0 - strength[scene.exposure_mode] * dev
  # dark: g x;  bright: 1 - g (1 - x) = g x + (1 - g);  flat: 0.5 + g (x - 0.5).
  offset = np.array([0.0, 1.0, 0.5], np.float32)[scene.exposure_mode] * (1.0 - gain)
  img *= gain[:, None, None, None]
  img += offset[:, None, None, None]


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int, size: int) -> np.ndarray:
  """Standard normal fields [B, S, S, 3] shared by all records of a world (B ~ 4M / S^2 / 3)."""
  count = int(np.clip(_NOISE_BANK_VALUES // (size * size * 3), 16, 256))
  rng = np.random.default_rng([int(seed) % 2**63, _NOISE_STREAM])
  bank = rng.standard_normal((count, size, size, 3), dtype=np.float32)
  bank.setflags(write=False)
  return bank


def sensor_noise(seed: int, indices: np.ndarray, size: int) -> np.ndarray:
  """Unit-variance white noise [N, S, S, 3] per record, from (seed, index) only.

  Drawing fresh normals per image costs as much as the rest of the render in numpy, so each
  record takes a field of a fixed bank, cyclically shifted by a random offset and randomly
  negated: 256 fields x 1024 shifts x 2 signs at 32 px, more than enough variety for grain.
  """
  bank = _noise_bank(int(seed), int(size))
  u = ws.uniforms(seed, indices, ws.STREAM_NOISE, 4)
  pick = (u[:, 0] * len(bank)).astype(np.int64)
  dy = (u[:, 1] * size).astype(np.int64)
  dx = (u[:, 2] * size).astype(np.int64)
  sign = np.where(u[:, 3] < 0.5, -1.0, 1.0).astype(np.float32)
  steps = np.arange(size)
  rows = (steps[None, :] + dy[:, None]) % size
  cols = (steps[None, :] + dx[:, None]) % size
  noise = bank[pick[:, None, None], rows[:, :, None], cols[:, None, :]]
  noise *= sign[:, None, None, None]
  return noise


def render(scene: ws.Scene, *, seed: int, image_size: int, max_blur_sigma: float,
           max_noise_std: float, max_distractors: int) -> np.ndarray:
  """Pixels of `scene`: uint8 [N, S, S, 3]. Deterministic per record (seed, index)."""
  n, size = len(scene), int(image_size)
  out = np.empty((n, size, size, 3), np.uint8)
  chunk = max(1, _PIXEL_BUDGET // (size * size))
  for start in range(0, n, chunk):
    sl = slice(start, min(n, start + chunk))
    out[sl] = _render_chunk(_take(scene, sl), seed, size, max_blur_sigma, max_noise_std,
                            max_distractors)
  return out


def _take(scene: ws.Scene, sl) -> ws.Scene:
  return ws.Scene(**{f: getattr(scene, f)[sl] for f in scene.__dataclass_fields__})


def _render_chunk(scene, seed, size, max_blur_sigma, max_noise_std, max_distractors):
  coords = ((np.arange(size, dtype=np.float32) + 0.5) / size)
  grid_x, grid_y = coords[None, None, :], coords[None, :, None]
  u = ws.uniforms(seed, scene.index, ws.STREAM_BACKGROUND, 9)
  img = _background(scene, u, grid_x, grid_y, size)
  _strokes(img, scene, seed, max_distractors, size)
  _objects(img, scene, grid_x, grid_y, size)
  sigma = (1.0 - scene.factors[:, 0]) * max_blur_sigma * size
  blurry = np.flatnonzero(sigma > 0.05)
  if len(blurry) == len(scene):
    img = gaussian_blur(img, sigma)
  elif len(blurry):
    img[blurry] = gaussian_blur(img[blurry], sigma[blurry])
  _exposure(img, scene)
  std = ((1.0 - scene.factors[:, 1]) * max_noise_std).astype(np.float32)
  img += sensor_noise(seed, scene.index, size) * std[:, None, None, None]
  img *= 255.0
  np.clip(img, 0, 255, out=img)
  return np.rint(img, out=img).astype(np.uint8)
